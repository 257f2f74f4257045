"""The offline pair builder and pair loading (the real from_pretrained path)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sprinter import SprinterError, load_pair
from sprinter.corpus import load_documents, split_of
from sprinter.pairs.build import PairConfig, build_pair, parse_pair_config

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_pair_loads_with_from_pretrained(tiny_pair):
    meta = json.loads((tiny_pair / "pair.json").read_text())
    for key in ("preset", "arch", "corpus", "target_params", "draft_params", "training_tokens", "training_seconds",
                "target_val_loss", "draft_val_loss", "greedy_agreement"):
        assert key in meta
    assert 0.0 <= meta["greedy_agreement"] <= 1.0
    pair = load_pair(str(tiny_pair / "draft"), str(tiny_pair / "target"), device="cpu", dtype="float32")
    ids = pair.tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert pair.target(ids).logits.shape[-1] == pair.draft(ids).logits.shape[-1] == pair.vocab_size
    assert pair.tokenizer.decode(ids[0]) == "def f(x):\n    return x"


def test_llama_pair_loads(tiny_llama_pair):
    pair = load_pair(str(tiny_llama_pair / "draft"), str(tiny_llama_pair / "target"), device="cpu", dtype="float32")
    assert pair.target.config.model_type == "llama"
    assert pair.target.config.num_hidden_layers > pair.draft.config.num_hidden_layers


def test_build_is_deterministic_and_rebuild_is_a_no_op(tmp_path, tiny_pair):
    cfg = parse_pair_config(["--preset", "tiny", "--out", str(tmp_path / "again")])
    build_pair(cfg)
    from safetensors.torch import load_file

    a = load_file(tiny_pair / "target" / "model.safetensors")
    b = load_file(tmp_path / "again" / "target" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The same config again is recognised and nothing is rebuilt.
    assert build_pair(cfg)["target_params"] == json.loads((tiny_pair / "pair.json").read_text())["target_params"]


def test_out_folder_with_a_different_pair_is_refused(tiny_pair):
    cfg = parse_pair_config(["--preset", "tiny", "--out", str(tiny_pair), "--seed", "7"])
    with pytest.raises(SprinterError, match="different pair.*--overwrite"):
        build_pair(cfg)


def test_interrupted_build_leaves_no_pair(tmp_path, monkeypatch):
    import sprinter.pairs.build as pairs

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairs, "check_same_vocabulary", boom)  # fails after the files are written to the temp dir
    out = tmp_path / "pair"
    with pytest.raises(KeyboardInterrupt):
        build_pair(parse_pair_config(["--preset", "tiny", "--out", str(out), "--target-steps", "2",
                                      "--distill-steps", "1"]))
    assert not out.exists()


def test_mismatched_vocabularies_are_refused(tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_pair / "draft", other)  # a real model folder, whose tokenizer then gains a token
    tok = AutoTokenizer.from_pretrained(tiny_pair / "target")
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    with pytest.raises(SprinterError, match="different vocabularies"):
        load_pair(str(other), str(tiny_pair / "target"), device="cpu")


def test_uncached_hub_name_says_so():
    with pytest.raises(SprinterError, match="local path"):
        load_pair("no-such-org/no-such-model", "no-such-org/no-such-model", device="cpu")


def test_cuda_where_none_is_refused(tiny_pair):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SprinterError, match="no CUDA"):
        load_pair(str(tiny_pair / "draft"), str(tiny_pair / "target"), device="cuda")


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "preset: got 'huge'"),
    (["--arch", "bert"], "arch: got 'bert'"),
    (["--corpus", "/no/such/folder"], "dataset: got '/no/such/folder'"),
    (["--target-steps", "many"], "--target-steps: got 'many'"),
])
def test_cli_bad_input_is_one_line_and_nonzero(args, message, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_pair.py"), "--out", str(tmp_path / "p"), *args],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "blank.txt").write_text("   \n")
    with pytest.raises(SprinterError, match="no text"):
        build_pair(PairConfig(corpus=str(tmp_path / "corpus"), out=str(tmp_path / "p")))


def test_splits_are_stable_and_disjoint():
    assert split_of("stdlib/os.py") == split_of("stdlib/os.py")
    names = {d.id for d in load_documents("stdlib", "val")} & {d.id for d in load_documents("stdlib", "train")}
    assert not names


def test_target_from_rebuilds_only_the_draft_and_equals_a_full_build(tiny_pair, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "redraft"
    meta = build_pair(parse_pair_config(["--preset", "tiny", "--out", str(out), "--target-from", str(tiny_pair)]))
    assert meta["target_reused_from"] == str(tiny_pair)
    for role in ("target", "draft"):
        a = load_file(tiny_pair / role / "model.safetensors")
        b = load_file(out / role / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), role
    with pytest.raises(SprinterError, match="other target options.*target_layers=2, not 3"):
        build_pair(parse_pair_config(["--preset", "tiny", "--out", str(tmp_path / "x"), "--target-from",
                                      str(tiny_pair), "--target-layers", "3"]))


def test_overwrite_never_deletes_a_folder_that_is_not_a_pair(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SprinterError, match="holds no pair.json"):
        build_pair(parse_pair_config(["--preset", "tiny", "--out", str(tmp_path), "--overwrite"]))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_time_budget_stops_training_and_is_recorded(tmp_path):
    out = tmp_path / "budget"
    meta = build_pair(parse_pair_config(["--preset", "tiny", "--out", str(out), "--target-steps", "100000",
                                         "--target-max-seconds", "0.5", "--distill-steps", "3"]))
    assert 0 < meta["steps_run"]["target"] < 100000 and meta["steps_run"]["draft"] == 3
    assert meta["training_tokens"]["target"] == meta["steps_run"]["target"] * 8 * 48  # tiny: batch 8 x 48 tokens
    assert meta["precision"] == "float32"  # CPU: no autocast


def test_lr_clock_ends_the_decay_by_the_time_budget():
    from sprinter.schedule import warmup_cosine

    def lr_at(step, steps, peak, warmup_fraction, clock=0.0):  # the pairs' schedule (sprinter.pairs.build)
        return warmup_cosine(step, steps, warmup_fraction, peak=peak, floor=0.1, clock=clock, min_warmup=1)

    assert lr_at(10, 1000, 1.0, 0.05) == lr_at(10, 1000, 1.0, 0.05, clock=0.0)
    assert lr_at(500, 100000, 1.0, 0.05, clock=1.0) == pytest.approx(0.1)  # the clock ran out: the floor


def test_pair_json_without_newer_options_is_still_recognised(tmp_path, tiny_pair):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(tiny_pair, copy)
    meta = json.loads((copy / "pair.json").read_text())
    for key in ("target_max_seconds", "distill_max_seconds", "precision"):  # as a pair.json written before them
        del meta["config"][key]
    (copy / "pair.json").write_text(json.dumps(meta))
    again = build_pair(parse_pair_config(["--preset", "tiny", "--out", str(copy)]))  # "nothing to do", not refused
    assert again["target_params"] == meta["target_params"]


@pytest.mark.parametrize("args, message", [
    (["--target-max-seconds", "-1"], "target_max_seconds: got -1"),
    (["--precision", "float8"], "precision: got 'float8'"),
    (["--precision", "bfloat16", "--device", "cpu"], "precision: got 'bfloat16' on cpu"),
])
def test_bad_time_budget_or_precision_is_refused(args, message, tmp_path):
    with pytest.raises(SprinterError, match=message):
        build_pair(parse_pair_config(["--preset", "tiny", "--out", str(tmp_path / "p"), *args]))


def test_a_build_says_when_vllm_on_a_cpu_would_refuse_its_head_size():
    from sprinter.pairs.build import vllm_cpu_note

    tiny = vllm_cpu_note(parse_pair_config(["--preset", "tiny"]))  # 48 wide / 2 heads = 24
    assert "head size is 24" in tiny and "--target-width 64 --target-heads 2" in tiny
    demo = vllm_cpu_note(parse_pair_config(["--preset", "demo", "--target-heads", "4"]))  # 96 / 4 = 24
    assert "--target-width 96 --target-heads 3" in demo
    assert vllm_cpu_note(parse_pair_config(["--preset", "demo"])) is None  # the preset: 96 / 3 = 32
    assert vllm_cpu_note(parse_pair_config(["--preset", "bench"])) is None  # 128 / 4 = 32
    scratch = ["--preset", "bench", "--draft-init", "scratch", "--draft-width", "48", "--draft-heads", "2"]
    assert "the draft's head size is 24" in vllm_cpu_note(parse_pair_config(scratch))
