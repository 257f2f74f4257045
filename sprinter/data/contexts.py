"""Labelled rows from a draft/target pair: the accept labels, and the two context sources.

For every drafted token x at context c a row holds what the draft knew when it proposed x (its
last-layer hidden state at the last context position, q(x|c), the entropy of q, ...) and the labels
derived from p = target probabilities and q = draft probabilities at the collection temperature:

- `accept_greedy`   1 iff x is the target's argmax (greedy speculative decoding keeps x);
- `accept_sprinter` 1 iff q(x) <= p(x) (the label of the SPRINTER release; SD accepts x surely);
- `accept_soft`     min(1, p(x) / q(x)) (the probability that speculative sampling accepts x).

Two context sources:
- `corpus_rows`: teacher forcing on dataset text. One draft and one target forward per window label
  every continuation position at once; x is the draft's own greedy (or sampled) choice there.
- `decode_rows`: contexts that decoding reaches. A batched speculative-decoding loop: the draft
  drafts k tokens, one target forward scores the block, every drafted token becomes a row, and the
  context continues along the target's path (accepted prefix, then the target's own token).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from sprinter.decode.batched import accept
from sprinter.decode.drafters import Draft
from sprinter.decode.sampling import Sampler
from sprinter.errors import SprinterError
from sprinter.features import HIDDEN, HIDDEN_PREV, TOKEN, block_features, distribution_features
from sprinter.pairs.load import run_with_cache


# ------------------------------------------------------------------------------------- pure functions
def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at the collection temperature (the untempered softmax at temperature 0), in float32."""
    logits = logits.float()
    return torch.softmax(logits / temperature if temperature > 0 else logits, dim=-1)


