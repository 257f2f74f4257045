"""A causal LM together with its KV cache: the one place that runs a model while decoding.

`append(ids)` runs the model over tokens its cache does not hold yet (and keeps them);
`rollback(n)` forgets the last n. transformers 5.x's `DynamicCache.crop` changed the meaning of a
positive argument across releases, so it is only ever called as `crop(-n)` with n > 0
(REFERENCES.md §6). The object also counts what the model did (calls, tokens, analytic FLOPs) for
the decode statistics; a fresh one is made per generation, so nothing is stashed on the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sprinter.pairs.load import run_with_cache


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


class CachedLM:
    """A causal LM and its DynamicCache, with named operations `append` and `rollback`."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        from transformers import DynamicCache

        self.model = model
        self.vocab_size = vocab_size  # logits are compared over the ids both models share
        self.cache = DynamicCache()
        self.flop_model = FlopModel.of(model)
        self.calls = 0
        self.tokens = 0
        self.flops = 0

    @property
    def length(self) -> int:
        """How many tokens the cache holds."""
        return self.cache.get_seq_length()

    def append(self, ids: torch.Tensor, logits: int = 1, hidden: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model over `ids` (1, T), which follow the cached tokens, and cache them.

        Returns the logits of the last `logits` positions (logits, V) and, when `hidden`, the
        last layer's state there (after the final norm) (logits, H)."""
        past, new = self.length, ids.shape[1]
        out = run_with_cache(self.model, self.cache, input_ids=ids, logits_to_keep=logits,
                             output_hidden_states=hidden)
        self.calls += 1
        self.tokens += new
        self.flops += self.flop_model.forward(past, new, logits)
        states = out.hidden_states[-1][0, -logits:] if hidden else None
        return out.logits[0, -logits:, : self.vocab_size], states

    def rollback(self, n: int) -> None:
        """Forget the last n cached tokens (n = 0: nothing to do)."""
        if n < 0 or n > self.length:
            raise RuntimeError(f"rollback({n}) on a cache of {self.length} tokens")  # a decoder bug, not bad input
        if n > 0:
            self.cache.crop(-n)

    def rollback_to(self, length: int) -> None:
        """Keep only the first `length` tokens (no-op when the cache holds no more than that)."""
        self.rollback(max(0, self.length - length))


__all__ = ["CachedLM", "FlopModel"]
