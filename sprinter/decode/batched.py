"""Batched decoding with ragged acceptance: modes "ar", "sd" and "ngram" over many prompts at once.

Each round serves every row (sequence) still generating, in the steps of the single-sequence
`speculative` loop (sprinter.decode.loops):
1. Draft: the drafter (sprinter.decode.drafters) proposes each row's own chain x_b of n_b tokens: "ar" none;
   "sd" the draft model, k per row (batched, one draft forward per drafted position); "ngram" a lookup in
   the row's own text, 0..k tokens.
2. Verify: one target forward over every row's last emitted token and its chain, left-aligned in a block
   1 + max n_b wide; the slots after a row's chain are masked (sprinter.decode.batch_cache).
3. Accept: the speculative-sampling rule, batched over rows (acceptance.py); a slot past a row's chain never
   accepts, so row b keeps its own n_kept_b <= n_b tokens (ragged).
4. Correct: each row's own token from the residual at its first rejection, or a bonus token after its chain.
5. Emit; roll each cache back to what its row emitted (rejected slots become masked); rows that finished
   (EOS, a stop string, their budget) leave the batch, and waiting prompts take their places (continuous
   batching: at most `max_batch` rows decode at once).

The data stage runs this loop too (sprinter.data.contexts.decode_rows): an `observe` callback records every
round's chains and the target's logits as rows, its own `outs` end a prompt by the rows it recorded, and its
models keep no cache between rounds (BatchCachedLM's `recompute`).

An n-gram chain is deterministic (a one-hot q), so the rule keeps the target's distribution exactly;
at temperature 0 every row equals its prompt's `ar` output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sprinter.decode.acceptance import (
    correction,
    leading_true,
    residual,
    speculative_accept,
)
from sprinter.decode.batch_cache import BatchCachedLM
from sprinter.decode.datastore import Datastore
from sprinter.decode.drafters import BatchModelDrafter, Draft, Drafter
from sprinter.decode.emit import Emitter, GenerateOutput
from sprinter.decode.ngram import NgramDrafter
from sprinter.decode.options import DecodeOptions
from sprinter.decode.roofline import measure_i_knee, speculation_length
from sprinter.decode.sampling import Sampler, uniform
from sprinter.decode.stats import DecodeStats
from sprinter.pairs.load import Pair


def accept(p: torch.Tensor, draft: Draft, sampler: Sampler, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3 and 4 for every row: (n_kept (B,), the target's own token y (B,)).

    p: (B, 1 + n, V) the target's distribution at each row's last emitted token and each chain slot."""
    B, width, V = p.shape
    n = width - 1
    if n == 0:  # no row drafted: plain decoding
        return torch.zeros(B, dtype=torch.long, device=p.device), sampler.draw(p[:, 0], gen)
    rows = torch.arange(B, device=p.device)
    lengths = torch.tensor(draft.lengths, device=p.device)  # (B,)
    x = draft.x.to(p.device)  # (B, n)
    p_x = p[:, :n].gather(2, x[..., None])[..., 0]  # (B, n)
    q_x = torch.ones_like(p_x) if draft.q is None else draft.q.gather(2, x[..., None])[..., 0]
    # greedy: p and q are one-hot, so u = 0 decides exactly as any draw would (keep x iff p(x) = 1), and the
    # generator is left untouched (the data stage's decode_rows shares this loop and its generator's stream)
    u = torch.zeros(B, n, device=p.device) if sampler.greedy else uniform(B * n, gen, p.device).view(B, n)
    in_chain = torch.arange(n, device=p.device) < lengths[:, None]
    n_kept = leading_true(speculative_accept(p_x, q_x, u) & in_chain)  # (B,)
    # q where the target's token goes: the rejected token's q, or nothing after a fully kept chain (a bonus token)
    if draft.q is None:
        rejected = x[rows, n_kept.clamp(max=n - 1)]
        q_at = torch.nn.functional.one_hot(rejected, V).to(p.dtype) * (n_kept < lengths)[:, None]
        return n_kept, sampler.draw(residual(p[rows, n_kept], q_at), gen)
    return n_kept, sampler.draw(correction(p, draft.q, n_kept), gen)


# observe(prompt index of each row, the round's Draft, the target's logits (B, 1 + n, V)), after the verify step
Observer = Callable[[Sequence[int], Draft, torch.Tensor], None]


@dataclass
class BatchState:
    """What the batched loop carries besides the models (the batched `LoopState`): the sampler, the generator,
    and per prompt where its tokens go (`outs`: Emitters, or the data stage's contexts) and its `stats`."""

    sampler: Sampler
    gen: torch.Generator
    outs: Sequence
    stats: Sequence[DecodeStats]


