"""scripts/gpu_run.py: a stage over its limit is stopped and the run goes on; a stopped benchmark is summarised
from its records; and --smoke runs every stage end to end on the CPU with the tiny presets (what a device call
runs, known to work before any device is lent)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "scripts" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(spec)
sys.modules["gpu_run"] = gpu_run  # its dataclass looks its module up there
spec.loader.exec_module(gpu_run)


def test_the_caps_fit_the_limits():
    """9 minutes on a device (a 10-minute command, with room for the transfers); 3 minutes in CI."""
    assert sum(gpu_run.STAGES.values()) + gpu_run.RESERVE <= gpu_run.TIME_LIMIT <= 540
    assert sum(gpu_run.SMOKE_CAPS.values()) + gpu_run.RESERVE <= gpu_run.SMOKE_TIME_LIMIT < 180


@pytest.mark.parametrize("smoke", [False, True])
def test_every_stage_command_parses_into_its_config(smoke, tmp_path):
    """The presets and flags each stage passes are valid options of its entry point (no model is loaded)."""
    from sprinter.bench.batch import BatchBenchConfig
    from sprinter.bench.benchmark import BenchConfig
    from sprinter.config import parse_config
    from sprinter.data.collect import parse_collect_config
    from sprinter.pairs.build import parse_pair_config
    from sprinter.train.fit import parse_train_config

    argv = {name: gpu_run.stage_argv(name, smoke, tmp_path)[1:] for name in gpu_run.STAGES}
    assert parse_pair_config(argv["pair"]).preset == ("tiny" if smoke else "gpu")
    assert parse_collect_config(argv["collect"]).out == str(tmp_path / "data")
    assert parse_train_config(argv["train"]).data == (str(tmp_path / "data"),)
    bench = parse_config(BenchConfig, argv["bench"], "test")
    assert bench.dtype == ("float32" if smoke else "bfloat16") and "sprinter-mlp" not in bench.methods  # no verifier
    assert parse_config(BatchBenchConfig, argv["batch"], "test").out == str(tmp_path / "batch")
    if not smoke:
        gpu = parse_pair_config(argv["pair"])
        assert gpu.target_layers * gpu.target_width ** 2 * 12 > 80e6  # GPT-2 Small's blocks at least
        assert gpu.target_max_seconds + gpu.distill_max_seconds < gpu_run.STAGES["pair"] - 30  # room to set up and save


def test_a_stage_over_its_limit_is_stopped(tmp_path):
    log = gpu_run.Log(tmp_path / "log")
    result = gpu_run.run_stage("sleepy", ["-c", "import time; print('started', flush=True); time.sleep(120)"], 2.0,
                               dict(os.environ), log)
    assert result.status == "timeout" and result.seconds < 2 + gpu_run.GRACE + 5
    assert "started" in (tmp_path / "log").read_text()
    failed = gpu_run.run_stage("broken", ["-c", "raise SystemExit(3)"], 30.0, dict(os.environ), log)
    assert failed.status == "failed" and failed.returncode == 3


def test_a_stopped_benchmark_is_summarised_from_its_records(tmp_path):
    def record(prompt: int, method: str, seconds: float) -> dict:
        return {"prompt": prompt, "domain": "code", "method": method, "tokens": [1, 2, 3, 4],
                "stats": {"new_tokens": 4, "wall_seconds": seconds, "target_calls": 4 if method == "ar" else 2,
                          "accepted": 0 if method == "ar" else 2},
                "fidelity": {"tokens": 4, "consistent": 4, "nll_sum": 2.0}, "rouge_l_vs_ar": 1.0,
                "exact_match_vs_ar": True}

    records = [record(p, m, 0.4 if m == "ar" else 0.2) for p in (0, 1) for m in ("ar", "sd-k4")]
    lines = [json.dumps(r) for r in records] + [json.dumps(record(2, "ar", 0.4)), '{"prompt": 2, "meth']  # a kill
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    summary = gpu_run.partial_bench(tmp_path)
    assert summary["partial"] is True and summary["prompts"]["count"] == 2
    sd = {e["name"]: e for e in summary["methods"]}["sd-k4"]
    assert sd["speedup_vs_ar"] == pytest.approx(2.0) and sd["mean_acceptance_length"] == pytest.approx(2.0)
    assert "| sd-k4 | 50.00 |" in gpu_run.bench_markdown(summary)
    assert gpu_run.partial_bench(tmp_path / "nothing") is None


@pytest.mark.slow
def test_smoke_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    # The smoke run keeps within 170 s on a quiet 2-core machine (~60 s of CPU); the generous limit here keeps a
    # busy CI machine from failing a stage on time alone (the time caps have a test of their own above).
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_run.py"), str(out), "--smoke", "--work",
                           str(tmp_path / "work"), "--time-limit", "900"], capture_output=True, text=True, timeout=1000)
    results = json.loads((out / "results.json").read_text())
    stages = {s["name"]: s for s in results["stages"]}
    assert proc.returncode == 0, [(s["name"], s["status"], s["note"]) for s in results["stages"]]
    assert list(stages) == list(gpu_run.STAGES)
    assert stages["engine"]["status"] == "skipped" and "--smoke" in stages["engine"]["note"]
    assert all(s["status"] == "ok" for name, s in stages.items() if name != "engine")
    # What a device call brings back: at most 8 files, each under 16 MiB, no folders.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["batch.png", "gpu_run.log", "metrics.json", "pair.json", "pareto.png", "results.json",
                     "results.md"]
    assert all((out / f).is_file() and (out / f).stat().st_size < 16 * 2**20 for f in files)
    assert results["format"] == gpu_run.FORMAT and results["tests"]["skipped"] == results["tests"]["tests"] > 0
    assert results["pair"]["preset"] == "tiny" and results["verifier"]["verifier"]["auroc"] is not None
    names = {e["name"] for e in results["bench"]["methods"]}
    assert {"ar", "sd-k2", "ngram", "sprinter-mlp@0.05", "sd-gated@0.3", "auto"} <= names
    assert not results["batch"]["partial"] and set(results["batch"]["cells"]["code"]) == {"1", "3"}
    report = (out / "results.md").read_text()
    assert "| bench | ok |" in report and "## Batch sweep" in report and "sprinter-mlp@0.05" in report
