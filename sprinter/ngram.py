"""N-gram drafting (SSSD, REFERENCES.md §4; prompt-lookup decoding): no draft model, the draft is what
followed the latest earlier occurrence of the sequence's own suffix.

`NgramDrafter.chain(ids, s)` looks for the longest suffix of `ids` (n tokens, from `n` down to
`min_n`) that also occurs earlier in `ids`, and proposes the up to `s` tokens that followed its most
recent earlier occurrence. A chain is deterministic: verified with the speculative-sampling rule as
a one-hot q, it keeps the target's distribution exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sprinter.errors import SprinterError


class NgramDrafter:
    """Chains of up to s tokens from suffix matches in the sequence itself."""

    def __init__(self, n: int = 3, min_n: int = 1):
        if not (isinstance(n, int) and isinstance(min_n, int) and 1 <= min_n <= n):
            raise SprinterError(f"n-gram sizes: got n={n!r}, min_n={min_n!r}; expected integers with 1 <= min_n <= n")
        self.n, self.min_n = n, min_n

    def chain(self, ids: Sequence[int], s: int) -> list[int]:
        """Up to `s` tokens to follow `ids` (the prompt and what was generated); [] when nothing matches."""
        seq = np.asarray(ids, dtype=np.int64)
        T = len(seq)
        if s < 1 or T < 2:
            return []
        for n in range(min(self.n, T - 1), self.min_n - 1, -1):
            # ends[j] is True where seq[j : j + n] equals the suffix, for starts j whose match ends before T - 1.
            starts = np.ones(T - n, dtype=bool)
            for i in range(n):
                starts &= seq[i : T - n + i] == seq[T - n + i]
            hits = np.flatnonzero(starts)
            if hits.size:
                follow = int(hits[-1]) + n  # the first token after the most recent earlier occurrence
                return seq[follow : follow + s].tolist()
        return []


__all__ = ["NgramDrafter"]