def decode_batch(target: BatchCachedLM, drafter: Drafter | None, prompts: Sequence[Sequence[int]], *,
                 state: BatchState, k_for: Callable[[int], int], max_batch: int,
                 observe: Observer | None = None) -> None:
    """Decode every prompt to its Emitter in `state.outs` (budget, EOS, stop strings), at most `max_batch` at a time.

    k_for(B): the draft length per row when B rows decode (0: plain decoding). `target` starts empty;
    its cache always holds every emitted token of a row but the last. Counters go to `stats` per prompt;
    `draft_seconds` (time in `drafter.propose`) and `wall_seconds` are left to the caller. `observe`, if
    given, sees every round before its tokens are emitted."""
    sampler, gen, outs, stats = state.sampler, state.gen, state.outs, state.stats
    tokens = [list(p) for p in prompts]
    waiting = list(range(len(prompts)))
    live: list[int] = []  # prompt index of each batch row
    draft_seconds = 0.0
    while waiting or live:
        # 0. Admit waiting prompts into free rows: their caches read the prompt but its last token.
        joining = waiting[: max_batch - len(live)]
        del waiting[: len(joining)]
        if joining:
            target.admit([tokens[i][:-1] for i in joining])
            for i in joining:  # counted as the single-prompt loop counts its prompt read
                n = len(tokens[i]) - 1
                if n:
                    stats[i].target_calls += 1
                    stats[i].target_tokens += n
                    stats[i].target_flops += target.flop_model.forward(0, n, 1)
            live += joining
        seqs = [tokens[i] for i in live]
        k = k_for(len(live))
        limits = [min(k, outs[i].remaining) for i in live]
        # 1. Draft.
        start = time.perf_counter()
        draft = drafter.propose(seqs, limits, gen) if drafter is not None else _no_draft(len(live))
        chains = draft.chains()
        draft_seconds += time.perf_counter() - start
        # 2. Verify: one target forward over each row's last token and chain.
        before = list(target.lengths)
        logits = target.append([seq[-1:] + chain for seq, chain in zip(seqs, chains, strict=True)])  # (B, 1 + n, V)
        if observe is not None:
            observe(live, draft, logits)
        # 3.-4. Accept and correct, every row at once; the one host sync of the round.
        n_kept, y = accept(sampler.probs(logits), draft, sampler, gen)
        kept, ys = n_kept.tolist(), y.tolist()
        # 5. Emit, count, roll back, and let the finished rows go.
        for b, i in enumerate(live):
            chain, s_i = chains[b], stats[i]
            s_i.target_calls += 1
            s_i.target_tokens += 1 + len(chain)
            s_i.target_flops += target.flop_model.forward(before[b], 1 + len(chain), 1 + len(chain))
            s_i.drafted += len(chain)
            s_i.accepted += kept[b]
            s_i.rejected += len(chain) - kept[b]
            s_i.count_block(len(chain), kept[b])
            if draft.cost is not None:
                calls, read, flops = draft.cost[b]
                s_i.draft_calls, s_i.draft_tokens, s_i.draft_flops = (s_i.draft_calls + calls, s_i.draft_tokens + read,
                                                                     s_i.draft_flops + flops)
            tokens[i] += chain[: kept[b]] + [ys[b]]
            outs[i].emit(chain[: kept[b]] + [ys[b]])
        rows = [b for b, i in enumerate(live) if not outs[i].done]
        live = [live[b] for b in rows]
        lengths = [len(tokens[i]) - 1 for i in live]
        target.select(rows)
        target.rollback_to(lengths)
        if drafter is not None:
            drafter.keep(rows, lengths)
    for s_i in stats:
        s_i.draft_seconds = draft_seconds


def generate_batch(pair: Pair, prompts: Sequence[Sequence[int]], options: DecodeOptions, *,
                   on_text: Callable[[str], None] | None = None, datastore: Datastore | None = None
                   ) -> list[GenerateOutput]:
    """`Decoder.generate` for a list of prompts (checked already) in mode "ar", "sd" or "ngram"."""
    device, mode, sampler = pair.device, options.mode, options.sampler
    gen = torch.Generator(device=device).manual_seed(int(options.seed))
    eos = pair.tokenizer.eos_token_id
    outs = [Emitter(pair.tokenizer, options.max_new_tokens, eos, options.stop, on_text) for _ in prompts]
    stats = [DecodeStats(mode=mode, batch_size=len(prompts)) for _ in prompts]
    pad = eos if eos is not None else 0
    target = BatchCachedLM(pair.target, pair.vocab_size, pad_id=pad)
    drafter: Drafter | None = None
    if mode == "sd":
        drafter = BatchModelDrafter(BatchCachedLM(pair.draft, pair.vocab_size, pad_id=pad), sampler)
        k_for = lambda batch: options.k  # noqa: E731
    elif mode == "ngram":
        drafter = NgramDrafter(options.ngram_n, datastore=datastore)
        if options.ngram_k is not None:
            k_for = lambda batch: options.ngram_k  # noqa: E731
        else:
            knee = options.i_knee if options.i_knee is not None else measure_i_knee(device, pair.dtype)
            k_for = lambda batch: speculation_length(knee, batch)  # noqa: E731
    else:
        k_for = lambda batch: 0  # noqa: E731

    start = time.perf_counter()
    decode_batch(target, drafter, prompts, state=BatchState(sampler, gen, outs, stats), k_for=k_for,
                 max_batch=options.max_batch or len(prompts))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for out, st in zip(outs, stats, strict=True):
        st.wall_seconds, st.new_tokens = seconds, len(out.ids)
    return [GenerateOutput(text=out.text(), token_ids=out.ids, stats=st, stop_reason=out.stop_reason)
            for out, st in zip(outs, stats, strict=True)]


def _no_draft(rows: int) -> Draft:
    """Mode "ar": no row drafts."""
    return Draft(torch.zeros(rows, 0, dtype=torch.long), [0] * rows, None, None, [[] for _ in range(rows)])


__all__ = ["BatchState", "Observer", "accept", "decode_batch", "generate_batch"]
