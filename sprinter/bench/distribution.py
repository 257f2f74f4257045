"""The sampled benchmark's distribution check: a lossless mode must sample from the target's distribution.

At temperature > 0 a lossless row's output cannot be compared with `ar`'s token by token, only in distribution
(as tests/test_decode_distribution.py checks SD on a toy vocabulary). On each prompt, ar's output and the row's
are two independent draws from the same distribution when the row is lossless, so swapping them is a symmetry
of the null hypothesis: both tests below are exact permutation tests over those swaps (all 2^n for n <= 12
prompts, else SWAPS random ones from a fixed seed), which holds however the tokens within an output depend on
each other.

- per-token target NLL: the statistic is |mean over prompts of (the row's output's mean NLL per token -
  ar's)|;
- token frequencies: the total-variation distance between the two groups' pooled token histograms.

A run fails (SprinterError) when a p-value is below ALPHA / (2 x the lossless rows checked) (Bonferroni over
rows and the two tests). Exact tests over n prompts cannot give p below 2^(1-n): a run of fewer than about 16
prompts cannot fail at ALPHA = 0.001, and the report says so. Beyond EXACT_UP_TO prompts, SWAPS random swaps
give p = (1 + as extreme) / (1 + SWAPS). The token histograms keep the BUCKETS - 1 most frequent tokens of the
pair's pooled outputs and one bucket for the rest (any statistic keeps the test exact; this one is cheap).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Sequence

import numpy as np

ALPHA = 0.001
EXACT_UP_TO = 12
SWAPS = 20000
BUCKETS = 256


def swaps(n: int, seed: int = 0) -> tuple[np.ndarray, bool]:
    """(flips, exact): a (S, n) 0/1 array of which pairs swap; every assignment when n <= EXACT_UP_TO, else the
    observed one (all zeros) first and SWAPS random ones."""
    if n <= EXACT_UP_TO:
        return np.array(list(itertools.product((0, 1), repeat=n)), dtype=np.float64).reshape(-1, n), True
    rng = np.random.default_rng(seed)
    return np.vstack([np.zeros((1, n)), rng.integers(0, 2, size=(SWAPS, n)).astype(np.float64)]), False


def _p_value(stats: np.ndarray) -> float:
    """stats[0] is the observed statistic: the share of assignments at least as extreme."""
    return int((stats >= stats[0] - 1e-12).sum()) / len(stats)  # exact: over all; else (1 + hits) / (1 + SWAPS)


def nll_p_value(pairs: Sequence[tuple[float, float]], seed: int = 0) -> float:
    """The swap test of |mean over pairs of (b - a)| (per-output mean target NLLs: a ar's, b the row's)."""
    d = np.array([b - a for a, b in pairs], dtype=np.float64)
    flips, _ = swaps(len(d), seed)
    return _p_value(np.abs((1 - 2 * flips) @ d) / max(len(d), 1))


def histograms(outputs: Sequence[Sequence[int]], keep: Sequence[int]) -> np.ndarray:
    """(len(outputs), len(keep) + 1) token counts: one column per kept token, the last for every other token."""
    column = {t: i for i, t in enumerate(keep)}
    out = np.zeros((len(outputs), len(keep) + 1))
    for row, tokens in enumerate(outputs):
        for t, c in Counter(tokens).items():
            out[row, column.get(t, len(keep))] += c
    return out


def token_distance(xs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]]) -> float:
    """Total-variation distance between the pooled token histograms of two groups of outputs."""
    a, b = Counter(t for out in xs for t in out), Counter(t for out in ys for t in out)
    na, nb = sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * sum(abs(a[t] / na - b[t] / nb) for t in a.keys() | b.keys())


def tokens_p_value(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seed: int = 0) -> float:
    """The swap test of the total-variation distance between the two groups' pooled token histograms."""
    pooled = Counter(t for a, b in pairs for t in (*a, *b))
    keep = [t for t, _ in pooled.most_common(BUCKETS - 1)]
    a, b = histograms([p[0] for p in pairs], keep), histograms([p[1] for p in pairs], keep)
    flips, _ = swaps(len(pairs), seed)
    stats = []
    for chunk in np.array_split(flips, max(1, len(flips) // 2048)):
        x = a.sum(0) + chunk @ (b - a)  # (S, K): group one's counts under each assignment
        y = (a + b).sum(0) - x
        stats.append(0.5 * np.abs(x / np.maximum(x.sum(1, keepdims=True), 1)
                                  - y / np.maximum(y.sum(1, keepdims=True), 1)).sum(1))
    return _p_value(np.concatenate(stats))


def distribution_check(rows: dict[str, list[tuple[dict, dict]]], *, alpha: float = ALPHA) -> dict[str, dict]:
    """rows: lossless row name -> [(ar's record, the row's record) per prompt] (records with `tokens` and
    `fidelity` {nll_sum, tokens}). Returns, per row, its two p-values, the Bonferroni threshold and `passed`."""
    threshold = alpha / (2 * max(len(rows), 1))
    out = {}
    for name, pairs in rows.items():
        nll = [(r["fidelity"]["nll_sum"] / max(r["fidelity"]["tokens"], 1),
                m["fidelity"]["nll_sum"] / max(m["fidelity"]["tokens"], 1)) for r, m in pairs]
        p_nll, p_tokens = nll_p_value(nll), tokens_p_value([(r["tokens"], m["tokens"]) for r, m in pairs])
        n = len(pairs)
        out[name] = {"p_nll": p_nll, "p_tokens": p_tokens, "threshold": threshold, "prompts": n,
                     "smallest_p": 2.0 ** (1 - n) if n <= EXACT_UP_TO else 1 / (SWAPS + 1),
                     "passed": min(p_nll, p_tokens) >= threshold}
    return out


def check_distributions(methods: Sequence, done: dict[int, list[dict]], alpha: float) -> dict[str, dict]:
    """The check of every lossless row (sprinter.bench.protocol.Method) against ar over a run's finished prompts."""
    rows: dict[str, list[tuple[dict, dict]]] = {}
    for index in sorted(done):
        by_name = {r["method"]: r for r in done[index]}
        for m in methods:
            if m.lossless and m.name != "ar" and m.name in by_name:
                rows.setdefault(m.name, []).append((by_name["ar"], by_name[m.name]))
    return distribution_check(rows, alpha=alpha)


__all__ = ["ALPHA", "BUCKETS", "check_distributions", "distribution_check", "nll_p_value", "swaps", "token_distance",
           "tokens_p_value"]
