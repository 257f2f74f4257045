"""Spreads of the benchmark's speedups: a bootstrap interval of the median over prompts x repeats, and ties.

Identical outputs time 0.03-0.07x apart between runs on a busy CPU (issue 24), so a ranking closer than the
spread is noise. Each row's speedup samples are ar's ms/token over the row's on the same prompt and repeat
(both timed in the same round); the row reports their median and a percentile-bootstrap LEVEL interval of that
median (resampling the samples, DRAWS draws, a fixed seed: the same records give the same interval). Two rows
tie where their intervals overlap.
"""

from __future__ import annotations

import random
import statistics
from typing import Sequence

LEVEL = 0.9
DRAWS = 2000


def bootstrap_interval(samples: Sequence[float], *, level: float = LEVEL, draws: int = DRAWS,
                       seed: int = 0) -> tuple[float, float] | None:
    """The percentile-bootstrap `level` interval of the median of `samples` (None without samples; a single
    sample is its own interval)."""
    if not samples:
        return None
    if len(samples) == 1:
        return float(samples[0]), float(samples[0])
    rng = random.Random(seed)
    n = len(samples)
    medians = sorted(statistics.median(rng.choices(samples, k=n)) for _ in range(draws))
    tail = (1 - level) / 2
    lo = medians[int(tail * (draws - 1))]
    hi = medians[int(round((1 - tail) * (draws - 1)))]
    return float(lo), float(hi)


def overlaps(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def mark_ties(entries: list[dict]) -> None:
    """Give each entry `ties_with` (the fastest row of its class: lossless rows, or lossy rows; ar aside) and
    `tie` (its speedup interval overlaps that row's). The fastest row itself has tie False."""
    for lossless in (True, False):
        rows = [e for e in entries if e["name"] != "ar" and bool(e["lossless"]) == lossless
                and e.get("speedup_interval") is not None]
        best = max(rows, key=lambda e: e["speedup_vs_ar"], default=None)
        for e in rows:
            e["ties_with"] = None if e is best else best["name"]
            e["tie"] = e is not best and overlaps(e["speedup_interval"], best["speedup_interval"])
    for e in entries:
        e.setdefault("ties_with", None)
        e.setdefault("tie", False)


__all__ = ["DRAWS", "LEVEL", "bootstrap_interval", "mark_ties", "overlaps"]
