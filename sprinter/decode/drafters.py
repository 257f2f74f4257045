"""Where drafted tokens come from: one two-method interface, so a draft model and an n-gram table are
interchangeable in every decode loop (single-prompt, batched, async).

A drafter `propose`s a chain of at most `limits[b]` tokens after each row's sequence (the prompt and what
was emitted), with the distributions q they were drawn from, and is told by `keep` which rows go on and how
many of their tokens were verified: it forgets the rest. A deterministic drafter (an n-gram lookup,
sprinter.decode.ngram) gives no q (a one-hot on each token); the speculative-sampling rule then stays lossless.

The single-prompt loop consults a gate after each drafted token: it passes `stop`, a callback that reads
the token's `DraftStep` and ends the chain early by returning True.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch

from sprinter.decode.batch_cache import BatchCachedLM
from sprinter.decode.cache import CachedLM
from sprinter.decode.sampling import Sampler

if TYPE_CHECKING:
    from sprinter.decode.engine import FusedDraftStep


@dataclass
class DraftStep:
    """One drafted token and what a gate may read about it."""

    token: torch.Tensor  # () long: the drafted token x
    q: torch.Tensor  # (V,) the distribution x was drawn from (one-hot when greedy)
    q_soft: torch.Tensor  # (V,) the draft's confidence: q when sampling, the untempered softmax when greedy
    hidden: torch.Tensor | None  # (H,) the draft's last-layer state at the position that produced x
    hidden_prev: torch.Tensor | None = None  # (H,) the state of the layer before the last there (when asked for)
    p_accept: torch.Tensor | None = None  # () the gate's P(accept), when a fused step computed it already


StopRule = Callable[[DraftStep, int], bool]  # (step, its 0-based position in the chain) -> end the chain here


@dataclass
class Draft:
    """One round's chains: row b drafted `lengths[b]` tokens, x[b, :lengths[b]]."""

    x: torch.Tensor  # (B, n) long, n = max(lengths); zero past a row's chain
    lengths: list[int]
    q: torch.Tensor | None  # (B, n, V) the distribution of each chain slot, zero past a row's chain; None: one-hot
    cost: list[tuple[int, int, int]] | None = None  # per row: draft forwards, tokens read, FLOPs (None: not counted)
    host: list[list[int]] | None = None  # the chains as lists, when the drafter has them (saves a device sync)
    # What a verifier reads about each slot, from a drafter made with `record=True` (past a row's chain: unused):
    q_soft: torch.Tensor | None = None  # (B, n, V) q when sampling, the untempered softmax when greedy
    hidden: torch.Tensor | None = None  # (B, n, 2, H) the draft's states (the last layer, the one before) there

    def chains(self) -> list[list[int]]:
        """Each row's drafted tokens."""
        if self.host is None:
            self.host = [row[:n] for row, n in zip(self.x.tolist(), self.lengths, strict=True)]
        return self.host


