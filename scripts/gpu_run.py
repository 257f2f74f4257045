"""Every GPU row in one prepared call (issue 18): tests, pair, data, verifier, benchmark and batch sweep on one CUDA
device, within a wall-clock limit, everything that comes back written into one folder.

    python scripts/gpu_run.py OUT                       # on a CUDA machine: all stages within --time-limit (540 s)
    python scripts/gpu_run.py OUT --smoke               # the same stages on the CPU with the tiny presets (CI)
    python scripts/gpu_run.py OUT --stages bench batch --time-limit 200   # a rerun of some stages (work dir kept)

Each stage is a subprocess of an existing entry point (scripts/make_pair.py, collect.py, train.py, benchmark.py,
bench_batch.py; `pytest -m cuda`) with its preset under configs/ (gpu.yaml; tiny.yaml with --smoke). A stage may
run until the deadline less the caps of the stages after it (STAGES), so a slow or hung stage never takes
another's time; at its limit the stage's process group gets SIGINT, then SIGKILL, and the run goes on. The
benchmark keeps its finished prompts (records.jsonl, summarised here when its report is missing) and the batch
sweep its finished cells. OUT is rewritten after every stage, so a run killed from outside still leaves what
it had: results.json (every stage's results), results.md, pareto.png, batch.png, pair.json, metrics.json and
gpu_run.log: at most 8 files, each under 16 MiB (what a device call brings back). See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
FORMAT = "sprinter-gpu-run/1"
# Stage -> cap in seconds: the time kept for it whatever the stages before it do (the full run; --smoke: SMOKE_CAPS).
STAGES = {"tests": 40, "pair": 180, "collect": 30, "train": 35, "bench": 80, "engine": 120, "batch": 45}
SMOKE_CAPS = {"tests": 25, "pair": 30, "collect": 20, "train": 30, "bench": 30, "engine": 0, "batch": 20}
TIME_LIMIT, SMOKE_TIME_LIMIT = 540, 170
RESERVE = 10  # seconds kept at the end for the last bundle
GRACE = 8  # seconds between SIGINT and SIGKILL
MIN_STAGE = 5  # a stage given less than this is skipped
LOG_LIMIT = 15 * 2**20  # the log stays under the 16 MiB a device call brings back per file
LEARNED = ("sprinter-mlp", "sprinter-linear", "sprinter-strict", "sd-gated")
OUTPUTS = ("results.json", "results.md", "pareto.png", "batch.png", "pair.json", "metrics.json", "gpu_run.log")
# What a stage's earlier run left in the work folder, removed before it runs again (the pair is reused).
STALE = {"tests": ("tests.xml",), "collect": ("data",), "train": ("verifier",), "bench": ("bench",),
         "engine": ("engine",), "batch": ("batch",)}


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    limit: float | None = None  # seconds it was given
    returncode: int | None = None
    command: str = ""
    note: str = ""


class Log:
    """gpu_run.log in OUT, echoed to stdout (the device call's output tail), capped at LOG_LIMIT bytes."""

    def __init__(self, path: Path):
        self.fh, self.written, self.lock = path.open("w", encoding="utf-8"), 0, threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            if self.written < LOG_LIMIT:
                self.fh.write(text if self.written + len(text) < LOG_LIMIT else "[log truncated at 15 MiB]\n")
                self.fh.flush()
                self.written += len(text.encode())

    def line(self, text: str) -> None:
        self.write(f"[gpu_run {time.strftime('%H:%M:%S')}] {text}\n")


# ------------------------------------------------------------------------------------------- the stages
def stage_argv(name: str, smoke: bool, work: Path) -> list[str]:
    """The command line of a stage (after the Python interpreter): an entry point with its preset."""
    pair, data, verifier = work / "pair", work / "data", work / "verifier"
    models = ["--draft", str(pair / "draft"), "--target", str(pair / "target")]
    cpu = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
    preset = "tiny" if smoke else "gpu"
    if name == "tests":
        argv = ["-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml",
                str(work / "tests.xml")]
        # test_cuda.py alone: collecting the whole suite took most of the stage's 40 s on the H100 machine
        return argv + [str(ROOT / "tests" / "test_cuda.py")]
    if name == "pair":
        smoke_pair = ["--device", "cpu", "--target-steps", "8", "--distill-steps", "4"]  # the files, not the quality
        return ["scripts/make_pair.py", "--preset", preset, "--out", str(pair)] + (smoke_pair if smoke else [])
    if name == "collect":
        argv = ["scripts/collect.py", "--config", str(CONFIGS / "collect" / f"{preset}.yaml"), *models, "--out",
                str(data), "--overwrite"]
        # The tiny pair repeats one token: sampled contexts give both classes of the sprinter label.
        return argv + [*cpu, "--num-prompts", "32", "--temperature", "1.0", "--no-progress"] if smoke else argv
    if name == "train":
        argv = ["scripts/train.py", "--config", str(CONFIGS / "train" / f"{preset}.yaml"), "--data", str(data), "--out",
                str(verifier)]
        return argv + ["--accelerator", "cpu", "--no-baselines", "--val-fraction", "0.25", "--test-fraction",
                       "0.25"] if smoke else argv
    if name == "bench":
        gpu_methods = yaml.safe_load((CONFIGS / "bench" / "gpu.yaml").read_text())["methods"]
        methods = gpu_methods if (verifier / "verifier.safetensors").is_file() else \
            [m for m in gpu_methods if m not in LEARNED]  # no verifier: the rows that need none still run
        argv = ["scripts/benchmark.py", "--config", str(CONFIGS / "bench" / f"{preset}.yaml"), "--pair", str(pair),
                "--verifier", str(verifier), "--out", str(work / name), "--overwrite", "--methods", *methods]
        return argv + [*cpu, "--num-prompts", "2", "--repeats", "1", "--calibration-prompts", "0"] if smoke else argv
    if name == "engine":  # eager vs compiled (CUDA graphs) in float32, every compiled row checked against eager
        gate = ["--verifier", str(verifier)] if (verifier / "verifier.safetensors").is_file() else []
        return ["scripts/bench_engine.py", "--pair", str(pair), *gate, "--out", str(work / "engine"), "--device",
                "cuda", "--dtype", "float32", "--num-prompts", "2", "--max-new-tokens", "64", "--repeats", "3",
                "--modes", "ar", "draft", "sd", "sprinter"]
    if name == "batch":
        argv = ["scripts/bench_batch.py", "--config", str(CONFIGS / "bench_batch" / f"{preset}.yaml"), *models,
                "--out", str(work / "batch")]
        return argv + [*cpu, "--i-knee", "4"] if smoke else argv
    raise ValueError(f"unknown stage {name!r}")  # STAGES names every stage: a bug, not bad input


def skip_reason(name: str, smoke: bool, work: Path) -> str | None:
    """Why a stage cannot run (None: it can): a missing input from an earlier stage, or no compiled engine."""
    if name == "engine" and compile_skip_reason(smoke):
        return compile_skip_reason(smoke)
    pair_ready = (work / "pair" / "pair.json").is_file()
    if name in ("collect", "bench", "engine", "batch") and not pair_ready:
        return "no pair (the pair stage did not finish)"
    if name == "train" and not (work / "data" / "manifest.json").is_file():
        return "no collected data (the collect stage did not finish)"
    return None


def compile_skip_reason(smoke: bool) -> str | None:
    if smoke:
        return "--smoke: compiling takes minutes of CPU; the compiled rows are a GPU measurement"
    return None


def run_stage(name: str, argv: list[str], limit: float, env: dict, log: Log) -> StageResult:
    """One stage as a subprocess in its own process group, its output streamed into the log; at `limit` seconds
    the group gets SIGINT (the benchmark keeps its records), then SIGKILL after GRACE seconds."""
    command = " ".join(["python", *argv])
    log.line(f"stage {name}: start, limit {limit:.0f} s: {command}")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

    def pump_output() -> None:
        for line in proc.stdout:
            log.write(line)

    pump = threading.Thread(target=pump_output, daemon=True)
    pump.start()
    status = "ok"
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        status = "timeout"
        log.line(f"stage {name}: {limit:.0f} s reached; interrupting its process group {proc.pid}")
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    pump.join(timeout=5)
    seconds = time.perf_counter() - start
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    log.line(f"stage {name}: {status} (exit code {proc.returncode}) after {seconds:.1f} s")
    return StageResult(name, status, round(seconds, 1), round(limit, 1), proc.returncode, command)


# ------------------------------------------------------------------------------------------- what comes back
def read_results(path: Path) -> dict | None:
    """A JSON file a stage wrote; None when the stage did not write it."""
    from sprinter.files import read_json

    return read_json(path, path.name) if path.is_file() else None


def test_summary(path: Path) -> dict | None:
    """Counts from pytest's JUnit XML."""
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def partial_bench(folder: Path) -> dict | None:
    """The benchmark's figures over its finished prompts (records.jsonl), for a run stopped before its report."""
    path = folder / "records.jsonl"
    by_prompt: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line the kill cut short
            continue
        by_prompt.setdefault(record["prompt"], []).append(record)
    methods = {r["method"] for records in by_prompt.values() for r in records}
    finished = {p: records for p, records in by_prompt.items() if {r["method"] for r in records} == methods}
    if "ar" not in methods or not finished:
        return None
    from sprinter.bench.report import summarize  # imports torch: only for a stopped benchmark
    reference = {p: r for p, records in finished.items() for r in records if r["method"] == "ar"}
    by_method: dict[str, list[dict]] = {}
    for p in sorted(finished):
        for record in finished[p]:
            by_method.setdefault(record["method"], []).append(record)
    return {"partial": True, "prompts": {"count": len(reference)},
            "methods": [{"name": name, **summarize(recs, reference)} for name, recs in by_method.items()]}


def bench_markdown(results: dict, folder: Path | None = None) -> str:
    """The benchmark's own results.md when it finished (in `folder`), else a table of the finished prompts."""
    if not results.get("partial"):
        if folder is not None and (folder / "results.md").is_file():
            return (folder / "results.md").read_text()
        from sprinter.bench.report import markdown

        return markdown(results)
    lines = [f"Stopped by its time budget: {results['prompts']['count']} finished prompt(s), no pareto.png.", "",
             "| method | ms/token | tokens/s | speedup vs ar | mean acc. length | target consistency |",
             "|---|" + "---:|" * 5]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for e in results["methods"]:
        lines.append(f"| {e['name']} | {fmt(e['ms_per_token'])} | {fmt(e['tokens_per_s'])} | {fmt(e['speedup_vs_ar'])} "
                     f"| {fmt(e['mean_acceptance_length'])} | {fmt(e['target_consistency'])} |")
    return "\n".join(lines) + "\n"


def device_info(smoke: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info: dict = {"mode": "smoke (CPU)" if smoke else "gpu", "python": sys.version.split()[0]}
    for package in ("torch", "transformers", "lightning"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if not smoke and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        info["gpu"] = query.stdout.strip() or query.stderr.strip()
    return info


def bundle(out: Path, work: Path, results: dict) -> None:
    """Rewrite OUT: results.json, results.md and the copies of the stages' small files."""
    from sprinter.files import write_atomic

    results["tests"] = test_summary(work / "tests.xml")
    results["pair"] = read_results(work / "pair" / "pair.json")
    metrics = read_results(work / "verifier" / "metrics.json")
    results["verifier"] = {k: metrics.get(k) for k in ("label_rule", "verifier", "splits")} if metrics else None
    results["bench"] = read_results(work / "bench" / "results.json") or partial_bench(work / "bench")
    results["engine"] = read_results(work / "engine" / "results.json")
    results["batch"] = read_results(work / "batch" / "results.json")
    copies = {"pair.json": work / "pair" / "pair.json", "metrics.json": work / "verifier" / "metrics.json",
              "pareto.png": work / "bench" / "pareto.png", "batch.png": work / "batch" / "batch.png"}
    for name, source in copies.items():
        if source.is_file() and source.stat().st_size < 16 * 2**20:
            shutil.copyfile(source, out / name)
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / "results.md", markdown(results, work))


def markdown(results: dict, work: Path) -> str:
    dev = results["device"]
    lines = [f"# GPU run ({dev['mode']})", "",
             f"{dev.get('gpu') or 'CPU'}; torch {dev['torch']}, transformers {dev['transformers']}; "
             f"{results['created']}; {results['elapsed_seconds']} s of a {results['time_limit_seconds']} s limit.", "",
             "| stage | status | seconds | limit | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit'] or '-'} | {s['note']} |"
              for s in results["stages"]]
    tests = results.get("tests")
    if tests:
        failed = f" Failed: {', '.join(tests['failed'])}." if tests["failed"] else ""
        lines += ["", f"CUDA tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped.{failed}"]
    pair = results.get("pair")
    if pair:
        step = pair["decode_step_ms"]
        lines += ["", f"Pair `{pair['preset']}`: target {pair['target_params'] / 1e6:.1f}M, draft "
                      f"{pair['draft_params'] / 1e6:.1f}M parameters; val loss {pair['target_val_loss']} / "
                      f"{pair['draft_val_loss']}; greedy agreement {pair['greedy_agreement']}; decode step "
                      f"{step['target']} / {step['draft']} ms ({step['ratio']}x, {step['device']}); steps run "
                      f"{pair.get('steps_run')}; training {pair['training_seconds']} s."]
    verifier = results.get("verifier")
    if verifier and verifier.get("verifier"):
        lines += ["", f"Verifier ({verifier['label_rule']} label): test AUROC {verifier['verifier'].get('auroc')}."]
    if results.get("bench"):
        lines += ["", "## Benchmark (eager)", "", bench_markdown(results["bench"], work / "bench")]
    if results.get("engine") and (work / "engine" / "results.md").is_file():
        lines += ["", (work / "engine" / "results.md").read_text().replace("# Engine", "## Engine", 1)]
    if results.get("batch"):
        if results["batch"].get("partial"):
            from sprinter.bench.batch import markdown as batch_markdown  # imports torch: only for a stopped sweep

            lines += ["", "## Batch sweep (stopped by its time budget: the finished cells)", "",
                      batch_markdown(results["batch"])]
        else:
            lines += ["", "## Batch sweep", "", (work / "batch" / "results.md").read_text()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Every GPU row in one prepared call (docs/gpu.md).")
    parser.add_argument("out", help="folder for what comes back: results.json, results.md, PNGs, pair.json, "
                                    "metrics.json, gpu_run.log")
    parser.add_argument("--smoke", action="store_true", help="the same stages on the CPU with the tiny presets (CI)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run")
    parser.add_argument("--time-limit", type=float, default=None,
                        help=f"wall-clock seconds for the whole run (default {TIME_LIMIT}; --smoke {SMOKE_TIME_LIMIT})")
    parser.add_argument("--work", default=None, help="folder of the pair, data, verifier and raw results (default "
                                                     "checkpoints/gpu_run; --smoke: a temporary folder)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    limit = args.time_limit or (SMOKE_TIME_LIMIT if args.smoke else TIME_LIMIT)
    if limit <= RESERVE + MIN_STAGE:
        parser.error(f"--time-limit: got {limit:g}; expected more than {RESERVE + MIN_STAGE} seconds")
    caps = SMOKE_CAPS if args.smoke else STAGES
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    temporary = args.smoke and args.work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_run-") if temporary else args.work or ROOT / "checkpoints" / "gpu_run")
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a machine with a GPU
    for name in OUTPUTS:  # a file an earlier run left in OUT must not pass for this one's
        (out / name).unlink(missing_ok=True)
    log = Log(out / "gpu_run.log")
    results = {"format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": device_info(args.smoke), "time_limit_seconds": limit, "work": str(work), "stages": []}
    log.line(f"{results['device']}; limit {limit:g} s; out {out}; work {work}")
    deadline = start + limit - RESERVE
    chosen = [name for name in STAGES if name in args.stages]
    # A stage that cannot run whatever the others do keeps no time for itself.
    never = {name for name in chosen if name == "engine" and compile_skip_reason(args.smoke)}
    try:
        for i, name in enumerate(chosen):
            reason = skip_reason(name, args.smoke, work)
            later = sum(caps[n] for n in chosen[i + 1:] if n not in never)
            given = deadline - time.perf_counter() - later
            if reason is None and given < MIN_STAGE:
                reason = f"no time left ({given:.0f} s after keeping {later} s for the stages after it)"
            if reason is not None:
                log.line(f"stage {name}: skipped: {reason}")
                result = StageResult(name, "skipped", note=reason)
            else:
                for stale in STALE.get(name, ()):  # what an earlier run left must not pass for this one's
                    if (work / stale).is_dir():
                        shutil.rmtree(work / stale)
                    else:
                        (work / stale).unlink(missing_ok=True)
                result = run_stage(name, stage_argv(name, args.smoke, work), given, env, log)
            results["stages"].append(dataclasses.asdict(result))
            results["elapsed_seconds"] = round(time.perf_counter() - start, 1)
            try:
                bundle(out, work, results)
            except Exception as err:  # a report that cannot be written must not stop the stages after it
                log.line(f"writing {out} after stage {name} failed: {type(err).__name__}: {err}")
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    failed = [s["name"] for s in results["stages"] if s["status"] in ("failed", "timeout")]
    verdict = f"not ok: {failed}" if failed else "every stage that ran is ok"
    written = sorted(p.name for p in out.iterdir())
    log.line(f"done in {time.perf_counter() - start:.0f} s; {verdict}; written: {written}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
