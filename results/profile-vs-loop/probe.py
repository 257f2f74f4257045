"""Where the cost profile and the timed loops part: every target and draft forward of modes ar and sd-k8 on 8 val
prompts (greedy, 128 new tokens), timed beside `measure_costs` profiles taken before and after, in one process.

    python results/profile-vs-loop/probe.py bench     # about a minute and a half; demo: about a minute

Prints each profile's figures (target_run_ms, T(1), T(3), T(5), T(9), the drafter's step, the draft's run, the
round) and, per mode, its ms/token and the median ms of each kind of forward (role and new tokens; the prefills
left out) with how many there were. A forward's time here is CachedLM.append and the read of one logit (no
sampler), so a draft step reads ~0.05-0.1 ms below the profile's, which includes the draw.
"""

from __future__ import annotations

import collections
import statistics
import sys
import time

import torch

from sprinter import Decoder
from sprinter.bench.workloads import resolve, workload_prompts
from sprinter.decode import cache as cache_module
from sprinter.decode.costs import Budget, measure_costs
from sprinter.decode.sampling import Sampler

PROMPTS, NEW_TOKENS = 8, 128
RUNS = (("ar", None), ("sd", 8), ("ar", None))


def main(pair: str) -> None:
    torch.set_num_threads(1)
    decoder = Decoder.from_pretrained(f"checkpoints/pairs/{pair}/draft", f"checkpoints/pairs/{pair}/target",
                                      device="cpu")
    prompts = workload_prompts(resolve("greedy"), decoder.tokenizer, dataset="stdlib", split="val",
                               domains=["code", "prose"], num_prompts=PROMPTS, prompt_len=64, continuation_len=0)

    def profile(tag: str) -> None:
        p = measure_costs(decoder.pair, name=pair, max_n=21, context=64 + NEW_TOKENS // 2, prompt=64,
                          sampler=Sampler(0.0), budget=Budget(seconds=20.0, min_repeats=10, max_repeats=100))
        print(f"{tag}: target_run {p.target_run_ms:.2f}  T(1) {p.target_ms[0]:.2f}  T(3) {p.target_ms[2]:.2f}  "
              f"T(5) {p.target_ms[4]:.2f}  T(9) {p.target_ms[8]:.2f}  draft step {p.draft_step_ms:.2f}  "
              f"draft run {p.draft_run_ms:.2f}  round {p.round_ms:.2f}  noise {p.noise:.2f}", flush=True)

    times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    append = cache_module.CachedLM.append

    def timed_append(self, ids, logits=1, hidden=0):
        start = time.perf_counter()
        out = append(self, ids, logits, hidden)
        out[0][-1, 0].item()
        if self.length > ids.shape[1]:  # not a prefill
            role = "target" if self.model is decoder.pair.target else "draft"
            times[(role, ids.shape[1])].append(time.perf_counter() - start)
        return out

    profile("profile before")
    for mode, k in RUNS:
        times.clear()
        cache_module.CachedLM.append = timed_append
        try:
            seconds, tokens = 0.0, 0
            for p in prompts:
                start = time.perf_counter()
                out = decoder.generate(list(p.ids), mode=mode, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                       **({"k": k} if k else {}))
                seconds += time.perf_counter() - start
                tokens += len(out.token_ids)
        finally:
            cache_module.CachedLM.append = append
        forwards = "  ".join(f"{role} x{n}: {1e3 * statistics.median(v):.2f} ({len(v)})"
                             for (role, n), v in sorted(times.items()) if len(v) >= 5)
        print(f"{mode}{'-k%d' % k if k else ''}: {1e3 * seconds / tokens:.2f} ms/token  {forwards}", flush=True)
    profile("profile after")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench")
