"""A causal LM together with its KV cache: the one place that runs a model while decoding.

`append(ids)` runs the model over tokens its cache does not hold yet (and keeps them);
`rollback(n)` forgets the last n. Two caches sit behind these two verbs:
- dynamic (transformers' `DynamicCache`): it grows by concatenation, and a rollback crops it. 5.x's
  `DynamicCache.crop` changed the meaning of a positive argument across releases, so it is only ever
  called as `crop(-n)` with n > 0 (docs/references.md §6);
- static (transformers' `StaticCache`): preallocated for the prompt, the budget and the longest block,
  written by position. A rollback only moves its length: each layer's `cumulative_length`, in place (the
  GPU image's 5.17 gives static layers the dynamic layers' `crop`, which would slice the buffers). The stale
  keys are overwritten by the next append, and the causal mask hides them until then: no copy, no crop of
  memory. Its fixed shapes are what `torch.compile` and CUDA graphs need (sprinter.decode.engine).
The length is also kept on the host, so reading it never waits for the device. The object counts what
the model did (calls, tokens, analytic FLOPs) for the decode statistics; a fresh one is made per
generation, so nothing is stashed on the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sprinter.errors import SprinterError
from sprinter.pairs.load import run_with_cache

if TYPE_CHECKING:
    from sprinter.decode.engine import CompiledForward, FusedDraftStep


@dataclass(frozen=True)
class FlopModel:
    """Analytic forward FLOPs: 2 x non-embedding parameters per token, plus the output projection for
    each position whose logits are computed, plus attention (QK^T and AV: 4 x layers x width per
    attended position)."""

    non_embedding_params: int
    layers: int
    width: int
    vocab_size: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "FlopModel":
        embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        total = sum(p.numel() for p in model.parameters())  # tied output heads are counted once, as embedding
        cfg = model.config
        return cls(total - embedding, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)

    def forward(self, past: int, new: int, logits: int) -> int:
        """FLOPs of one forward over `new` tokens after `past` cached ones, computing `logits` rows."""
        attended = new * past + new * (new + 1) // 2
        return 2 * self.non_embedding_params * new + 2 * self.vocab_size * self.width * logits \
            + 4 * self.layers * self.width * attended


def last_states(hidden_states: tuple[torch.Tensor, ...], n: int, start: int) -> torch.Tensor | None:
    """The states of the last n layers (last first) at positions start.. of sequence 0; None when n is 0.
    # tuple of (1, T, H) -> (T - start, n, H)"""
    if n == 0:
        return None
    return torch.stack([hidden_states[-1 - i][0, start:] for i in range(n)], dim=1)


def static_cache_supported() -> bool:
    """Whether this transformers' StaticCache keeps its length as a tensor it moves in place (5.17 and later, where
    a rollback moves that length; older ones inferred the length from which slots were non-zero)."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False
    return isinstance(getattr(StaticLayer(max_cache_len=1), "cumulative_length", None), torch.Tensor)


def static_cache(model: torch.nn.Module, capacity: int):
    """A StaticCache for `model` holding up to `capacity` tokens (its buffers are allocated on the first append)."""
    from transformers import StaticCache, __version__

    if not static_cache_supported():
        raise SprinterError(f"static cache: transformers {__version__} has no StaticCache whose length can be moved "
                            "back; expected a release that has one (5.17 or later), or engine=\"eager\"")
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise SprinterError(f"static cache: {type(model).__name__} has sliding-window layers, whose static cache "
                            "cannot move its length back; expected engine=\"eager\"")
    return cache


def static_rollback(cache, n: int) -> None:
    """Forget a StaticCache's last n tokens by moving each layer's length back in place (the keys stay, to be
    overwritten by the next append; the static address CUDA graphs replay on is kept). What 5.24's
    `StaticLayer.crop(-n)` does, spelled out because 5.17's static layers crop like dynamic ones."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True):
            layer.cumulative_length.sub_(n)


