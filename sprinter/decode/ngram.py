"""N-gram drafting (SSSD, docs/references.md §4; prompt-lookup decoding): no draft model, the draft is what
followed the latest earlier occurrence of the sequence's own suffix, or what followed it in a corpus.

`NgramDrafter.chain(ids, k)` looks for the longest suffix of `ids` (n tokens, from `n` down to
`min_n`) that also occurs earlier in `ids`, and proposes the up to `k` tokens that followed its most
recent earlier occurrence. A drafter with a datastore (sprinter/decode/datastore.py) also looks the suffix
up in a corpus, and proposes the corpus's continuation when the corpus matches a longer suffix than
the sequence does (in particular when the sequence has no match at all); the sequence wins ties.
A chain is deterministic: verified with the speculative-sampling rule as a one-hot q, it keeps the
target's distribution exactly.

`chain` is stateless and scans the sequence (tens of microseconds at 2k tokens, most of it turning a
list into an array). A decode loop that keeps one sequence growing can use `drafter.index(ids)`
instead: an `NgramIndex` that updates a table of n-grams as tokens are appended (`extend`) and
answers `chain(k)` in microseconds, with the same result as `drafter.chain(ids, k)`.

`NgramDrafter` is also a drafter of the decode loops (sprinter.decode.drafters): `propose` looks up a chain
per row, `keep` has nothing to forget (the drafter holds no state about the sequences).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from sprinter.decode.drafters import Draft, StopRule
from sprinter.errors import SprinterError

if TYPE_CHECKING:
    from sprinter.decode.datastore import Datastore


class NgramDrafter:
    """Chains of up to k tokens from the longest suffix match in the sequence itself or a datastore."""

    def __init__(self, n: int = 3, min_n: int = 1, *, datastore: Datastore | None = None):
        if not (isinstance(n, int) and isinstance(min_n, int) and 1 <= min_n <= n):
            raise SprinterError(f"n-gram sizes: got n={n!r}, min_n={min_n!r}; expected integers with 1 <= min_n <= n")
        self.n, self.min_n, self.datastore = n, min_n, datastore

    def chain(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens to follow `ids` (the prompt and what was generated); [] when nothing matches."""
        seq = np.asarray(ids, dtype=np.int64)
        T = len(seq)
        if k < 1:
            return []
        for n in range(min(self.n, T - 1), self.min_n - 1, -1):
            # starts[j] is True where seq[j : j + n] equals the suffix, for starts j whose match ends before T - 1.
            starts = np.ones(T - n, dtype=bool)
            for i in range(n):
                starts &= seq[i : T - n + i] == seq[T - n + i]
            hits = np.flatnonzero(starts)
            if hits.size:
                follow = int(hits[-1]) + n  # the first token after the most recent earlier occurrence
                return self.choose(seq[-self.n :].tolist(), n, seq[follow : follow + k].tolist(), k)
        return self.choose(seq[-self.n :].tolist(), 0, [], k)

    def choose(self, suffix: list[int], matched: int, own: list[int], k: int) -> list[int]:
        """The sequence's own chain (from a match of `matched` tokens; 0: none), unless the datastore
        matches a longer suffix: on held-out code, the longer match predicts more tokens (docs/datastore.md)."""
        if self.datastore is None or matched >= self.n or not suffix:
            return own
        return self.datastore.chain(suffix, k, self.n, max(matched + 1, self.min_n)) or own

    def propose(self, seqs: Sequence[Sequence[int]], limits: Sequence[int], gen: torch.Generator, *,
                stop: StopRule | None = None) -> Draft:
        """The drafter interface: `chain` for each row (no randomness; q is one-hot, given as None).
        `stop` is refused: no mode gates n-gram chains, and a gate reads a draft model's state."""
        if stop is not None:
            raise RuntimeError("NgramDrafter takes no stop rule")  # a decoder bug
        chains = [self.chain(seq, limit) for seq, limit in zip(seqs, limits, strict=True)]
        lengths = [len(c) for c in chains]
        width = max(lengths, default=0)
        x = torch.tensor([c + [0] * (width - len(c)) for c in chains], dtype=torch.long).view(len(chains), width)
        return Draft(x, lengths, None, None, chains)

    def keep(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Nothing to forget: each `propose` reads the rows' sequences afresh."""

    def index(self, ids: Iterable[int] = ()) -> NgramIndex:
        """An incremental index of one growing sequence, starting with `ids` (the prompt)."""
        return NgramIndex(self, ids)


class NgramIndex:
    """`drafter.chain(ids, k)` for one sequence that only grows: `extend` it with each accepted token.

    `_follow` maps every n-gram (min_n..n tokens) that has a token after it to the position of that
    token at its latest occurrence; the sequence's own suffix is entered only once a token follows it.
    """

    def __init__(self, drafter: NgramDrafter, ids: Iterable[int] = ()):
        self.drafter = drafter
        self.ids: list[int] = []
        self._follow: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens (accepted ones: the index cannot roll back)."""
        ids, follow, lo, hi = self.ids, self._follow, self.drafter.min_n, self.drafter.n
        for token in tokens:
            T = len(ids)
            for n in range(lo, min(hi, T) + 1):  # the n-grams ending at T - 1 are now followed by position T
                follow[tuple(ids[T - n :])] = T
            ids.append(int(token))

    def chain(self, k: int) -> list[int]:
        """Up to `k` tokens to follow the sequence; the same as `drafter.chain(self.ids, k)`."""
        ids, T = self.ids, len(self.ids)
        if k < 1:
            return []
        for n in range(min(self.drafter.n, T - 1), self.drafter.min_n - 1, -1):
            follow = self._follow.get(tuple(ids[T - n :]))
            if follow is not None:
                return self.drafter.choose(ids[-self.drafter.n :], n, ids[follow : follow + k], k)
        return self.drafter.choose(ids[-self.drafter.n :], 0, [], k)


__all__ = ["NgramDrafter", "NgramIndex"]