class Drafter(Protocol):
    def propose(self, seqs: Sequence[Sequence[int]], limits: Sequence[int], gen: torch.Generator, *,
                stop: StopRule | None = None) -> Draft:
        """A chain of at most limits[b] tokens after each row's whole sequence so far (prompt and emitted).
        Rows beyond those of the last `keep` are new. `stop` (one row only) may end the chain early."""

    def keep(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Only these rows go on (the others finished), each with only its first `lengths` tokens verified."""


class ModelDrafter:
    """A draft causal LM with its own KV cache, for one sequence, fed only the tokens it has not seen."""

    def __init__(self, lm: CachedLM, sampler: Sampler, *, hidden_layers: int = 0,
                 fused: FusedDraftStep | None = None):
        self.lm = lm
        self.sampler = sampler
        # How many of the last layers' states each gated step returns (1: the last; 2 adds the layer before it):
        # they cost an extra output, and only a learned gate reads them.
        self.hidden_layers = hidden_layers
        self.fused = fused  # compiled greedy step with the gate in it (sprinter.decode.engine), for gated chains
        self.device = next(lm.model.parameters()).device

    def propose(self, seqs: Sequence[Sequence[int]], limits: Sequence[int], gen: torch.Generator, *,
                stop: StopRule | None = None) -> Draft:
        if len(seqs) != 1:
            raise RuntimeError(f"ModelDrafter drafts for one sequence; got {len(seqs)}")  # a decoder bug
        (seq,), (limit,) = seqs, limits
        hidden_layers = self.hidden_layers if stop is not None else 0
        ids = torch.tensor([seq[self.lm.length:]], dtype=torch.long, device=self.device)  # (1, unseen)
        xs: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        fused = self.fused if stop is not None else None
        while len(xs) < limit:
            # The draft reads what it has not (the last emitted token(s), then its own previous token).
            if fused is not None and fused.fits(self.lm.length, ids.shape[1], self.lm.capacity):
                x, q, q_soft, hidden, p_accept = self.lm.append_fused(ids, fused, len(xs))  # one graph, no sync
                step = DraftStep(token=x, q=q, q_soft=q_soft, hidden=hidden, p_accept=p_accept)
            else:
                logits, hidden = self.lm.append(ids, hidden=hidden_layers)  # (1, V), (1, layers, H)
                q = self.sampler.probs(logits[0])
                x = self.sampler.draw(q, gen)
                step = None if stop is None else DraftStep(
                    token=x, q=q, q_soft=self.sampler.soft_probs(logits[0]),
                    hidden=None if hidden is None else hidden[0, 0],
                    hidden_prev=hidden[0, 1] if hidden_layers > 1 else None)
            xs.append(x)
            qs.append(q)
            ids = x.view(1, 1)
            if stop is not None and stop(step, len(xs) - 1):
                break
        if not xs:
            return Draft(torch.zeros(1, 0, dtype=torch.long, device=self.device), [0], None)
        return Draft(torch.stack(xs)[None], [len(xs)], torch.stack(qs)[None])  # (1, n), (1, n, V)

    def keep(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        if list(rows) == [0]:
            self.lm.rollback_to(lengths[0])


class BatchModelDrafter:
    """A draft causal LM over many sequences with one batched cache (sprinter.decode.batch_cache).

    record=True also returns each slot's `q_soft` and `hidden` (the data stage records them as rows)."""

    def __init__(self, lm: BatchCachedLM, sampler: Sampler, *, record: bool = False):
        self.lm, self.sampler, self.record = lm, sampler, record

    def propose(self, seqs: Sequence[Sequence[int]], limits: Sequence[int], gen: torch.Generator, *,
                stop: StopRule | None = None) -> Draft:
        if stop is not None:
            raise RuntimeError("BatchModelDrafter takes no stop rule (no batched mode has a gate)")  # a decoder bug
        read_prompt = [0] * len(seqs)  # prompt tokens each new row's cache read this round
        if len(seqs) > self.lm.batch_size:  # new rows: read their prompts (all but the last token)
            new = [seq[:-1] for seq in seqs[self.lm.batch_size:]]
            read_prompt[self.lm.batch_size:] = map(len, new)
            self.lm.admit(new)
        prompt_cost = [(1, n, self.lm.flop_model.forward(0, n, 1)) if n else (0, 0, 0) for n in read_prompt]
        if not max(limits):
            empty = torch.zeros(len(seqs), 0, dtype=torch.long, device=self.lm.device)
            return Draft(empty, [0] * len(seqs), None, prompt_cost, [[] for _ in seqs])
        before = list(self.lm.lengths)
        # 1. Catch up on the tokens the draft has not read (the last emitted one; two after a fully kept chain).
        unseen = [seq[n:] for seq, n in zip(seqs, before, strict=True)]
        logits, hidden = self.lm.append_last(unseen, hidden=self.record)  # (B, V), (B, 2, H) | None
        # 2. Draft position j for the rows whose chain is longer than j (the others read a masked slot).
        xs, qs, softs, states, host = [], [], [], [], []
        for j in range(max(limits)):
            if j:
                step = [[x] if limit > j else [] for x, limit in zip(host[-1], limits, strict=True)]
                logits, hidden = self.lm.append_last(step, hidden=self.record)
            q = self.sampler.probs(logits)  # (B, V)
            qs.append(q)
            xs.append(self.sampler.draw(q, gen))
            host.append(xs[-1].tolist())  # the next forward's input ids are built on the host
            if self.record:
                softs.append(self.sampler.soft_probs(logits))
                states.append(hidden)
        chains = [[x[b] for x in host[:limit]] for b, limit in enumerate(limits)]
        in_chain = torch.arange(len(xs), device=q.device) < torch.tensor(limits, device=q.device)[:, None]
        x = torch.stack(xs, 1) * in_chain  # (B, n)
        q = torch.stack(qs, 1) * in_chain[..., None]  # (B, n, V)
        read = [after - n for after, n in zip(self.lm.lengths, before, strict=True)]
        cost = [(c + limit, t + r, f + self.lm.flop_model.forward(n, r, limit))
                for (c, t, f), limit, r, n in zip(prompt_cost, limits, read, before, strict=True)]
        recorded = {"q_soft": torch.stack(softs, 1), "hidden": torch.stack(states, 1)} if self.record else {}
        return Draft(x, list(limits), q, cost, chains, **recorded)

    def keep(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        self.lm.select(rows)
        self.lm.rollback_to(lengths)


__all__ = ["BatchModelDrafter", "Draft", "DraftStep", "Drafter", "ModelDrafter", "StopRule"]
