"""The data stage: labels from their definitions, rows that match the draft, resume, bad inputs."""

import email.message
import errno
import inspect
import json
import json.decoder
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import collect_argv, write_corpus

import sprinter.data.collect as collect_module
from sprinter import load_pair
from sprinter.data.collect import collect, parse_collect_config
from sprinter.data.contexts import (
    accept_labels,
    decode_rows,
    iter_windows,
    probabilities,
)
from sprinter.data.shards import complete_shards, load_columns, read_manifest
from sprinter.decode.batched import accept
from sprinter.decode.drafters import Draft
from sprinter.decode.sampling import Sampler
from sprinter.errors import run_cli

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["hidden", "token_id", "draft_prob", "draft_entropy", "draft_max_prob", "target_prob", "position",
           "context_length", "prompt_index", "accept_greedy", "accept_sprinter", "accept_soft",
           "accept_relaxed"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small .jsonl corpus: 12 documents of Python source, each long enough for a few windows."""
    source = inspect.getsource(json.decoder) + inspect.getsource(email.message)
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", source, 12)


_argv = collect_argv


def _run(argv) -> int:
    return run_cli(lambda a: collect(parse_collect_config(a)), argv)


def _rows(folder):
    return load_columns(folder, COLUMNS)


def _row_keys(rows):
    """A unique key per row: (prompt, context length, position in block)."""
    return rows["prompt_index"] * 10**6 + rows["context_length"] * 100 + rows["position"]


def _assert_same_rows(a, b):
    order_a, order_b = torch.argsort(_row_keys(a)), torch.argsort(_row_keys(b))
    for name in COLUMNS:
        assert torch.equal(a[name][order_a], b[name][order_b]), name


# ------------------------------------------------------------------------------------------ labels
def test_labels_match_their_definitions_on_hand_built_probabilities():
    q = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2]])
    p = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.3, 0.6], [0.0, 0.2, 0.8], [0.4, 0.4, 0.2]])
    x = torch.tensor([0, 1, 2, 1])
    labels = accept_labels(p, q, x)
    # x=0: p argmax, q > p -> greedy 1, sprinter 0, soft 0.5/0.7; x=1: not argmax, q > p -> 0, 0, 0.6;
    # x=2: argmax, q == p -> 1, 1, 1; x=1 in a tie for the argmax, q == p -> 1, 1, 1.
    assert labels["accept_greedy"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert labels["accept_sprinter"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.allclose(labels["accept_soft"], torch.tensor([0.5 / 0.7, 0.3 / 0.5, 1.0, 1.0]))
    # relaxed: p(x) / max p = 1, 0.5 (at lambda: kept), 1, 1
    assert labels["accept_relaxed"].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_the_decode_path_keeps_never_always_sometimes():
    """decode_rows' path is the batched loop's acceptance step: greedy match at 0, the rule otherwise."""
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([[[0.9, 0.1], [0.9, 0.1]]])
    always = torch.tensor([[[0.95, 0.05], [0.95, 0.05], [0.2, 0.8]]])
    never = torch.tensor([[[0.1, 0.9], [0.95, 0.05], [0.2, 0.8]]])
    sometimes = torch.tensor([[[0.95, 0.05], [0.1, 0.9], [0.2, 0.8]]])
    for temperature in (0.0, 1.0):
        sampler = Sampler(temperature)
        p_of = (lambda p: Sampler().probs(p.log())) if temperature == 0 else (lambda p: p)  # greedy: one-hots
        draft = Draft(torch.tensor([[0, 0]]), [2], p_of(q))
        accepted, nxt = accept(p_of(never), draft, sampler, gen)
        assert (int(accepted), int(nxt)) == (0, 1)  # the residual max(0, p - q) only has token 1
        accepted, nxt = accept(p_of(sometimes), draft, sampler, gen)
        assert (int(accepted), int(nxt)) == (1, 1)
        accepted, nxt = accept(p_of(always), draft, sampler, gen)
        assert int(accepted) == 2 and (int(nxt) == 1 or temperature > 0)  # p(x) >= q(x) everywhere: always kept


def test_probabilities_are_untempered_at_zero():
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(probabilities(logits, 0.0), torch.softmax(logits, -1))
    assert torch.allclose(probabilities(logits, 2.0), torch.softmax(logits / 2, -1))


# ------------------------------------------------------------------------------------------ rows
def test_corpus_rows_are_the_drafts_own_hidden_states(tiny_pair, text_file, tmp_path):
    assert _run(_argv(tiny_pair, text_file, tmp_path / "out")) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_prompts"] == 8 and manifest["num_samples"] == 64
    assert (tmp_path / "out" / "config.json").is_file()
    rows = _rows(tmp_path / "out")
    cfg = parse_collect_config(_argv(tiny_pair, text_file, tmp_path / "out"))
    pair = load_pair(str(tiny_pair / "draft"), str(tiny_pair / "target"), device="cpu", dtype="float32")
    windows = list(iter_windows(cfg, pair.tokenizer))
    head = pair.draft.get_output_embeddings()
    for r in (0, 9, 30, 63):
        i, j = int(rows["prompt_index"][r]), int(rows["position"][r])
        context = windows[i][: cfg.prompt_len + j][None]
        with torch.no_grad():
            out = pair.draft(context, output_hidden_states=True)
            target_logits = pair.target(context).logits[0, -1]
        assert torch.allclose(rows["hidden"][r], out.hidden_states[-1][0, -1], atol=1e-5)
        q = torch.softmax(head(rows["hidden"][r])[: pair.vocab_size], -1)
        assert int(rows["token_id"][r]) == int(q.argmax())
        assert torch.isclose(q[rows["token_id"][r]], rows["draft_prob"][r], atol=1e-5)
        p = torch.softmax(target_logits[: pair.vocab_size], -1)
        assert torch.isclose(p[rows["token_id"][r]], rows["target_prob"][r], atol=1e-5)
        assert int(rows["context_length"][r]) == cfg.prompt_len + j


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_rows_follow_the_target_path(request, text_file, arch):
    folder = request.getfixturevalue("tiny_pair" if arch == "gpt2" else "tiny_llama_pair")
    pair = load_pair(str(folder / "draft"), str(folder / "target"), device="cpu", dtype="float32")
    cfg = parse_collect_config(_argv(folder, text_file, "unused"))
    prompts = torch.stack([w[:12] for w in list(iter_windows(cfg, pair.tokenizer))[:3]])
    args = dict(max_new_tokens=10, k=4, temperature=0.0, gen=torch.Generator(), pad_id=0, eos_id=None)
    rows, paths = decode_rows(pair, prompts, **args)
    assert rows["row_prompt"].bincount().tolist() == [10, 10, 10]
    # Greedy path = target greedy: every path token after the prompt is the target's argmax.
    with torch.no_grad():
        path = torch.tensor(paths[1])[None]
        assert torch.equal(pair.target(path).logits[0, 11:-1, : pair.vocab_size].argmax(-1), path[0, 12:])
    # Each row's hidden state is the draft's at the end of its context (path prefix + earlier drafts).
    head = pair.draft.get_output_embeddings()
    for r in range(10, 20):
        j, n = int(rows["position"][r]), int(rows["context_length"][r])
        context = paths[1][: n - j] + rows["token_id"][r - j: r].tolist()
        with torch.no_grad():
            hidden = pair.draft(torch.tensor(context)[None], output_hidden_states=True).hidden_states[-1][0, -1]
        assert torch.allclose(rows["hidden"][r], hidden, atol=1e-5)
        q = torch.softmax(head(hidden)[: pair.vocab_size], -1)
        assert torch.isclose(q[rows["token_id"][r]], rows["draft_prob"][r], atol=1e-5)
    # Padding does not change the rows: the same prompt alone gives the same tokens.
    alone, _ = decode_rows(pair, prompts[1:2], **args)
    assert torch.equal(alone["token_id"], rows["token_id"][10:20])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decode_rows_are_cache_less_forwards_over_the_batch(request, text_file, arch, temperature):
    """The rows of a round are exactly (torch.equal) what one forward without a KV cache over every prompt's
    left-padded path gives: the models re-read the paths each round, so no float rounding of earlier rounds'
    cached forwards reaches a label or a feature (BatchCachedLM's `recompute`)."""
    folder = request.getfixturevalue("tiny_pair" if arch == "gpt2" else "tiny_llama_pair")
    pair = load_pair(str(folder / "draft"), str(folder / "target"), device="cpu", dtype="float32")
    cfg = parse_collect_config(_argv(folder, text_file, "unused"))
    prompts = torch.stack([w[:10] for w in list(iter_windows(cfg, pair.tokenizer))[:3]])
    k, rounds = 4, 3  # the paths grow apart after the first round: later rounds are padded
    rows, paths = decode_rows(pair, prompts, max_new_tokens=k * rounds, k=k, temperature=temperature,
                              gen=torch.Generator().manual_seed(1), pad_id=0, eos_id=None)
    for r in range(rounds):  # no EOS: every prompt is in every round, its rows r*k .. r*k + k-1
        first = [i * k * rounds + r * k for i in range(len(paths))]
        contexts = [path[: int(rows["context_length"][j])] for path, j in zip(paths, first)]
        width = max(map(len, contexts))
        ids = torch.tensor([[0] * (width - len(c)) + c for c in contexts])
        mask = (torch.arange(width) >= torch.tensor([width - len(c) for c in contexts])[:, None]).long()
        with torch.inference_mode():
            out = pair.draft(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                             logits_to_keep=1, output_hidden_states=True)
            block = torch.stack([rows["token_id"][j: j + k] for j in first])  # (B, k)
            full = torch.cat([mask, torch.ones_like(block)], 1)
            p = probabilities(pair.target(input_ids=torch.cat([ids, block], 1), attention_mask=full,
                                          position_ids=(full.cumsum(-1) - 1).clamp_min(0),
                                          logits_to_keep=k + 1).logits[:, :k, : pair.vocab_size], temperature)
        q = probabilities(out.logits[:, -1, : pair.vocab_size], temperature)
        assert torch.equal(rows["hidden"][first], out.hidden_states[-1][:, -1])
        assert torch.equal(rows["draft_prob"][first], q.gather(-1, block[:, :1])[:, 0])
        target_prob = torch.stack([rows["target_prob"][j: j + k] for j in first])
        assert torch.equal(target_prob, p.gather(-1, block[..., None])[..., 0])


def test_decode_source_end_to_end(tiny_pair, text_file, tmp_path):
    assert _run(_argv(tiny_pair, text_file, tmp_path / "d", "--source", "decode", "--temperature", "0.8")) == 0
    manifest = read_manifest(tmp_path / "d")
    assert manifest["context_source"] == "decode" and manifest["num_samples"] == 64
    rows = _rows(tmp_path / "d")
    assert 0 <= float(rows["accept_soft"].min()) and float(rows["accept_soft"].max()) <= 1


# ------------------------------------------------------------------------------------------ resume
def test_interrupted_run_resumes_to_the_same_rows(tiny_pair, text_file, tmp_path, monkeypatch):
    assert _run(_argv(tiny_pair, text_file, tmp_path / "whole")) == 0
    real = collect_module.batch_rows
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # tiny.yaml: 4 prompts (32 rows) per batch: one shard each
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "batch_rows", interrupted)
    assert _run(_argv(tiny_pair, text_file, tmp_path / "cut")) == 130
    assert len(complete_shards(tmp_path / "cut")) == 1 and not (tmp_path / "cut" / "manifest.json").exists()
    assert _run(_argv(tiny_pair, text_file, tmp_path / "cut")) == 2  # refuses without --resume
    monkeypatch.setattr(collect_module, "batch_rows", real)
    assert _run(_argv(tiny_pair, text_file, tmp_path / "cut", "--resume")) == 0
    _assert_same_rows(_rows(tmp_path / "whole"), _rows(tmp_path / "cut"))
    assert _run(_argv(tiny_pair, text_file, tmp_path / "cut", "--resume", "--seed", "3")) == 2  # options differ


KILLED_MID_WRITE = """
import os, signal, sys
from sprinter.data.collect import collect, parse_collect_config

real_fdopen, shards = os.fdopen, []


class Dying:
    # a file whose write puts half the bytes on disk, then the process is killed: no handler, no finally runs
    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def fdopen(fd, *args, **kwargs):
    fh = real_fdopen(fd, *args, **kwargs)
    if "shard-" in os.readlink(f"/proc/self/fd/{fd}"):  # sprinter.files.write_atomic writing a shard
        shards.append(fd)
        if len(shards) == 2:
            return Dying(fh)
    return fh


os.fdopen = fdopen
collect(parse_collect_config(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the file being written through /proc")
def test_a_run_killed_mid_write_resumes_to_the_same_rows(tiny_pair, text_file, tmp_path):
    """A real SIGKILL (no exception handler, no finally, the lock file left behind) in the middle of writing the
    second shard (half its bytes on disk, through sprinter.files.write_atomic as it is): no torn file carries a
    shard's name, and --resume keeps the first shard, ignores the torn temporary file and ends with exactly the rows
    of an uninterrupted run. Linux only (/proc names the file being written)."""
    import signal
    import subprocess

    assert _run(_argv(tiny_pair, text_file, tmp_path / "whole")) == 0
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, *_argv(tiny_pair, text_file, cut)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in complete_shards(cut)] == ["shard-00000.safetensors"]
    assert not (cut / "manifest.json").exists() and [p for p in cut.iterdir() if p.name.endswith(".tmp")]
    assert _run(_argv(tiny_pair, text_file, cut, "--resume")) == 0
    _assert_same_rows(_rows(tmp_path / "whole"), _rows(cut))
    assert read_manifest(cut)["num_samples"] == read_manifest(tmp_path / "whole")["num_samples"]


def test_full_disk_is_one_clear_error_and_keeps_written_shards(tiny_pair, text_file, tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync
    calls = []

    def filling(fd):
        calls.append(1)
        if len(calls) >= 3:  # the disk fills after config.json and the first shard are written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", filling)
    assert _run(_argv(tiny_pair, text_file, tmp_path / "full")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "--resume" in errors[0]
    assert [p.name for p in complete_shards(tmp_path / "full")] == ["shard-00000.safetensors"]
    assert not [p for p in (tmp_path / "full").iterdir() if ".tmp" in p.name]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _run(_argv(tiny_pair, text_file, tmp_path / "full", "--resume")) == 0
    assert read_manifest(tmp_path / "full")["num_samples"] == 64


def test_overwrite_replaces_and_non_empty_folder_is_refused(tiny_pair, text_file, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert _run(_argv(tiny_pair, text_file, tmp_path / "o")) == 2
    assert "not empty" in capsys.readouterr().err
    assert _run(_argv(tiny_pair, text_file, tmp_path / "o", "--overwrite", "--num-prompts", "4")) == 0
    assert _run(_argv(tiny_pair, text_file, tmp_path / "o", "--overwrite", "--num-prompts", "4")) == 0
    assert read_manifest(tmp_path / "o")["num_samples"] == 32
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"  # only the stage's own files are replaced


# ------------------------------------------------------------------------------------------ bad input
def test_mismatched_vocabularies_are_refused(tiny_pair, text_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "draft"
    shutil.copytree(tiny_pair / "draft", other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    argv = _argv(tiny_pair, text_file, tmp_path / "out")
    argv[argv.index("--draft") + 1] = str(other)
    assert _run(argv) == 2
    assert "different vocabularies" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["hub", "empty", "short", "too_long"])
def test_bad_datasets_and_lengths_are_one_clear_error(tiny_pair, text_file, tmp_path, capsys, case):
    data = {"hub": "no-such-user/no-such-dataset", "empty": tmp_path / "empty", "short": tmp_path / "short.txt",
            "too_long": text_file}[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("x = 1\n")
    extra = ["--prompt-len", "250", "--max-new-tokens", "10"] if case == "too_long" else []
    assert _run(_argv(tiny_pair, data, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    expected = {"hub": "could not be loaded", "empty": "no document of at least", "short": "no document of at least",
                "too_long": "context window is 256"}[case]
    assert err.startswith("error: ") and expected in err, err


def test_non_finite_hidden_states_stop_with_a_clear_error(tiny_pair, text_file, tmp_path, monkeypatch, capsys):
    real = collect_module.batch_rows
    calls = []

    def poisoned(cfg, pair, windows, first, *rest):
        calls.append(1)
        if len(calls) == 2:
            pair.draft.transformer.ln_f.weight.data.fill_(float("nan"))
        return real(cfg, pair, windows, first, *rest)

    monkeypatch.setattr(collect_module, "batch_rows", poisoned)
    assert _run(_argv(tiny_pair, text_file, tmp_path / "nan")) == 2
    assert "NaN" in capsys.readouterr().err
    assert len(complete_shards(tmp_path / "nan")) == 1  # the first batch is kept


# ------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_two_processes_write_the_same_rows_as_one(tiny_pair, text_file, tmp_path):
    import signal
    import subprocess

    assert _run(_argv(tiny_pair, text_file, tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "scripts/collect.py"), *_argv(tiny_pair, text_file, tmp_path / "two")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)  # its own group: a hung run is killed with its workers
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-2000:]
    manifest = read_manifest(tmp_path / "two")
    assert sorted({e["rank"] for e in manifest["shards"]}) == [0, 1]
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    keys = _row_keys(two)
    assert len(set(keys.tolist())) == len(keys)  # no row twice
    _assert_same_rows(one, two)


def test_bench_collect_times_every_source_on_a_tiny_pair(tiny_pair, text_file, tmp_path):
    from sprinter.bench.collect import parse_bench_config, run_benchmark

    cfg = parse_bench_config(["--draft", str(tiny_pair / "draft"), "--target", str(tiny_pair / "target"),
                              "--dataset", str(text_file), "--split", "all", "--num-prompts", "2", "--prompt-len",
                              "16", "--max-new-tokens", "3", "--batch-size", "2", "--repeats", "1", "--threads", "1",
                              "--out", str(tmp_path)])
    report = run_benchmark(cfg)
    assert list(report["results"]) == ["release_sequential", "corpus", "decode"]
    assert all(r["rows"] == 6 for r in report["results"].values())
    assert all(a["same_tokens"] for a in report["first_row_agreement"].values())


def test_release_baseline_agrees_on_each_prompts_first_row(tiny_pair, text_file):
    from sprinter.bench.collect import release_rows
    from sprinter.data.collect import batch_rows

    pair = load_pair(str(tiny_pair / "draft"), str(tiny_pair / "target"), device="cpu", dtype="float32")
    cfg = parse_collect_config(_argv(tiny_pair, text_file, "unused"))
    windows = torch.stack(list(iter_windows(cfg, pair.tokenizer))[:2])
    base = release_rows(pair, windows[:, : cfg.prompt_len], 3)
    assert base["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    ours = batch_rows(cfg, pair, windows, 0)
    first = ours["position"] == 0
    assert torch.equal(base["token_id"][base["position"] == 0], ours["token_id"][first])
    assert torch.allclose(base["hidden"][base["position"] == 0], ours["hidden"][first], atol=1e-5)
    assert torch.allclose(base["target_prob"][base["position"] == 0], ours["target_prob"][first], atol=1e-6)
