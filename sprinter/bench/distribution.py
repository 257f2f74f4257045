"""The sampled benchmark's distribution check: a lossless mode must sample from the target's distribution.

At temperature > 0 a lossless row's output cannot be compared with `ar`'s token by token, only in distribution
(as tests/test_decode_distribution.py checks SD on a toy vocabulary). On each prompt, ar's output and the row's
are two independent draws from the same distribution when the row is lossless, so swapping them is a symmetry
of the null hypothesis: both tests below are exact permutation tests over those swaps (all 2^n for n <= 12
prompts, else SWAPS random ones from a fixed seed), which holds however the tokens within an output depend on
each other.

- per-position target NLL: the statistic is |mean over prompts of (row's mean NLL - ar's)|;
- token frequencies: the total-variation distance between the two groups' pooled token histograms.

A run fails (SprinterError) when a p-value is below ALPHA / (2 x the lossless rows checked) (Bonferroni over
rows and the two tests). With n prompts the smallest attainable p is 2^(1-n): a run of fewer than about 16
prompts cannot fail at ALPHA = 0.001, and says so.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Callable, Sequence

ALPHA = 0.001
EXACT_UP_TO = 12
SWAPS = 4000


def swap_p_value(pairs: Sequence[tuple[object, object]], statistic: Callable[[list, list], float], *,
                 seed: int = 0) -> float:
    """P(statistic >= observed) over swaps of each pair's two members (the observed assignment included)."""
    n = len(pairs)
    observed = statistic([a for a, _ in pairs], [b for _, b in pairs])
    if n <= EXACT_UP_TO:
        flips = itertools.product((False, True), repeat=n)
        total = 2 ** n
    else:
        rng = random.Random(seed)
        flips = itertools.chain([(False,) * n], ([rng.random() < 0.5 for _ in range(n)] for _ in range(SWAPS - 1)))
        total = SWAPS
    hits = 0
    for flip in flips:
        xs = [b if f else a for (a, b), f in zip(pairs, flip, strict=True)]
        ys = [a if f else b for (a, b), f in zip(pairs, flip, strict=True)]
        hits += statistic(xs, ys) >= observed - 1e-12
    return hits / total


def mean_gap(xs: list[float], ys: list[float]) -> float:
    return abs(sum(xs) - sum(ys)) / max(len(xs), 1)


def token_distance(xs: list[Sequence[int]], ys: list[Sequence[int]]) -> float:
    """Total-variation distance between the pooled token histograms of two groups of outputs."""
    a, b = Counter(t for out in xs for t in out), Counter(t for out in ys for t in out)
    na, nb = sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * sum(abs(a[t] / na - b[t] / nb) for t in a.keys() | b.keys())


def distribution_check(rows: dict[str, list[tuple[dict, dict]]], *, alpha: float = ALPHA) -> dict[str, dict]:
    """rows: lossless row name -> [(ar's record, the row's record) per prompt] (records with `tokens` and
    `fidelity` {nll_sum, tokens}). Returns, per row, its two p-values, the Bonferroni threshold and `passed`."""
    threshold = alpha / (2 * max(len(rows), 1))
    out = {}
    for name, pairs in rows.items():
        nll = [(r["fidelity"]["nll_sum"] / max(r["fidelity"]["tokens"], 1),
                m["fidelity"]["nll_sum"] / max(m["fidelity"]["tokens"], 1)) for r, m in pairs]
        tokens = [(r["tokens"], m["tokens"]) for r, m in pairs]
        p_nll, p_tokens = swap_p_value(nll, mean_gap), swap_p_value(tokens, token_distance)
        out[name] = {"p_nll": p_nll, "p_tokens": p_tokens, "threshold": threshold, "prompts": len(pairs),
                     "smallest_p": 2.0 ** (1 - len(pairs)) if len(pairs) <= EXACT_UP_TO else 1 / SWAPS,
                     "passed": min(p_nll, p_tokens) >= threshold}
    return out


__all__ = ["ALPHA", "distribution_check", "mean_gap", "swap_p_value", "token_distance"]
