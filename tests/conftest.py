"""Shared fixtures: tiny pairs built once per test session, offline, on CPU."""

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Scripts run in subprocesses import this checkout, not whichever copy is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sprinter.data.datastore import suffix_array  # noqa: E402
from sprinter.decode.datastore import Datastore  # noqa: E402
from sprinter.decode.decoder import Decoder  # noqa: E402
from sprinter.pairs.build import build_pair, parse_pair_config  # noqa: E402


def load_script(name: str):
    """The module of scripts/NAME.py, loaded from this checkout (its `main` is what the command line runs)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def collect_argv(pair, data, out, *extra) -> list[str]:
    """scripts/collect.py's arguments for a tiny collection (configs/collect/tiny.yaml) from `pair` over `data`."""
    return ["--config", str(ROOT / "configs/collect/tiny.yaml"), "--draft", str(pair / "draft"),
            "--target", str(pair / "target"), "--dataset", str(data), "--split", "all", "--out", str(out),
            "--device", "cpu", "--no-progress", "--threads", "1", *extra]


def write_corpus(path, source: str, documents: int):
    """A .jsonl corpus at `path`: `source` cut into `documents` equal documents."""
    import json

    chunk = len(source) // documents
    path.write_text("".join(json.dumps({"text": source[i * chunk:(i + 1) * chunk]}) + "\n" for i in range(documents)))
    return path


def train_argv(data, out, *extra) -> list[str]:
    """scripts/train.py's arguments for a one-epoch tiny training of the shards in `data` (no baselines)."""
    return ["--config", str(ROOT / "configs/train/tiny.yaml"), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--no-baselines", *extra]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder of synthetic shards (sprinter.data.synthetic), made once per test module."""
    from sprinter.data.synthetic import write_shards

    return write_shards(tmp_path_factory.mktemp("syn") / "data")


@contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to n inside, restored after: tiny models on a shared 2-core machine run fastest
    on one thread, and two that fight run ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(tmp_path_factory, arch: str):
    """A fresh tiny pair per session; with SPRINTER_TEST_PAIRS=DIR, the one built in DIR by an earlier session (the
    mutation run, docs/testing.md, starts a test session per mutant: it builds the pairs once)."""
    keep = os.environ.get("SPRINTER_TEST_PAIRS")
    out = Path(keep) / arch if keep else tmp_path_factory.mktemp(f"pair-{arch}")
    build_pair(parse_pair_config(["--preset", "tiny", "--arch", arch, "--out", str(out),
                                  *([] if keep else ["--overwrite"])]))
    return out


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Folder of a tiny GPT-2 pair: DIR/draft, DIR/target, DIR/pair.json."""
    return _build(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def tiny_llama_pair(tmp_path_factory):
    """Folder of a tiny Llama-architecture pair."""
    return _build(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def single_thread(tiny_pair, tiny_llama_pair):
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("single_thread")`): tiny
    models on a shared 2-core machine run ~100x faster on one thread than on two that fight. The pairs are
    built first, with the default threads: a build's floats depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scrambled(pair_dir, seed: int = 0) -> Decoder:
    """A decoder over a tiny pair with random weights. The tiny pairs' trained weights repeat one token,
    which would make equality tests vacuous; here the draft is the target's first block and the target's
    extra block is weaker, so draft and target disagree on some tokens and agree on others."""
    dec = Decoder.from_pretrained(draft=str(pair_dir / "draft"), target=str(pair_dir / "target"), device="cpu",
                                  dtype="float32")
    gen = torch.Generator().manual_seed(seed)
    shared = dec.pair.draft.state_dict().keys()
    with torch.no_grad():
        for name, weight in dec.pair.target.named_parameters():
            if weight.dim() > 1:
                weight.copy_(torch.randn(weight.shape, generator=gen) * (0.3 if name in shared else 0.15))
        dec.pair.draft.load_state_dict(dec.pair.target.state_dict(), strict=False)
    return dec


@pytest.fixture(scope="module")
def gpt2_decoder(tiny_pair):
    return scrambled(tiny_pair)


@pytest.fixture(scope="module")
def llama_decoder(tiny_llama_pair):
    return scrambled(tiny_llama_pair)


@pytest.fixture(params=["gpt2_decoder", "llama_decoder"])
def decoder(request):
    """Each test runs on both architectures' scrambled decoders."""
    return request.getfixturevalue(request.param)


def datastore_of(documents, eos_id: int) -> Datastore:
    """An in-memory datastore over token-id documents (hand-made corpora)."""
    tokens = np.fromiter((t for doc in documents for t in (*doc, eos_id)), dtype=np.int32)
    return Datastore(tokens, suffix_array(tokens, eos_id), eos_id)


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory):
    """A scrambled tiny Llama pair whose head size vLLM's CPU attention takes (64 wide / 2 heads = 32), saved as
    model folders DIR/target and DIR/draft, and DIR/verifier: a linear verifier reading the draft's hidden state,
    random, so about half the drafted tokens are flagged and chains end at varying lengths."""
    from sprinter.pairs.load import fingerprint
    from sprinter.verifier import Verifier, VerifierInfo, default_arch, save_verifier

    built = tmp_path_factory.mktemp("pair-vllm-built")
    build_pair(parse_pair_config(["--preset", "tiny", "--arch", "llama", "--target-width", "64", "--target-heads", "2",
                                  "--out", str(built), "--overwrite"]))
    dec = scrambled(built)
    out = tmp_path_factory.mktemp("pair-vllm")
    for role, model in (("target", dec.pair.target), ("draft", dec.pair.draft)):
        model.save_pretrained(out / role)
        dec.tokenizer.save_pretrained(out / role)
    width = dec.pair.draft.config.hidden_size
    info = VerifierInfo(features=("hidden",), hidden_size=width, arch=default_arch(depth=0),
                        draft={"name": "vllm-tiny-draft", "fingerprint": fingerprint(str(out / "draft"))},
                        default_threshold=0.5)
    verifier = Verifier(info)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        verifier.net[0].weight.copy_(torch.randn(verifier.net[0].weight.shape, generator=gen) / width**0.5)
        verifier.net[0].bias.zero_()
    save_verifier(out / "verifier", verifier, info)
    return out
