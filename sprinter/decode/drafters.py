"""Where drafted tokens come from: one small interface, so a draft model and (later) an n-gram table
are interchangeable in the decode loops.

A drafter proposes the next token after a sequence, with the distribution q it drew it from, and
can forget the tail of the sequence after a rejection. A deterministic drafter (an n-gram lookup)
returns a one-hot q; the speculative-sampling rule then stays lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sprinter.decode.cache import CachedLM
from sprinter.decode.sampling import Sampler


@dataclass
class DraftStep:
    """One drafted token and what a verifier may read about it."""

    token: torch.Tensor  # () long: the drafted token x
    q: torch.Tensor  # (V,) the distribution x was drawn from (one-hot when greedy)
    q_soft: torch.Tensor  # (V,) the draft's confidence: q when sampling, the untempered softmax when greedy
    hidden: torch.Tensor | None  # (H,) the draft's last-layer state at the position that produced x


class Drafter(Protocol):
    def propose(self, tokens: torch.Tensor, gen: torch.Generator) -> DraftStep:
        """The next token after `tokens` (1, T): the whole sequence so far, drafted tokens included."""

    def rollback_to(self, length: int) -> None:
        """Forget any state about tokens after the first `length` (they were rejected)."""


class ModelDrafter:
    """A draft causal LM with its own KV cache, fed only the tokens it has not seen."""

    def __init__(self, lm: CachedLM, sampler: Sampler, with_hidden: bool = False):
        self.lm = lm
        self.sampler = sampler
        self.with_hidden = with_hidden  # the hidden state costs an extra output; only a learned gate reads it

    def propose(self, tokens: torch.Tensor, gen: torch.Generator) -> DraftStep:
        logits, hidden = self.lm.append(tokens[:, self.lm.length:], hidden=self.with_hidden)  # (1, V), (1, H)
        q = self.sampler.probs(logits[0])
        return DraftStep(token=self.sampler.draw(q, gen), q=q, q_soft=self.sampler.soft_probs(logits[0]),
                         hidden=None if hidden is None else hidden[0])

    def rollback_to(self, length: int) -> None:
        self.lm.rollback_to(length)


__all__ = ["DraftStep", "Drafter", "ModelDrafter"]
