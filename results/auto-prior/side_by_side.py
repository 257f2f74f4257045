"""`auto`'s controller variants side by side in one run on `val` prompts (never the benchmark's `test` prompts), with
`ar` and the fixed rows auto competes with (sd-k2, sd-k4, ngram-8 on auto's loop), under one workload.

The variants differ only in the draft model's acceptance estimate (sprinter.decode.auto): how fast it forgets
(`draft_decay`), whether it goes back toward its prior while the draft is not observed (`relax` per ar or n-gram
round; 1: it waits for a probe), and which prior it starts from (the pair's, here the benchmark run's calibration
prior, or the request's own: its prompt's teacher-forced acceptance, `prompt_prior`). Each prompt runs every row
REPEATS times, the rows' order rotated each round (as the benchmark does); the controller's profile and pair prior
are the benchmark run's own (results/P-W/results.json). No verifier is loaded (no sd-gated candidate), the same
for every variant. Speedup: ar's ms/token over the row's, the median over prompts x repeats with its bootstrap 90%
interval; pooled: all time over all tokens.

    python results/auto-prior/side_by_side.py demo sampled     # about 5 minutes; writes demo-sampled.json
    python results/auto-prior/side_by_side.py report           # the table over every P-W.json here
"""

from __future__ import annotations

import collections
import dataclasses
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from sprinter import Decoder
from sprinter.bench.protocol import rotated
from sprinter.bench.spread import bootstrap_interval
from sprinter.bench.workloads import resolve, workload_prompts
from sprinter.decode.costs import CostProfile

PROMPTS, REPEATS = 12, 3
HERE = Path(__file__).parent
VARIANTS = {  # name: the controller's fields
    "auto (as it was: decay 0.7, waits for a probe, pair prior)": dict(draft_decay=0.7, relax=1.0, prompt_prior=False),
    "auto (decay 0.9, back toward the pair prior 0.9)": dict(draft_decay=0.9, relax=0.9, prompt_prior=False),
    "auto (decay 0.9, back toward the prompt prior 0.9)": dict(draft_decay=0.9, relax=0.9, prompt_prior=True),
}


def cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def measure(pair: str, workload_name: str) -> None:
    torch.set_num_threads(1)
    run = json.loads((HERE.parent / f"{pair}-{workload_name}" / "results.json").read_text())
    workload = resolve(workload_name)
    root = Path("checkpoints/pairs") / pair
    decoder = Decoder.from_pretrained(root / "draft", root / "target", device="cpu", dtype="float32")
    decoder.profile = CostProfile.from_dict(run["pair"]["cost_profile"])
    decoder.draft_prior = run["pair"]["auto_draft_prior"]
    make_controller = decoder.make_controller
    prompts = workload_prompts(workload, decoder.tokenizer, dataset="stdlib", split="val", domains=("code", "prose"),
                               num_prompts=PROMPTS, prompt_len=64, continuation_len=workload.max_new_tokens)
    rows = {"ar": (dict(mode="ar"), None), "sd-k2": (dict(mode="sd", k=2), None), "sd-k4": (dict(mode="sd", k=4), None),
            "ngram-8": (dict(mode="auto", auto_candidate="ngram-k8"), None),
            **{name: (dict(mode="auto"), fields) for name, fields in VARIANTS.items()}}
    sampling = dict(temperature=workload.temperature, top_p=workload.top_p, max_new_tokens=workload.max_new_tokens)
    decoder.generate(list(prompts[0].ids), mode="auto", **{**sampling, "max_new_tokens": 16})  # warm-up
    ms: dict[str, list[float]] = collections.defaultdict(list)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    modes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for prompt in prompts:
        for round_ in range(REPEATS):
            for name in rotated(list(rows), prompt.index * REPEATS + round_):
                options, fields = rows[name]
                decoder.make_controller = (make_controller if fields is None else
                                           lambda opts, f=fields: dataclasses.replace(make_controller(opts), **f))
                out = decoder.generate(list(prompt.ids), seed=prompt.index, **options, **sampling)
                ms[name].append(1e3 * out.stats.wall_seconds / out.stats.new_tokens)
                totals[name][0] += 1e3 * out.stats.wall_seconds
                totals[name][1] += out.stats.new_tokens
                modes[name].update(out.stats.modes or {})
    decoder.make_controller = make_controller
    result = {"pair": pair, "workload": workload_name, "split": "val", "prompts": len(prompts), "repeats": REPEATS,
              "max_new_tokens": workload.max_new_tokens, "temperature": workload.temperature, "top_p": workload.top_p,
              "cpu": cpu(), "torch": torch.__version__, "threads": 1, "pair_prior": decoder.draft_prior, "rows": {}}
    for name in rows:
        ratios = [a / b for a, b in zip(ms["ar"], ms[name])]
        result["rows"][name] = {
            "fields": rows[name][1], "ms_per_token": statistics.median(ms[name]),
            "pooled_ms_per_token": totals[name][0] / totals[name][1], "speedup_vs_ar": statistics.median(ratios),
            "speedup_interval": bootstrap_interval(ratios),
            "ar_share": modes[name]["ar"] / sum(modes[name].values()) if modes[name] else None,
            "modes": dict(modes[name])}
    (HERE / f"{pair}-{workload_name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table([result]))


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [f"**{r['pair']}, {r['workload']}** (`val`, {r['prompts']} prompts x {r['repeats']} repeats x "
                  f"{r['max_new_tokens']} tokens; {r['cpu']}, one thread; pair prior {r['pair_prior']:.2f})", "",
                  "| row | ms/token (median) | pooled ms/token | speedup over ar [90%] | ar's share of the tokens |",
                  "|---|---:|---:|---|---:|"]
        for name, row in r["rows"].items():
            low, high = row["speedup_interval"]
            share = "-" if row["ar_share"] is None else f"{row['ar_share']:.2f}"
            lines.append(f"| {name} | {row['ms_per_token']:.2f} | {row['pooled_ms_per_token']:.2f} | "
                         f"{row['speedup_vs_ar']:.2f}x [{low:.2f}, {high:.2f}] | {share} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["report"]:
        print(table([json.loads(p.read_text()) for p in sorted(HERE.glob("*-*.json"))]))
    elif len(sys.argv) == 3 and (HERE.parent / f"{sys.argv[1]}-{sys.argv[2]}" / "results.json").is_file():
        measure(*sys.argv[1:3])
    else:
        sys.exit(f"usage: side_by_side.py PAIR WORKLOAD | report; got {sys.argv[1:]}: expected a pair and workload "
                 "with a benchmark run in results/PAIR-WORKLOAD (its profile and prior are read from there)")
