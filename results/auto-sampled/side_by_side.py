"""`auto` as it is against `auto` whose draft estimate forgets more slowly, side by side in one run on `val` prompts
(never the benchmark's `test` prompts), with `ar` and the fixed sd-k2 / sd-k4 rows, under the sampled workload.

Each prompt runs every row `REPEATS` times, the rows' order rotated each round (as the benchmark does); the
controller's profile and draft prior are the benchmark run's own (results/P-sampled/results.json), so only the
draft estimate's memory differs between the two `auto` rows. Speedup: ar's ms/token over the row's, the median
over prompts x repeats with its bootstrap 90% interval.

    python results/auto-sampled/side_by_side.py demo     # about 3 minutes; bench: about 7
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path

import torch

import sprinter.decode.auto as auto_module
from sprinter import Decoder
from sprinter.bench.protocol import rotated
from sprinter.bench.spread import bootstrap_interval
from sprinter.bench.workloads import resolve, workload_prompts
from sprinter.decode.costs import CostProfile

PROMPTS, REPEATS, SLOW_DECAY = 12, 3, 0.9
HERE = Path(__file__).parent
ORIGINAL = auto_module.AutoController.__post_init__


def draft_decay(decay: float) -> None:
    """Make the draft model's acceptance estimate of every new controller forget at `decay` per round."""
    def post_init(self) -> None:
        ORIGINAL(self)
        self.draft = auto_module.Estimate(self.draft_prior, decay=decay)
    auto_module.AutoController.__post_init__ = post_init


def main(pair: str) -> None:
    torch.set_num_threads(1)
    run = json.loads((HERE.parent / f"{pair}-sampled" / "results.json").read_text())
    workload = resolve("sampled")
    root = Path("checkpoints/pairs") / pair
    decoder = Decoder.from_pretrained(root / "draft", root / "target", verifier=f"checkpoints/verifiers/{pair}-kept",
                                      device="cpu", dtype="float32")
    decoder.profile = CostProfile.from_dict(run["pair"]["cost_profile"])
    decoder.draft_prior = run["pair"]["auto_draft_prior"]
    prompts = workload_prompts(workload, decoder.tokenizer, dataset="stdlib", split="val", domains=("code", "prose"),
                               num_prompts=PROMPTS, prompt_len=64, continuation_len=workload.max_new_tokens)
    rows = {"ar": (dict(mode="ar"), None), "sd-k2": (dict(mode="sd", k=2), None), "sd-k4": (dict(mode="sd", k=4), None),
            f"auto (decay {auto_module.DECAY})": (dict(mode="auto"), auto_module.DECAY),
            f"auto (draft decay {SLOW_DECAY})": (dict(mode="auto"), SLOW_DECAY)}
    sampling = dict(temperature=workload.temperature, top_p=workload.top_p, max_new_tokens=workload.max_new_tokens)
    decoder.generate(list(prompts[0].ids), mode="auto", max_new_tokens=16, **{k: v for k, v in sampling.items()
                                                                              if k != "max_new_tokens"})  # warm-up
    ms: dict[str, list[float]] = collections.defaultdict(list)
    modes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for prompt in prompts:
        for round_ in range(REPEATS):
            for name in rotated(list(rows), prompt.index * REPEATS + round_):
                options, decay = rows[name]
                if decay is not None:
                    draft_decay(decay)
                out = decoder.generate(list(prompt.ids), seed=prompt.index, **options, **sampling)
                ms[name].append(1e3 * out.stats.wall_seconds / out.stats.new_tokens)
                modes[name].update(out.stats.modes or {})
    auto_module.AutoController.__post_init__ = ORIGINAL
    ar = ms["ar"]
    print(f"pair {pair}, workload sampled (T {workload.temperature}, top-p {workload.top_p}), {len(prompts)} val "
          f"prompts x {REPEATS} repeats x {workload.max_new_tokens} tokens; CPU: {run['hardware'].get('cpu')}")
    print("| row | ms/token (median) | speedup over ar [90%] | ar's share of the tokens |")
    print("|---|---|---|---|")
    for name in rows:
        ratios = [a / b for a, b in zip(ar, ms[name])]
        low, high = bootstrap_interval(ratios)
        share = f"{modes[name]['ar'] / sum(modes[name].values()):.2f}" if modes[name] else "-"
        speedup = f"{statistics.median(ratios):.2f}x [{low:.2f}, {high:.2f}]"
        print(f"| {name} | {statistics.median(ms[name]):.2f} | {speedup} | {share} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo")