def static_capacity(cache) -> int:
    """How many tokens a StaticCache can hold."""
    return min(layer.max_cache_len for layer in cache.layers)


class CachedLM:
    """A causal LM and its KV cache, with named operations `append` and `rollback`.

    `cache`: a fresh (or reset) StaticCache (see `static_cache`), or None for a DynamicCache. `step`: the model's
    compiled forward (sprinter.decode.engine), used for the short appends it has a graph for; static cache only."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, cache=None, step: CompiledForward | None = None):
        from transformers import DynamicCache

        self.model = model
        self.vocab_size = vocab_size  # logits are compared over the ids both models share
        self.static = cache is not None
        self.cache = DynamicCache() if cache is None else cache
        if step is not None and not self.static:
            raise RuntimeError("a compiled step needs a static cache")  # a decoder bug, not bad input
        self.step = step
        self._length = 0
        self.flop_model = FlopModel.of(model)
        self.calls = 0
        self.tokens = 0
        self.flops = 0

    @property
    def capacity(self) -> int | None:
        """How many tokens a static cache holds (None: a dynamic one grows)."""
        return static_capacity(self.cache) if self.static else None

    @property
    def length(self) -> int:
        """How many tokens the cache holds."""
        return self._length

    def append(self, ids: torch.Tensor, logits: int = 1, hidden: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model over `ids` (1, T), which follow the cached tokens, and cache them.

        Returns the logits of the last `logits` positions (logits, V) and, when `hidden` >= 1, the states of
        the last `hidden` layers there, the last layer (after the final norm) first: (logits, hidden, H)."""
        past, new = self.length, ids.shape[1]
        if self.step is not None and past > 0 and self.step.fits(past, new, static_capacity(self.cache)):
            # compiled: a graph per block-length bucket; the padding after the real tokens is forgotten at once
            all_logits, states = self.step(ids, self.cache, hidden)  # (bucket, V), (bucket, hidden, H) | None
            padding = self.step.bucket(new) - new
            if padding:
                static_rollback(self.cache, padding)
            all_logits, states = all_logits[new - logits:new], None if states is None else states[new - logits:new]
        else:  # eager: the prefill (and any append too long for a graph)
            out = run_with_cache(self.model, self.cache, input_ids=ids, logits_to_keep=logits,
                                 output_hidden_states=bool(hidden))
            all_logits, states = out.logits[0, -logits:], last_states(out.hidden_states, int(hidden), -logits)
        self._count(past, new, logits)
        return all_logits[:, : self.vocab_size], states

    def append_fused(self, ids: torch.Tensor, fused: FusedDraftStep, position: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One greedy draft step through `fused` (sprinter.decode.engine: the forward, q and the gate in one
        graph) over `ids` (1, T <= 2): the drafted token, q, the draft's confidence, its state and P(accept).
        Only where `fused.fits`; the caller falls back to `append` and the gate otherwise."""
        past, new = self.length, ids.shape[1]
        out = fused(ids, self.cache, position)
        self._count(past, new, 1)
        return out

    def _count(self, past: int, new: int, logits: int) -> None:
        self._length += new
        self.calls += 1
        self.tokens += new
        self.flops += self.flop_model.forward(past, new, logits)

    def rollback(self, n: int) -> None:
        """Forget the last n cached tokens (n = 0: nothing to do)."""
        if n < 0 or n > self.length:
            raise RuntimeError(f"rollback({n}) on a cache of {self.length} tokens")  # a decoder bug, not bad input
        if n > 0:
            if self.static:
                static_rollback(self.cache, n)
            else:
                self.cache.crop(-n)
            self._length -= n

    def rollback_to(self, length: int) -> None:
        """Keep only the first `length` tokens (no-op when the cache holds no more than that)."""
        self.rollback(max(0, self.length - length))


__all__ = ["CachedLM", "FlopModel", "static_cache", "static_cache_supported", "static_capacity"]
