"""Logits -> probabilities (temperature, top-k, top-p) and drawing from them with an explicit generator.

Temperature 0 is greedy and is expressed as a one-hot distribution on the argmax, so the
speculative-sampling rule in `sprinter.decode.acceptance` needs no separate greedy branch and stays exact.
Draft and target go through the same `Sampler`, so SD is lossless with respect to the warped
(top-k/top-p) target distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sprinter.errors import SprinterError


@dataclass(frozen=True)
class Sampler:
    """How logits become a distribution. temperature 0: greedy; top_k 0 and top_p 1.0: off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise SprinterError(f"temperature: got {self.temperature!r}; expected a finite number >= 0 (0 is greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SprinterError(f"top_k: got {self.top_k!r}; expected an integer >= 0 (0 keeps every token)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SprinterError(f"top_p: got {self.top_p!r}; expected a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from.  # (..., V) -> (..., V) float32"""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(-1, descending=True)
            # drop a token when the tokens ranked above it already reach top_p (the first always stays)
            drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One token per row of `probs` (as made by `probs`): the argmax when greedy, else a draw with `gen`.
        # (..., V) -> (...)"""
        return probs.argmax(-1) if self.greedy else sample(probs, gen)

    def soft_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """What a verifier reads as q: `probs` when sampling, the untempered softmax when greedy
        (a one-hot says nothing about the draft's confidence).  # (..., V) -> (..., V)"""
        return logits.float().softmax(-1) if self.greedy else self.probs(logits)


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token id from `probs`, drawn with `gen`.  # (V,) -> () long"""
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def uniform(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """n draws from U[0, 1) for the acceptance tests.  # -> (n,)"""
    return torch.rand(n, generator=gen, device=device)


__all__ = ["Sampler", "sample", "uniform"]
