"""The three stages chained on the tiny pair, as a user runs them: collect -> train -> decode with the
learned gate. In-process through the stage functions first (seconds), then once as programs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sprinter import Decoder
from sprinter.data.collect import collect, parse_collect_config
from sprinter.data.shards import read_manifest
from sprinter.errors import SprinterError
from sprinter.train.fit import parse_train_config, train

ROOT = Path(__file__).resolve().parent.parent
COLLECT_TINY = str(ROOT / "configs" / "collect" / "tiny.yaml")
TRAIN_TINY = str(ROOT / "configs" / "train" / "tiny.yaml")
# Sampled collection (temperature 1): the tiny pair's greedy labels are nearly all one class, the
# sprinter label (q(x) <= p(x)) is balanced. Splits of a quarter keep both classes in val and test.
SPLITS = ["--val-fraction", "0.25", "--test-fraction", "0.25"]


def collect_argv(pair: Path, out: Path, source: str, num_prompts: int = 32) -> list[str]:
    return ["--config", COLLECT_TINY, "--draft", str(pair / "draft"), "--target", str(pair / "target"),
            "--out", str(out), "--source", source, "--num-prompts", str(num_prompts), "--temperature", "1.0",
            "--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    """(data folder, verifier folder): both context sources collected, a verifier trained on the corpus
    contexts and scored on the decode contexts of the test prompts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core runner
    root = tmp_path_factory.mktemp("pipeline")
    for source in ("corpus", "decode"):
        manifest = collect(parse_collect_config(collect_argv(tiny_pair, root / source, source)))
        assert manifest["num_prompts"] == 32 and manifest["context_source"] == source
    metrics = train(parse_train_config(["--config", TRAIN_TINY, "--data", str(root / "corpus"), "--out",
                                        str(root / "verifier"), "--eval-data", str(root / "decode"),
                                        "--no-baselines", *SPLITS]))
    torch.set_num_threads(threads)
    return root, metrics


def test_collected_data_trains_a_verifier(trained):
    root, metrics = trained
    manifest = read_manifest(root / "corpus")
    assert metrics["label_rule"] == "sprinter"  # auto: sampled data
    assert metrics["draft"]["fingerprint"] == manifest["draft"]["fingerprint"]
    assert sum(split["samples"] for split in metrics["splits"].values()) == manifest["num_samples"]
    assert str(root / "decode") in metrics["eval_data"]
    # the reported AUROC is the exported verifier's on the corpus rows of the test prompts, recomputed here
    from torchmetrics.functional.classification import binary_auroc

    from sprinter.train.baselines import score_rows
    from sprinter.train.data import open_folders, split_prompts
    from sprinter.verifier import load_verifier

    cfg = parse_train_config(["--config", TRAIN_TINY, "--data", str(root / "corpus"), "--out", str(root / "verifier"),
                              *SPLITS])
    verifier, info = load_verifier(root / "verifier")
    _, table = open_folders([root / "corpus"], info.features, "sprinter")
    rows = split_prompts(table.column("prompt_index"), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    scores, labels = score_rows(verifier, table, info.features, "sprinter", rows)
    auroc = float(binary_auroc(scores, (labels >= 0.5).long()))
    assert metrics["verifier"]["auroc"] == pytest.approx(auroc, abs=1e-6) and 0 < auroc < 1
    assert (root / "verifier" / "verifier.safetensors").is_file()


def test_learned_gate_decodes_with_consistent_stats(trained, tiny_pair):
    root, _ = trained
    decoder = Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"),
                                      verifier=root / "verifier", device="cpu", dtype="float32")
    for prompt in ("def foo(x):", "import os\n"):
        ar = decoder.generate(prompt, max_new_tokens=16, mode="ar")
        for threshold in (None, 1e-6):  # the calibrated threshold, and one that passes almost everything
            out = decoder.generate(prompt, max_new_tokens=16, mode="sprinter", threshold=threshold)
            s = out.stats
            assert s.new_tokens == len(out.token_ids) == 16
            assert s.verifier_calls == s.drafted == s.accepted + s.rejected > 0
            assert s.flagged <= s.verifier_calls and s.target_calls <= s.flagged + s.new_tokens
            assert s.verifier_flops > 0
            strict = decoder.generate(prompt, max_new_tokens=16, mode="sprinter", threshold=threshold, strict=True)
            assert strict.token_ids == ar.token_ids  # strict + greedy is lossless
        assert s.flagged < s.verifier_calls  # the low threshold let the verifier pass tokens


def test_verifier_of_another_draft_is_refused(trained, tiny_llama_pair):
    root, _ = trained
    with pytest.raises(SprinterError, match="was trained for draft"):
        Decoder.from_pretrained(str(tiny_llama_pair / "draft"), str(tiny_llama_pair / "target"),
                                verifier=root / "verifier", device="cpu", dtype="float32")


@pytest.mark.slow
def test_cli_chain(tiny_pair, tmp_path):
    """scripts/collect.py -> scripts/train.py -> scripts/generate.py --verifier, each exit code 0."""
    def run(script: str, *argv: str) -> str:
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *argv], capture_output=True,
                                text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    assert "collected 256 samples" in run("collect.py", *collect_argv(tiny_pair, tmp_path / "data", "corpus"))
    assert "verifier written to" in run("train.py", "--config", TRAIN_TINY, "--data", str(tmp_path / "data"),
                                        "--out", str(tmp_path / "verifier"), "--no-baselines", *SPLITS)
    out = json.loads(run("generate.py", "--draft", str(tiny_pair / "draft"), "--target", str(tiny_pair / "target"),
                         "--verifier", str(tmp_path / "verifier"), "--mode", "sprinter", "--max-new-tokens", "8",
                         "--device", "cpu", "--dtype", "float32", "--threads", "1", "--json"))
    assert out["stats"]["verifier_calls"] == out["stats"]["drafted"] > 0
