"""A causal LM over a batch of sequences that share one rectangular KV cache (the batched `CachedLM`).

Row b of the cache holds sequence b's tokens in order, interleaved with masked slots: the padding of
blocks narrower than the batch's widest (rows read different numbers of tokens per forward), and
tokens that were rolled back (rejected drafts). `valid` (B, L) marks the real slots. Every forward
passes it as the 2D attention mask and gives each new token its position = the number of real
tokens before it in its row, so every sequence sees exactly the keys, values and positions it would
see alone (up to float rounding of differently shaped matmuls).

The cache only grows by whole columns. Rolling back masks slots; `crop(-n)` (n > 0 only,
docs/references.md §6) drops the trailing columns no row uses any more, and `compact` squeezes the masked
slots out (a gather per layer) once they make up a large part of the width. Finished rows leave with
`select`, so they stop costing work.

`recompute=True` keeps no cache from one round to the next: `rollback_to`, `select` and `admit` drop it and
keep each row's tokens on the host, and the next `append` reads every row's whole sequence again, left-padded
(rows end at the last column), as a forward without a cache would; the appends after it in the same round
use the cache. Each round's values then depend on the sequences alone, not on the shapes of earlier rounds'
forwards (the data stage defines its rows so: sprinter.data.contexts). The FLOP counters of the loops
assume a kept cache.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sprinter.decode.cache import FlopModel
from sprinter.pairs.load import run_with_cache

# Compact once this many slots of the fullest row are masked, and they are at least a quarter of the width:
# attention reads every slot, the gather copies the whole cache once.
COMPACT_MIN_SLOTS = 16


class BatchCachedLM:
    """A causal LM and a DynamicCache over B rows, with named operations `append`, `rollback_to`,
    `select`."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, batch_size: int = 0, pad_id: int = 0, *,
                 recompute: bool = False):
        from transformers import DynamicCache

        self.model = model
        self.vocab_size = vocab_size  # logits are compared over the ids both models share
        self.pad_id = pad_id  # the input id of masked slots (never attended to)
        self.device = next(model.parameters()).device
        self.flop_model = FlopModel.of(model)
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)  # (B, L)
        self.lengths = [0] * batch_size  # real tokens per row (host copy: the loop builds its inputs there)
        # recompute: each row's tokens, re-read by the first append after the cache is dropped
        self.tokens: list[list[int]] | None = [[] for _ in range(batch_size)] if recompute else None

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        """L: the slots per row, masked ones included."""
        return self.valid.shape[1]

    def append(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the model over `rows` (one list of new token ids per row, possibly empty), which follow each row's
        cached tokens, and cache them. Rows are left-aligned in a block as wide as the longest one; the rest
        of the block is masked. Returns the logits of every column of the block.  # -> (B, W, V)"""
        width = max(map(len, rows))
        logits, _, first = self._forward(rows, width)
        if any(first):  # a recompute re-read ends every row at the last column: move its tokens to the left
            index = (torch.tensor(first, device=self.device)[:, None] + torch.arange(width, device=self.device))
            logits = logits.gather(1, index.clamp(max=width - 1)[..., None].expand(-1, -1, logits.shape[-1]))
        return logits

    def append_last(self, rows: Sequence[Sequence[int]], *, hidden: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`append`, returning only what follows each row's last new token: its logits and, when `hidden`, the
        states there of the last layer (after the final norm) and the one before it. A row with no new token
        gives any column's.  # -> (B, V), (B, 2, H) | None"""
        # a recompute re-read ends every row at the last column: one column of logits is enough
        keep = 1 if self.tokens is not None and not self.width else max(map(len, rows))
        logits, states, first = self._forward(rows, keep, hidden=hidden)
        if keep == 1:  # the one column is every row's last (a draft step: one token or none per row)
            return logits[:, 0], None if states is None else states[:, 0]
        last = torch.tensor([max(f + len(row) - 1, 0) for f, row in zip(first, rows)], device=self.device)
        index = torch.arange(len(rows), device=self.device)
        return logits[index, last], None if states is None else states[index, last]

    def extend(self, rows: Sequence[Sequence[int]]) -> None:
        """`append` for tokens whose logits nobody reads (a prompt): the output projection runs on one column."""
        self._forward(rows, 1)

    def _forward(self, rows: Sequence[Sequence[int]], keep: int, *, hidden: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """Run the model over `rows` after each row's cached tokens. Returns the logits (B, keep, V) and, when
        `hidden`, the states of the last layer and the one before it (B, keep, 2, H) of the block's last `keep`
        columns, and where each row's first new token is among those columns (negative: before them)."""
        new = [len(row) for row in rows]
        reread = self.tokens is not None and not self.width
        if reread:  # recompute, first forward of a round: every row's whole sequence, ending at the last column
            rows = [held + list(row) for held, row in zip(self.tokens, rows, strict=True)]
            self.tokens, self.lengths = [[] for _ in rows], [0] * len(rows)
        width = max(map(len, rows))
        sizes = [len(row) for row in rows]
        pads = [width - n for n in sizes]
        ids = torch.tensor([[self.pad_id] * pad + list(row) if reread else list(row) + [self.pad_id] * pad
                            for row, pad in zip(rows, pads)], dtype=torch.long, device=self.device)  # (B, W)
        index = torch.arange(width, device=self.device)[None]  # (1 or B, W): 0, 1, ... from a row's first token
        if reread:
            index = index - torch.tensor(pads, device=self.device)[:, None]
        new_valid = (index >= 0) & (index < torch.tensor(sizes, device=self.device)[:, None])  # (B, W)
        before = torch.tensor(self.lengths, device=self.device)
        positions = torch.where(new_valid, before[:, None] + index, 0)  # masked slots: any position in range
        mask = torch.cat([self.valid, new_valid], 1)  # (B, L + W)
        out = run_with_cache(self.model, self.cache, input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                             logits_to_keep=keep, output_hidden_states=hidden)
        self.valid = mask
        self.lengths = [n + len(row) for n, row in zip(self.lengths, rows)]
        if self.tokens is not None:
            self.tokens = [held + list(row) for held, row in zip(self.tokens, rows)]
        first = [keep - n for n in new] if reread else [0] * len(rows)  # row b's new tokens: its last new[b]
        # the data stage's rows read the last layer's state and the one before it (sprinter.features)
        states = torch.stack([out.hidden_states[-1][:, -keep:], out.hidden_states[-2][:, -keep:]], 2) if hidden \
            else None
        return out.logits[:, -keep:, : self.vocab_size], states, first

    def admit(self, rows: Sequence[Sequence[int]]) -> None:
        """Add rows after the current ones, their cache filled with `rows` (the prompts, read in a forward of
        their own so the rows already decoding wait one forward, not one per prompt token of the widest)."""
        if self.tokens is not None:  # recompute: the next append reads them
            self.tokens += [list(row) for row in rows]
            self.lengths = self.lengths + [len(row) for row in rows]
            self._drop()
            return
        new = BatchCachedLM(self.model, self.vocab_size, len(rows), self.pad_id)
        if max(map(len, rows), default=0):
            new.extend(rows)
        width = max(self.width, new.width)
        mine, theirs = self._layers(), new._layers()
        if mine or theirs:  # left-pad the narrower side with masked slots (zeros), then stack the rows
            like = mine or theirs
            mine = mine or [(k.new_zeros((self.batch_size, *k.shape[1:])),) * 2 for k, _ in like]
            theirs = theirs or [(k.new_zeros((new.batch_size, *k.shape[1:])),) * 2 for k, _ in like]
            self._set_layers([tuple(torch.cat([_pad_left(a, width), _pad_left(b, width)]) for a, b in zip(x, y))
                              for x, y in zip(mine, theirs)])
        self.valid = torch.cat([_pad_left(self.valid, width), _pad_left(new.valid, width)])
        self.lengths = self.lengths + new.lengths

    def rollback_to(self, lengths: Sequence[int]) -> None:
        """Keep only the first `lengths[b]` real tokens of each row (rows already that short are unchanged)."""
        if self.tokens is not None:
            self.tokens = [held[:n] for held, n in zip(self.tokens, lengths, strict=True)]
            self.lengths = [len(held) for held in self.tokens]
            self._drop()
            return
        target = torch.tensor(lengths, device=self.device)
        self.valid &= self.valid.cumsum(1) <= target[:, None]
        self.lengths = [min(n, t) for n, t in zip(self.lengths, lengths)]
        self._trim()

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (the others finished)."""
        if list(rows) == list(range(self.batch_size)):
            return
        if self.tokens is not None:
            self.tokens = [self.tokens[r] for r in rows]
            self.lengths = [self.lengths[r] for r in rows]
            self._drop()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.width:
            self.cache.batch_select_indices(index)
        else:  # no slot yet: a fresh cache (an empty one may still hold the old batch size)
            self._set_layers([])
        self.valid = self.valid[index]
        self.lengths = [self.lengths[r] for r in rows]
        self._trim()

    def _drop(self) -> None:
        """recompute: forget the cache (the rows' tokens stay on the host)."""
        self._set_layers([])
        self.valid = torch.zeros(len(self.lengths), 0, dtype=torch.bool, device=self.device)

    def _trim(self) -> None:
        """Drop the trailing columns no row uses; compact when masked slots pile up."""
        used = self.valid.any(0).nonzero()  # one host sync
        unused = self.width - (int(used[-1]) + 1 if len(used) else 0)
        if unused > 0:
            self.cache.crop(-unused)
            self.valid = self.valid[:, : self.width - unused]
        masked = self.width - max(self.lengths, default=0)
        if masked >= COMPACT_MIN_SLOTS and 4 * masked >= self.width:
            self.compact()

    def compact(self) -> None:
        """Gather each row's real slots to the right end of a block as wide as the fullest row (order kept;
        positions were fixed when the keys were computed, so only the masking changes)."""
        width, full = self.width, max(self.lengths)
        slots = torch.arange(width, device=self.device)
        # masked slots sort first (by slot), real ones after them (by slot): the last `full` are the kept ones
        order = torch.where(self.valid, slots + width, slots).argsort(1)[:, width - full:]  # (B, full)
        index = order[:, None, :, None]
        self._set_layers([tuple(t.gather(2, index.expand(-1, t.shape[1], -1, t.shape[3])) for t in kv)
                          for kv in self._layers()])
        self.valid = self.valid.gather(1, order)

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values), (B, heads, L, head dim); [] while the cache holds no slot."""
        return [(layer.keys, layer.values) for layer in self.cache.layers] if self.width else []

    def _set_layers(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(layers)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Masked (zero) slots before a row block so it is `width` slots wide: dim 1 of (B, L), dim 2 of (B, H, L, D)."""
    dim = 1 if t.dim() == 2 else 2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


__all__ = ["BatchCachedLM"]
