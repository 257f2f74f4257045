"""The benchmark: fidelity metrics with known answers, the results schema, a 2-prompt smoke run on the tiny pair."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from sprinter.bench.benchmark import BenchConfig, run_benchmark
from sprinter.bench.fidelity import (
    exact_match,
    first_difference,
    lcs_length,
    rouge_l,
    target_consistency,
    total_nll,
)
from sprinter.bench.protocol import Prompt, check_lossless, load_prompts
from sprinter.bench.report import METHOD_KEYS, check_results
from sprinter.config import parse_config
from sprinter.errors import SprinterError
from sprinter.verifier import Verifier, VerifierInfo, default_arch, save_verifier


@pytest.mark.parametrize("a, b, expected", [
    ("ABCBDAB", "BDCABA", 4), ("", "abc", 0), ("abc", "abc", 3), ("abc", "def", 0), ("axbycz", "abc", 3)])
def test_lcs_length(a, b, expected):
    assert lcs_length(list(a), list(b)) == expected
    assert lcs_length(list(b), list(a)) == expected


def test_rouge_l_known_values():
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)  # LCS 3: P = R = 3/4
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 1, R = 1/2
    assert rouge_l([7, 7], [7, 7]) == 1.0
    assert rouge_l([], []) == 1.0
    assert rouge_l([1], []) == 0.0
    assert rouge_l([1, 2], [3, 4]) == 0.0


def test_exact_match_and_first_difference():
    assert exact_match([1, 2], (1, 2)) and not exact_match([1, 2], [1, 2, 3])
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_target_consistency_and_nll_on_hand_made_logits():
    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # argmax 1, 0, 2
    assert target_consistency(logits, torch.tensor([1, 2, 2])) == (2, 3)
    uniform = torch.zeros(5, 4)
    assert total_nll(uniform, torch.tensor([0, 1, 2, 3, 0])) == pytest.approx(5 * math.log(4))
    two = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert total_nll(two, torch.tensor([1])) == pytest.approx(math.log(4))


# ------------------------------------------------------------------------------------------- the runner
ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "bench" / "tiny.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the benchmark sets its own thread count


@pytest.fixture(scope="module")
def verifier(tiny_pair, tmp_path_factory):
    """A hand-made calibrated verifier for the tiny draft (random weights; thresholds chosen so that both
    flagged and passed tokens occur) with the paper's linear baseline beside it: the learned path in seconds."""
    hidden = AutoConfig.from_pretrained(tiny_pair / "draft").hidden_size
    out = tmp_path_factory.mktemp("verifier")
    torch.manual_seed(0)
    for folder, arch, features in ((out, default_arch(width=8, depth=1), ("hidden", "draft_prob")),
                                   (out / "baselines" / "linear", default_arch(depth=0), ("hidden",))):
        info = VerifierInfo(features=features, hidden_size=hidden, arch=arch, thresholds={"0.05": 0.6, "0.2": 0.4},
                            default_budget=0.05, default_threshold=0.6)
        save_verifier(folder, Verifier(info), info)
    return out


