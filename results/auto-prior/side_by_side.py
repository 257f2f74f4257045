"""`auto`'s controller variants side by side in one run on `val` prompts (never the benchmark's `test` prompts), with
`ar` and the fixed rows auto competes with (sd-k2, sd-k4, ngram-8 on auto's loop), under one workload.

The variants differ only in the draft model's acceptance estimate (sprinter.decode.auto): how fast it forgets
(`draft_decay`), whether it goes back toward its prior while the draft is not observed (`relax` per ar or n-gram
round; 1: it waits for a probe), and which prior it starts from (the pair's, here the benchmark run's calibration
prior, or the request's own: its prompt's teacher-forced acceptance, `prompt_prior`). Each prompt runs every row
REPEATS times, the rows' order rotated each round (as the benchmark does); the controller's profile and pair prior
are the benchmark run's own (results/P-W/results.json); with `fresh`, the profile is measured now, before the
timed rounds, as the benchmark measures it (the prior still the run's). No verifier is loaded (no sd-gated
candidate), the same for every variant. Speedup: ar's ms/token over the row's, the median over prompts x repeats
with its bootstrap 90% interval; pooled: all time over all tokens. Loop share: the share of a row's tokens
completing a 4-gram its own output already held (sprinter.bench.degeneracy; not recorded before `fresh` was
added). Break-even: the lowest draft acceptance at which the controller prices an sd round below ar under the
profile it was given.

    python results/auto-prior/side_by_side.py demo sampled        # about 5 minutes; writes demo-sampled.json
    python results/auto-prior/side_by_side.py bench sampled fresh  # profile measured now; bench-sampled-fresh.json
    python results/auto-prior/side_by_side.py report               # the table over every P-W.json here
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
from sprinter.bench.benchmark import PROFILE_BUDGET
from sprinter.bench.degeneracy import pooled
from sprinter.bench.protocol import rotated
from sprinter.bench.spread import bootstrap_interval
from sprinter.bench.workloads import resolve, workload_prompts
from sprinter.decode.auto import AutoController
from sprinter.decode.costs import CostProfile, measure_costs
from sprinter.decode.sampling import Sampler

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


def break_even(profile: CostProfile) -> float:
    """The lowest draft acceptance (to 0.01) at which the controller prices some sd-k below ar under `profile`."""
    controller = AutoController(profile=profile)
    ar = controller._ms(controller.candidates["ar"])
    sd = [c for c in controller.candidates.values() if c.kind == "sd"]
    return next((a / 100 for a in range(1, 101) if min(controller._ms(c, a / 100) for c in sd) < ar), 1.0)


def measure(pair: str, workload_name: str, fresh: bool = False) -> None:
    torch.set_num_threads(1)
    run = json.loads((HERE.parent / f"{pair}-{workload_name}" / "results.json").read_text())
    workload = resolve(workload_name)
    root = Path("checkpoints/pairs") / pair
    decoder = Decoder.from_pretrained(root / "draft", root / "target", device="cpu", dtype="float32")
    decoder.profile = measure_costs(  # as the benchmark measures it (sprinter.bench.benchmark), before any timing
        decoder.pair, name=str(root), max_n=21, context=64 + workload.max_new_tokens // 2, prompt=64,
        sampler=Sampler(workload.temperature, top_p=workload.top_p if workload.temperature > 0 else 1.0),
        budget=PROFILE_BUDGET) if fresh else CostProfile.from_dict(run["pair"]["cost_profile"])
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
    outputs: dict[str, list] = collections.defaultdict(list)  # (prompt, output) pairs: the loop shares
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
                outputs[name].append((list(prompt.ids), out.token_ids))
    decoder.make_controller = make_controller
    result = {"pair": pair, "workload": workload_name, "split": "val", "prompts": len(prompts), "repeats": REPEATS,
              "max_new_tokens": workload.max_new_tokens, "temperature": workload.temperature, "top_p": workload.top_p,
              "cpu": cpu(), "torch": torch.__version__, "threads": 1, "pair_prior": decoder.draft_prior,
              "profile": "measured before the timed rounds" if fresh else f"results/{pair}-{workload_name}",
              "break_even": break_even(decoder.profile), "rows": {}}
    for name in rows:
        ratios = [a / b for a, b in zip(ms["ar"], ms[name])]
        result["rows"][name] = {
            "fields": rows[name][1], "ms_per_token": statistics.median(ms[name]),
            "pooled_ms_per_token": totals[name][0] / totals[name][1], "speedup_vs_ar": statistics.median(ratios),
            "speedup_interval": bootstrap_interval(ratios),
            "ar_share": modes[name]["ar"] / sum(modes[name].values()) if modes[name] else None,
            "modes": dict(modes[name]), "loop_share": pooled(outputs[name])["repeat_output"]}
    (HERE / f"{pair}-{workload_name}{'-fresh' if fresh else ''}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table([result]))


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        profile = r.get("profile", f"results/{r['pair']}-{r['workload']}")  # files written before `fresh` existed
        even = f"; sd's break-even acceptance {r['break_even']:.2f}" if "break_even" in r else ""
        lines += [f"**{r['pair']}, {r['workload']}** (`val`, {r['prompts']} prompts x {r['repeats']} repeats x "
                  f"{r['max_new_tokens']} tokens; {r['cpu']}, one thread; pair prior {r['pair_prior']:.2f}; "
                  f"profile: {profile}{even})", "",
                  "| row | ms/token (median) | pooled ms/token | speedup over ar [90%] | ar's share of the tokens "
                  "| loop share |", "|---|---:|---:|---|---:|---:|"]
        for name, row in r["rows"].items():
            low, high = row["speedup_interval"]
            share = "-" if row["ar_share"] is None else f"{row['ar_share']:.2f}"
            loops = f"{row['loop_share']:.2f}" if row.get("loop_share") is not None else "-"
            lines.append(f"| {name} | {row['ms_per_token']:.2f} | {row['pooled_ms_per_token']:.2f} | "
                         f"{row['speedup_vs_ar']:.2f}x [{low:.2f}, {high:.2f}] | {share} | {loops} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["report"]:
        print(table([json.loads(p.read_text()) for p in sorted(HERE.glob("*-*.json"))]))
    elif len(args) in (2, 3) and args[2:] in ([], ["fresh"]) and \
            (HERE.parent / f"{args[0]}-{args[1]}" / "results.json").is_file():
        measure(args[0], args[1], fresh=args[2:] == ["fresh"])
    else:
        sys.exit(f"usage: side_by_side.py PAIR WORKLOAD [fresh] | report; got {args}: expected a pair and workload "
                 "with a benchmark run in results/PAIR-WORKLOAD (its prior, and without `fresh` its profile, are "
                 "read from there)")