def choose_tokens(q: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """The draft's token: argmax at temperature 0, else a sample from q.  # (..., V) -> (...)"""
    if temperature == 0:
        return q.argmax(-1)
    flat = q.reshape(-1, q.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(q.shape[:-1])


def one_hot(x: torch.Tensor, size: int) -> torch.Tensor:
    """A one-hot distribution on each token of x.  # (...) -> (..., size) float32"""
    return torch.nn.functional.one_hot(x, size).float()


def gather(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """probs[..., x].  # (..., V), (...) -> (...)"""
    return probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)


def accept_labels(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three accept labels of drafted tokens x under target p and draft q.  # (..., V), (..., V), (...)"""
    p_x, q_x = gather(p, x), gather(q, x)
    # Ties count as the argmax: a token as likely as the target's top one is an equally greedy choice.
    greedy = p_x >= p.max(-1).values
    soft = torch.where(q_x > 0, (p_x / q_x.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(p_x))
    return {"accept_greedy": greedy.float(), "accept_sprinter": (q_x <= p_x).float(), "accept_soft": soft.float()}


def target_path(p: torch.Tensor, q: torch.Tensor, block: torch.Tensor, temperature: float,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """How far speculative decoding keeps a drafted block, and the target's next token: the batched decode
    loop's own acceptance step (sprinter.decode.batched.accept), so the data stage follows exactly the path
    decoding would.

    p: (B, k+1, V) target probabilities at each block position and after it; q: (B, k, V); block: (B, k).
    Returns (accepted (B,) in 0..k, next token (B,)): greedy match at temperature 0, else the
    speculative-sampling rule (accept x if u < p(x)/q(x); on rejection sample norm(max(0, p - q))).
    """
    b, k = block.shape
    if temperature == 0:  # the rows keep the untempered softmax; the rule reads greedy decoding's one-hots
        p, q = one_hot(p.argmax(-1), p.shape[-1]), one_hot(block, q.shape[-1])
    return accept(p, Draft(block, [k] * b, q), Sampler(temperature), gen)


def row_columns(hidden: torch.Tensor, hidden_prev: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-row columns that depend on the distributions (sprinter.features defines the draft's).
    # (N, H), (N, H), (N, V), (N, V), (N,)"""
    if not torch.isfinite(hidden).all() or not torch.isfinite(q).all() or not torch.isfinite(p).all():
        raise SprinterError("non-finite values (NaN or inf) in the draft's hidden states or in p/q; the pair "
                            "overflows in this dtype or its weights are broken: try --dtype float32")
    return {HIDDEN: hidden, HIDDEN_PREV: hidden_prev, TOKEN: x, **distribution_features(q, x),
            "target_prob": gather(p, x), **accept_labels(p, q, x)}


def with_block_columns(rows: dict[str, torch.Tensor], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Add the block features to rows laid out as (B, n) blocks in drafting order (all rows kept)."""
    return {**rows, **{k: v.reshape(-1) for k, v in block_features(rows["draft_prob"].reshape(shape)).items()}}


# ------------------------------------------------------------------------------------- context sources
@torch.inference_mode()
def corpus_rows(draft, target, windows: torch.Tensor, prompt_len: int, vocab_size: int, temperature: float,
                gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Teacher forcing: label positions prompt_len.. of each window with the draft's own choice there.

    windows: (B, L) token ids. Returns B * (L - prompt_len) rows, prompt-major, with `row_prompt`
    (0..B-1) saying which window each row came from.
    """
    b, length = windows.shape
    t = length - prompt_len  # labelled positions per window
    out = draft(input_ids=windows, output_hidden_states=True, logits_to_keep=t + 1)
    hidden = out.hidden_states[-1][:, prompt_len - 1: length - 1]  # (B, T, H): the state that predicts each x
    hidden_prev = out.hidden_states[-2][:, prompt_len - 1: length - 1]  # (B, T, H): the layer before
    q = probabilities(out.logits[:, :-1, :vocab_size], temperature)  # (B, T, V)
    p = probabilities(target(input_ids=windows, logits_to_keep=t + 1).logits[:, :-1, :vocab_size], temperature)
    x = choose_tokens(q, temperature, gen)  # (B, T)
    position = torch.arange(t, device=windows.device).expand(b, t)
    rows = row_columns(hidden.reshape(b * t, -1), hidden_prev.reshape(b * t, -1), q.reshape(b * t, -1),
                       p.reshape(b * t, -1), x.reshape(-1))
    rows = with_block_columns(rows, (b, t))  # a window's continuation is one block
    return {**rows, "position": position.reshape(-1), "context_length": (position + prompt_len).reshape(-1),
            "row_prompt": torch.arange(b, device=windows.device).repeat_interleave(t)}


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every sequence ends at the last column.  -> (B, S), (B, S)"""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each sequence's first real token.  # (B, S)"""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def draft_block(draft, ids: torch.Tensor, mask: torch.Tensor, k: int, vocab_size: int, temperature: float,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k tokens drafted one at a time with the draft's cache.
    -> block (B, k), q (B, k, V), hidden (B, k, 2, H): the last layer's state and the one before it"""
    cache = DynamicCache()
    pos = positions(mask)
    out = run_with_cache(draft, cache, input_ids=ids, attention_mask=mask, position_ids=pos,
                         output_hidden_states=True, logits_to_keep=1)
    tokens, qs, hiddens = [], [], []
    for j in range(k):
        q_j = probabilities(out.logits[:, -1, :vocab_size], temperature)
        x_j = choose_tokens(q_j, temperature, gen)
        tokens.append(x_j)
        qs.append(q_j)
        hiddens.append(torch.stack([out.hidden_states[-1][:, -1], out.hidden_states[-2][:, -1]], 1))
        if j + 1 < k:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = run_with_cache(draft, cache, input_ids=x_j[:, None], attention_mask=mask, position_ids=pos,
                                 output_hidden_states=True)
    return torch.stack(tokens, 1), torch.stack(qs, 1), torch.stack(hiddens, 1)


@torch.inference_mode()
def decode_rows(draft, target, prompts: torch.Tensor, max_new_tokens: int, k: int, vocab_size: int,
                temperature: float, gen: torch.Generator, pad_id: int, eos_id: int | None, max_length: int
                ) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Batched speculative decoding from each prompt until it has `max_new_tokens` drafted rows.

    prompts: (B, P). A prompt also stops at EOS on the target's path or at the context window.
    Returns (rows, prompt-major with `row_prompt`; the token path of each prompt).

    Why this is not the batched decode loop (sprinter.decode.batched), whose acceptance step it does share
    (`target_path`): reusing that loop would change the collected rows.
    1. Every row needs the draft's last-layer hidden state at its position; the loops' batched model API
       (BatchCachedLM.append) returns logits only.
    2. The rows are defined by forwards over each prompt's whole left-padded path (no KV cache kept between
       rounds). The cached loop computes the same values only up to float rounding, which flips near-ties
       of the greedy path and changes samples at temperature > 0, so labels and paths would move.
    3. The budget differs: a prompt stops after `max_new_tokens` drafted rows (a rejected token is a row
       too) and every round drafts exactly k tokens; the decode loops budget emitted tokens and shorten
       the last block.
    4. At temperature 0 the rows keep the untempered softmax p and q (the labels read them); decoding
       works on one-hot distributions.
    """
    device = prompts.device
    paths = [row.tolist() for row in prompts]
    drafted = [0] * len(paths)
    active = [True] * len(paths)
    parts: list[dict[str, torch.Tensor]] = []
    while any(active):
        idx = [i for i, a in enumerate(active) if a]
        ids, mask = left_pad([paths[i] for i in idx], pad_id, device)
        # 1. The draft drafts a block of k tokens from the current context.
        block, q, hidden = draft_block(draft, ids, mask, k, vocab_size, temperature, gen)
        # 2. One target forward scores the whole block (and gives the distribution after it).
        full_mask = torch.cat([mask, torch.ones_like(block)], dim=1)
        logits = target(input_ids=torch.cat([ids, block], dim=1), attention_mask=full_mask,
                        position_ids=positions(full_mask), logits_to_keep=k + 1).logits[..., :vocab_size]
        p = probabilities(logits, temperature)  # (b, k+1, V)
        # 3. Every drafted token (up to each prompt's budget) becomes a labelled row.
        keep = torch.tensor([[drafted[i] + j < max_new_tokens for j in range(k)] for i in idx], device=device)
        rows = row_columns(hidden[:, :, 0][keep], hidden[:, :, 1][keep], q[keep], p[:, :k][keep], block[keep])
        # block features over the whole block (the kept rows are a prefix of it, so nothing kept reads a dropped one)
        rows.update({name: v[keep] for name, v in block_features(gather(q, block)).items()})
        context_start = torch.tensor([len(paths[i]) for i in idx], device=device)
        position = torch.arange(k, device=device).expand(len(idx), k)
        rows["position"] = position[keep]
        rows["context_length"] = (context_start[:, None] + position)[keep]
        rows["row_prompt"] = torch.tensor(idx, device=device)[:, None].expand(len(idx), k)[keep]
        parts.append(rows)
        # 4. The context continues along the target's path: accepted prefix, then the target's token.
        accepted, next_token = target_path(p, q, block, temperature, gen)
        for r, i in enumerate(idx):
            new = block[r, : accepted[r]].tolist() + [int(next_token[r])]
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id) + 1]
                active[i] = False
            paths[i].extend(new)
            drafted[i] += min(k, max_new_tokens - drafted[i])
            if drafted[i] >= max_new_tokens or len(paths[i]) + k > max_length:
                active[i] = False
    rows = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    order = torch.sort(rows["row_prompt"], stable=True).indices  # prompt-major, drafting order within a prompt
    return {name: t[order] for name, t in rows.items()}, paths


__all__ = ["accept_labels", "choose_tokens", "corpus_rows", "decode_rows", "probabilities",
           "target_path"]
