"""The benchmark runs' prediction errors against the pooled ms/token, read from their stored files alone.

The latency model prices a row's expected cost over its expected tokens (sprinter.bench.latency): a mean, all time
over all tokens. The runs in results/{bench,demo}-{greedy,sampled,grounded} were reported against the median over
prompts of each prompt's ms/token, and on looping text the median prompt runs far faster than the pool (a prompt
whose output loops is drafted almost for free). Since commit 833d12d the benchmark reports `pooled_ms_per_token`
and measures its errors against it; these six runs were made before that, and the models they timed were lost with
their machine (checkpoints/ is not kept in git), so `--report-only` cannot rewrite their reports. This script
recomputes the pooled figure from each run's records.jsonl with the benchmark's own `summarize` and sets the
predictions that run made before timing (stored in its results.json) against it. Nothing is decoded or timed.

    python results/pooled-errors/analyse.py          # writes results/pooled-errors/results.md
"""

from __future__ import annotations

import json
from pathlib import Path

from sprinter.bench.latency import WITHIN
from sprinter.bench.report import summarize

RESULTS = Path(__file__).resolve().parent.parent
RUNS = [f"{pair}-{workload}" for workload in ("greedy", "sampled", "grounded") for pair in ("bench", "demo")]


def _error(estimate: float | None, measured: float | None) -> float | None:
    return estimate / measured - 1 if estimate is not None and measured else None


def analyse(run: str) -> dict:
    folder = RESULTS / run
    results = json.loads((folder / "results.json").read_text())
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "method" in r]
    reference = {r["prompt"]: r for r in records if r["method"] == "ar"}
    pooled = {e["name"]: summarize([r for r in records if r["method"] == e["name"]], reference)["pooled_ms_per_token"]
              for e in results["methods"]}
    ar_predicted = next(e["predicted_ms_per_token"] for e in results["methods"] if e["name"] == "ar")
    rows = []
    for e in results["methods"]:
        measured = pooled[e["name"]]
        predicted_speedup = ar_predicted / e["predicted_ms_per_token"] if e.get("predicted_ms_per_token") else None
        rows.append({
            "name": e["name"], "median_ms_per_token": e["ms_per_token"], "pooled_ms_per_token": measured,
            "predicted_ms_per_token": e.get("predicted_ms_per_token"),
            "prediction_error_median": e.get("prediction_error"),
            "prediction_error_pooled": _error(e.get("predicted_ms_per_token"), measured),
            "cost_model_error_pooled": _error(e.get("cost_model_ms_per_token"), measured),
            "speedup_prediction_error_pooled": None if e["name"] == "ar" else _error(
                predicted_speedup, pooled["ar"] / measured if measured else None),
        })
    profile = results["pair"]["cost_profile"]
    return {"run": run, "created": results["created"], "cpu": results["hardware"]["cpu"],
            "calibration_prompts": (results["prompts"].get("calibration") or {}).get("count"),
            "ar_step": "target_run_ms" if "target_run_ms" in profile else "target_ms[0] (T(1))",
            "loop_share_ar": next(e.get("repeat_output") for e in results["methods"] if e["name"] == "ar"),
            "rows": rows}


def within(rows: list[dict], key: str) -> tuple[int, int]:
    errors = [r[key] for r in rows if r[key] is not None]
    return sum(abs(x) <= WITHIN for x in errors), len(errors)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def markdown(runs: list[dict]) -> str:
    lines = ["# Prediction errors against the pooled ms/token", "",
             "Written by `python results/pooled-errors/analyse.py` from each run's stored results.json and "
             "records.jsonl (see the script's docstring for why). Predicted: the run's own prediction, made from its "
             "calibration prompts (`val` split) and its cost profile before anything was timed. "
             "Errors: predicted / measured - 1; within 25% counts |error| <= 0.25.", "",
             "| run | created | calibration prompts | ar's step priced by | loop share (ar) | predictions within 25%: "
             "median | pooled | cost model (pooled) | speedup predictions (pooled) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        counts = [within(run["rows"], key) for key in ("prediction_error_median", "prediction_error_pooled",
                                                        "cost_model_error_pooled", "speedup_prediction_error_pooled")]
        lines.append(f"| {run['run']} | {run['created'][:16]} | {run['calibration_prompts']} | {run['ar_step']} | "
                     f"{run['loop_share_ar']:.2f} | " + " | ".join(f"{n}/{t}" for n, t in counts) + " |")
    for run in runs:
        lines += ["", f"## {run['run']} ({run['cpu']})", "",
                  "| row | median ms/token | pooled ms/token | predicted | error vs median | error vs pooled "
                  "| cost model vs pooled | speedup prediction vs pooled |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in run["rows"]:
            error = r["prediction_error_pooled"]
            miss = " **miss**" if error is not None and abs(error) > WITHIN else ""
            lines.append(f"| {r['name']}{miss} | {r['median_ms_per_token']:.2f} | {r['pooled_ms_per_token']:.2f} | "
                         + (f"{r['predicted_ms_per_token']:.2f}" if r["predicted_ms_per_token"] else "-") + " | "
                         + " | ".join(_pct(r[k]) for k in ("prediction_error_median", "prediction_error_pooled",
                                                           "cost_model_error_pooled",
                                                           "speedup_prediction_error_pooled")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    runs = [analyse(run) for run in RUNS]
    here = Path(__file__).parent
    (here / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    (here / "results.md").write_text(markdown(runs))
    print(markdown(runs))


if __name__ == "__main__":
    main()
