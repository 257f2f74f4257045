"""Shared fixtures: tiny pairs built once per test session, offline, on CPU."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Scripts run in subprocesses import this checkout, not whichever copy is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from sprinter.pairs import build_pair, parse_pair_config  # noqa: E402


def _build(tmp_path_factory, arch: str):
    out = tmp_path_factory.mktemp(f"pair-{arch}")
    build_pair(parse_pair_config(["--preset", "tiny", "--arch", arch, "--out", str(out), "--overwrite"]))
    return out


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Folder of a tiny GPT-2 pair: DIR/draft, DIR/target, DIR/pair.json."""
    return _build(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def tiny_llama_pair(tmp_path_factory):
    """Folder of a tiny Llama-architecture pair."""
    return _build(tmp_path_factory, "llama")