def bench_args(tiny_pair, verifier, out, *extra):
    return ["--config", TINY, "--pair", str(tiny_pair), "--verifier", str(verifier), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def smoke(tiny_pair, verifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = parse_config(BenchConfig, bench_args(tiny_pair, verifier, out, "--methods", *BenchConfig().methods),
                       "test")
    return out, run_benchmark(cfg)


def test_smoke_run_writes_every_output_with_the_schema(smoke):
    out, results = smoke
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "pareto.png", "records.jsonl", "run.json"}
    on_disk = json.loads((out / "results.json").read_text())
    check_results(on_disk)
    assert on_disk["prompts"]["count"] == 2 and on_disk["prompts"]["domains"] == {"code": 1, "prose": 1}
    assert on_disk["temperature"] == 0.0 and on_disk["hardware"]["dtype"] == "float32"
    names = [m["name"] for m in on_disk["methods"]]
    assert names == ["ar", "draft", "sd-k2", "sd-k4", "hf-assisted", "ngram", "ngram-8", "sd-gated@0.3", "sd-gated@0.7",
                     "sd-gated-confidence@0.3", "sd-gated-confidence@0.7", "sprinter-strict@0.05", "sprinter-mlp@0.05",
                     "sprinter-mlp@0.2", "sprinter-linear@0.05", "sprinter-linear@0.2", "sprinter-confidence@0.4",
                     "auto", "auto@0.05", "auto@0.2"]
    by_name = {m["name"]: m for m in on_disk["methods"]}
    ar = by_name["ar"]
    assert ar["speedup_vs_ar"] == pytest.approx(1.0) and ar["target_calls_per_token"] == 1.0
    assert ar["target_consistency"] == 1.0 and ar["target_nll_ratio_vs_ar"] == pytest.approx(1.0)
    assert ar["mean_acceptance_length"] == 1.0
    for m in on_disk["methods"]:
        assert set(METHOD_KEYS) <= set(m)
        if m["lossless"]:  # checked token for token during the run
            assert m["exact_match_vs_ar"] == 1.0 and m["rouge_l_vs_ar"] == 1.0
    best = [m["name"] for m in on_disk["methods"] if m.get("best")]  # one per lossless family with operating points
    assert [name.split("@")[0].rsplit("-k", 1)[0] for name in best] == ["sd", "sd-gated", "sd-gated-confidence"]
    assert on_disk["recommended_stop_threshold"] == by_name[best[1]]["operating_point"]
    assert by_name["sd-gated@0.3"]["lossless"] is True
    assert by_name["draft"]["target_calls_per_token"] == 0
    assert by_name["sprinter-mlp@0.05"]["lossless"] is False and by_name["sprinter-strict@0.05"]["lossless"] is True
    assert by_name["auto"]["lossless"] is True and by_name["auto@0.05"]["lossless"] is False
    assert "| sd-k" in (out / "results.md").read_text()
    # the latency model's prediction beside each measurement (async aside), and the pair's two regime figures
    assert all(m["predicted_ms_per_token"] > 0 for m in on_disk["methods"])
    assert on_disk["pair"]["draft_target_cost_ratio"] > 0 and "greedy_agreement" in on_disk["pair"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(names)
    # issue 24: two timed repeats per prompt, intervals and ties, loop shares beside the corpus text's, predictions
    # from a calibration prompt (val split) beside the same-run cost model, and the fixed ngram-8 rival
    assert on_disk["workload"] == "greedy" and on_disk["repeats"] == 2 and on_disk["prompts"]["calibration"] == \
        {"split": "val", "count": 1}
    assert all(len(r["timings"]) == 2 for r in records)
    calibration = json.loads((out / "calibration.json").read_text())  # read back by --resume
    assert 0 <= on_disk["pair"]["auto_draft_prior"] <= 1  # auto starts from the calibration's sd acceptance
    assert list(calibration) == names and all(len(runs) == 1 for runs in calibration.values())
    for m in on_disk["methods"]:
        lo, hi = m["speedup_interval"]
        assert lo <= m["speedup_vs_ar"] <= hi and isinstance(m["tie"], bool)
        assert all(0 <= m[k] <= 1 for k in ("repeat_prompt", "repeat_output", "periodic_tail"))
        assert m["cost_model_ms_per_token"] > 0 and m["cost_model_error"] is not None
    assert set(on_disk["reference"]) == {"repeat_prompt", "repeat_output", "periodic_tail"}
    assert on_disk["reference"]["repeat_output"] is not None and on_disk["distribution_check"] is None
    ngram8 = [r for r in records if r["method"] == "ngram-8"]
    assert all(set(r["stats"]["modes"]) <= {"ngram-k8"} for r in ngram8) and by_name["ngram-8"]["lossless"]
    text = (out / "results.md").read_text()
    assert "corpus text" in text and "Within 25% of the measured (pooled) ms/token" in text
    assert "Workload **greedy**" in text
    for m in on_disk["methods"]:  # the model prices all time over all tokens: its errors are against that mean
        rounds = [t for r in records if r["method"] == m["name"] for t in r["timings"]]
        pooled = 1000 * sum(t["wall_seconds"] for t in rounds) / sum(t["new_tokens"] for t in rounds)
        assert m["pooled_ms_per_token"] == pytest.approx(pooled)
        assert m["prediction_error"] == pytest.approx(m["predicted_ms_per_token"] / pooled - 1)


def test_report_only_rewrites_the_reports_with_the_stored_profile(smoke, tiny_pair, verifier, tmp_path, monkeypatch):
    import sprinter.bench.benchmark as benchmark

    out, results = smoke
    args = bench_args(tiny_pair, verifier, tmp_path, "--methods", *BenchConfig().methods, "--report-only")
    with pytest.raises(SprinterError, match=r"report_only: .*\(no results.json\); expected the --out of a finished"):
        run_benchmark(parse_config(BenchConfig, args, "test"))
    for name in ("run.json", "records.jsonl", "calibration.json", "results.json"):
        (tmp_path / name).write_text((out / name).read_text())
    records = (tmp_path / "records.jsonl").read_text()

    def no_timing(*args, **kwargs):
        raise AssertionError("--report-only measured a profile")

    monkeypatch.setattr(benchmark, "measure_costs", no_timing)
    again = run_benchmark(parse_config(BenchConfig, args, "test"))
    assert (tmp_path / "records.jsonl").read_text() == records  # nothing decoded, nothing appended
    assert again["pair"]["cost_profile"] == results["pair"]["cost_profile"]
    assert again["elapsed_seconds"] == results["elapsed_seconds"]
    assert [m["predicted_ms_per_token"] for m in again["methods"]] == pytest.approx(
        [m["predicted_ms_per_token"] for m in results["methods"]])
    lines = records.splitlines()  # a run that did not finish is refused
    (tmp_path / "records.jsonl").write_text("\n".join(lines[:len(lines) // 2]) + "\n")
    with pytest.raises(SprinterError, match=r"report_only: 1 of 2 prompts .* not finished; expected a finished run"):
        run_benchmark(parse_config(BenchConfig, args, "test"))


def test_resume_keeps_finished_prompts_and_reruns_only_the_rest(smoke, tiny_pair, verifier, tmp_path):
    out, _ = smoke
    for name in ("run.json", "records.jsonl"):
        (tmp_path / name).write_text((out / name).read_text())
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    first = [line for line in lines if json.loads(line)["prompt"] == 0]
    # A run killed during prompt 1: prompt 0 complete, one record of prompt 1.
    partial = first + [next(line for line in lines if json.loads(line)["prompt"] == 1)]
    (tmp_path / "records.jsonl").write_text("\n".join(partial) + "\n")
    args = bench_args(tiny_pair, verifier, tmp_path, "--methods", *BenchConfig().methods)
    with pytest.raises(SprinterError, match="--resume"):
        run_benchmark(parse_config(BenchConfig, args, "test"))
    results = run_benchmark(parse_config(BenchConfig, args + ["--resume"], "test"))
    assert results["prompts"]["count"] == 2
    kept = (tmp_path / "records.jsonl").read_text().splitlines()
    assert kept[:len(first)] == first and len(kept) == 2 * len(first)
    with pytest.raises(SprinterError, match="other options"):
        run_benchmark(parse_config(BenchConfig, args + ["--resume", "--max-new-tokens", "5"], "test"))


def test_resume_after_a_torn_last_line_reruns_that_prompt_and_says_so(smoke, tiny_pair, verifier, tmp_path, capsys):
    out, _ = smoke
    for name in ("run.json", "records.jsonl"):
        (tmp_path / name).write_text((out / name).read_text())
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # kill -9 mid-write
    args = bench_args(tiny_pair, verifier, tmp_path, "--methods", *BenchConfig().methods, "--resume")
    results = run_benchmark(parse_config(BenchConfig, args, "test"))
    said = capsys.readouterr().err
    assert "resume: dropped the torn last line" in said and "resume: prompt 1 had not finished; it runs again" in said
    kept = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(kept) == len(lines) and [r["prompt"] for r in kept] == sorted(r["prompt"] for r in kept)
    assert results["prompts"]["count"] == 2


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="names a file descriptor's file through /proc")
def test_a_full_disk_during_the_run_is_one_line_and_resume_finishes(tiny_pair, verifier, tmp_path, monkeypatch,
                                                                     capsys):
    import errno

    from sprinter.bench import protocol
    from sprinter.errors import run_cli

    fsync = protocol.os.fsync

    def full(fd):  # the disk fills up while the first prompt's records are appended
        if os.readlink(f"/proc/self/fd/{fd}").endswith("records.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    args = bench_args(tiny_pair, verifier, tmp_path, "--methods", "ar", "sd", "--ks", "2")
    with monkeypatch.context() as patch:
        patch.setattr(protocol.os, "fsync", full)
        assert run_cli(lambda argv: run_benchmark(parse_config(BenchConfig, argv, "test")), args) == 2
    said = capsys.readouterr().err
    errors = [line for line in said.splitlines() if line.startswith("error:")]  # other lines: loading bars
    assert len(errors) == 1 and errors[0].startswith("error: appending to") and "No space left on device" in errors[0]
    assert "--resume" in errors[0] and "Traceback" not in said and not (tmp_path / "results.json").exists()
    results = run_benchmark(parse_config(BenchConfig, args + ["--resume"], "test"))
    assert results["prompts"]["count"] == 2


def test_prompts_alternate_domains_from_the_test_split(tiny_pair):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair / "target")
    prompts = load_prompts(tokenizer, num_prompts=5, prompt_len=16)
    assert [p.domain for p in prompts] == ["code", "prose", "code", "prose", "code"]
    assert all(len(p.ids) == 16 for p in prompts) and len({p.ids for p in prompts}) == 5
    assert all(p.doc.startswith("stdlib/") for p in prompts)


def test_a_lossless_method_that_differs_from_ar_fails_loudly():
    prompt = Prompt(3, "code", "stdlib/x.py", (1, 2))
    with pytest.raises(SprinterError, match="sd-k4 is lossless .* on prompt 3 at new token 2"):
        check_lossless("sd-k4", [5, 6, 7], [5, 6, 8], where=f"prompt {prompt.index}")
    assert check_lossless("sd-k4", [5, 6], [5, 6], where="prompt 3") is None


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ar", "beam"], "methods: got"),
    (["--methods", "sd"], "expected 'ar' among them"),
    (["--ks", "0"], "k: got 0"),
    (["--domains", "poetry"], "domains: got"),
    (["--num-prompts", "0"], "num_prompts: got 0"),
    (["--budgets", "1.5"], "threshold: got 1.5"),
    (["--resume", "--overwrite"], "at most one"),
    (["--stop-thresholds", "2"], "threshold: got 2"),
    (["--methods", "ar", "sd", "--store-stop-threshold"], "expected 'sd-gated' among them"),
    (["--workload", "chat"], "workload: got 'chat'"),
    (["--repeats", "0"], "repeats: got 0"),
    (["--calibration-split", "test"], "calibration_split: got 'test', the timed prompts' split"),
    (["--top-p", "0"], "top_p: got 0"),
])
def test_bad_options_are_refused(argv, message):
    with pytest.raises(SprinterError, match=message):
        parse_config(BenchConfig, ["--config", TINY, *argv], "test")


def test_missing_verifier_says_how_to_make_one(tiny_pair, tmp_path):
    cfg = parse_config(BenchConfig, bench_args(tiny_pair, tmp_path / "none", tmp_path / "out"), "test")
    with pytest.raises(SprinterError, match="scripts/train.py .*--methods ar draft sd hf-assisted sprinter-confidence"):
        run_benchmark(cfg)
    assert not (tmp_path / "out").exists()  # refused before any model was loaded


def test_budgets_the_checkpoint_lacks_are_refused(tiny_pair, verifier, tmp_path):
    cfg = parse_config(BenchConfig, bench_args(tiny_pair, verifier, tmp_path, "--budgets", "0.07"), "test")
    with pytest.raises(SprinterError, match=r"budgets: got \[0.07\].*expected some of \['0.05', '0.2'\]"):
        run_benchmark(cfg)


def test_every_bench_preset_parses():
    import yaml

    paths = sorted((ROOT / "configs" / "bench").glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = parse_config(BenchConfig, ["--config", str(path)], "test")
        for key, value in yaml.safe_load(path.read_text()).items():  # each value the preset states is the one used
            got = getattr(cfg, key.replace("-", "_"))
            if isinstance(got, (list, tuple)):
                got, value = tuple(got), tuple(value)
            assert got == value or str(got) == str(value), (path.name, key, got, value)


def test_a_greedy_lossless_row_must_repeat_its_tokens_in_every_round():
    from itertools import count

    from sprinter.bench.benchmark import run_prompt
    from sprinter.bench.protocol import Method

    calls = count()
    methods = [Method("ar", "ar", True, lambda ids, seed, n: ([1, 2, 3], {"wall_seconds": 0.1, "new_tokens": 3})),
               Method("sd-k2", "sd", True, lambda ids, seed, n: ([1, 2, next(calls)], {"wall_seconds": 0.1,
                                                                                     "new_tokens": 3}), 2)]

    class Bar:
        def set_postfix_str(self, _): ...

        def update(self, _): ...

    cfg = BenchConfig(workload="greedy", repeats=2)
    with pytest.raises(SprinterError, match=r"sd-k2: repeat 1 of prompt 0 \(code, doc\) gave other tokens"):
        run_prompt(cfg, None, Prompt(0, "code", "doc", (5, 6)), methods, Bar())


def test_a_sampling_run_checks_lossless_rows_in_distribution(tiny_pair, verifier, tmp_path):
    args = bench_args(tiny_pair, verifier, tmp_path, "--workload", "sampled", "--methods", "ar", "sd", "hf-assisted",
                      "sprinter-confidence")
    cfg = parse_config(BenchConfig, args, "test")
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens) == (0.8, 0.95, 12)  # the preset's length is kept
    results = run_benchmark(cfg)
    check_results(results)
    assert results["temperature"] == 0.8 and results["top_p"] == 0.95 and results["workload"] == "sampled"
    lossless = {m["name"] for m in results["methods"] if m["lossless"]}
    assert lossless == {"ar", "sd-k2", "sd-k4", "hf-assisted"}
    check = results["distribution_check"]
    assert set(check) == lossless - {"ar"} and all(c["passed"] and c["prompts"] == 2 for c in check.values())
    text = (tmp_path / "results.md").read_text()
    assert "not checked" in text and "Distribution check" in text and "Workload **sampled**" in text


def test_a_distribution_check_failure_stops_the_run_after_writing_the_reports(tiny_pair, verifier, tmp_path,
                                                                            monkeypatch):
    import sprinter.bench.distribution as distribution

    def failing(rows, *, alpha):
        return {name: {"p_nll": 1e-9, "p_tokens": 0.5, "threshold": alpha / 2, "prompts": 2, "smallest_p": 0.5,
                       "passed": False} for name in rows}

    monkeypatch.setattr(distribution, "distribution_check", failing)
    args = bench_args(tiny_pair, verifier, tmp_path, "--workload", "sampled", "--methods", "ar", "sd", "--ks", "2",
                      "--repeats", "1", "--calibration-prompts", "0")
    with pytest.raises(SprinterError, match=r"distribution check: sd-k2 p_nll=1e-09.*expected lossless rows"):
        run_benchmark(parse_config(BenchConfig, args, "test"))
    assert "FAILED" in (tmp_path / "results.md").read_text()


def test_the_grounded_workload_cuts_functions_and_says_so(tiny_pair, verifier, tmp_path):
    args = bench_args(tiny_pair, verifier, tmp_path, "--workload", "grounded", "--methods", "ar", "ngram-8",
                      "--repeats", "1", "--calibration-prompts", "0", "--prompt-len", "64")
    results = run_benchmark(parse_config(BenchConfig, args, "test"))
    assert results["workload"] == "grounded" and results["prompts"]["domains"] == {"code": 2}
    assert "grounded: the continuation of a stdlib function" in (tmp_path / "results.md").read_text()
    run = json.loads((tmp_path / "run.json").read_text())
    assert all(":" in doc for _, doc, _ in run["prompts"])  # FILE:FUNCTION


def test_script_refuses_a_missing_verifier_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--verifier", str(tmp_path / "none"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("error: verifier: got")
    assert len(run.stderr.strip().splitlines()) == 1 and "scripts/train.py" in run.stderr


def test_the_fastest_stop_threshold_is_stored_with_its_verifier(tiny_pair, verifier, tmp_path):
    import shutil

    from sprinter.decode.decoder import STOP_THRESHOLD, Decoder
    from sprinter.verifier import read_info

    stop = tmp_path / "stop"
    shutil.copytree(verifier / "baselines" / "linear", stop)  # a separate stop verifier, as a soft-label one would be
    args = bench_args(tiny_pair, verifier, tmp_path / "out", "--methods", "ar", "sd-gated", "--stop-thresholds", "0.2",
                      "0.6", "--stop-verifier", str(stop), "--store-stop-threshold")
    results = run_benchmark(parse_config(BenchConfig, args, "test"))
    chosen = results["recommended_stop_threshold"]
    assert chosen in (0.2, 0.6) and read_info(stop).stop_threshold == chosen
    assert read_info(verifier).stop_threshold is None  # the other checkpoint is untouched
    decoder = Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), verifier=stop, device="cpu")
    assert decoder.stop_threshold(None, decoder.gate) == chosen and decoder.stop_threshold(0.9, decoder.gate) == 0.9
    assert decoder.stop_threshold(None, None) == STOP_THRESHOLD  # another gate: the library default
