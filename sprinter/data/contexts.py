"""Labelled rows from a draft/target pair: the accept labels, and the two context sources.

For every drafted token x at context c a row holds what the draft knew when it proposed x (its
last-layer hidden state at the last context position, q(x|c), the entropy of q, ...) and the labels
derived from p = target probabilities and q = draft probabilities at the collection temperature:

- `accept_greedy`   1 iff x is the target's argmax (greedy speculative decoding keeps x);
- `accept_sprinter` 1 iff q(x) <= p(x) (the label of the SPRINTER release; SD accepts x surely);
- `accept_soft`     min(1, p(x) / q(x)) (the probability that speculative sampling accepts x);
- `accept_relaxed`  1 iff p(x) >= lambda * max p, lambda = RELAXED_LAMBDA (0.5): the target finds x nearly as
                    likely as its own choice, the token the relaxed "ratio" rule keeps (sprinter.decode.acceptance).

Two context sources:
- `corpus_rows`: teacher forcing on dataset text. One draft and one target forward per window label
  every continuation position at once; x is the draft's own greedy (or sampled) choice there.
- `onpolicy_rows`: the contexts a verifier's own sprinter loop reaches (its accepted prefixes), labelled by
  teacher forcing along each emitted path; several continuations per prompt, so rows are not limited by the
  number of prompt windows.
- `decode_rows`: contexts that decoding reaches. The batched decode loop (sprinter.decode.batched) with the
  draft model: the draft drafts k tokens, one target forward scores the block, every drafted token becomes a
  row, and the context continues along the target's path (accepted prefix, then the target's own token).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch

from sprinter.config import check_integers, option
from sprinter.corpus import iter_documents, split_of
from sprinter.data.shards import RELAXED_LAMBDA
from sprinter.decode.acceptance import ratio_keep
from sprinter.decode.batch_cache import BatchCachedLM
from sprinter.decode.batched import BatchState, decode_batch
from sprinter.decode.drafters import BatchModelDrafter, Draft
from sprinter.decode.sampling import Sampler
from sprinter.decode.stats import DecodeStats
from sprinter.errors import SprinterError
from sprinter.features import HIDDEN, HIDDEN_PREV, TOKEN, block_features, distribution_features
from sprinter.pairs.load import Pair


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


def gather(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """probs[..., x].  # (..., V), (...) -> (...)"""
    return probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)


def accept_labels(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four accept labels of drafted tokens x under target p and draft q.  # (..., V), (..., V), (...)"""
    p_x, q_x = gather(p, x), gather(q, x)
    p_max = p.max(-1).values
    # Ties count as the argmax: a token as likely as the target's top one is an equally greedy choice.
    greedy = p_x >= p_max
    soft = torch.where(q_x > 0, (p_x / q_x.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(p_x))
    return {"accept_greedy": greedy.float(), "accept_sprinter": (q_x <= p_x).float(), "accept_soft": soft.float(),
            "accept_relaxed": ratio_keep(p_x, p_max, RELAXED_LAMBDA).float()}


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


def onpolicy_decoder(verifier: str, pair: Pair, draft_fingerprint: str):
    """A Decoder over the loaded pair with `verifier` as its gate (checked against the draft): onpolicy_rows'."""
    from sprinter.decode.decoder import Decoder
    from sprinter.decode.gates import load_learned_gate

    gate, info = load_learned_gate(verifier, draft_fingerprint, int(pair.draft.config.hidden_size), pair.device,
                                   next(pair.draft.parameters()).dtype)
    return Decoder(pair, gate, info)


@torch.inference_mode()
def onpolicy_rows(decoder, prompts: torch.Tensor, *, max_new_tokens: int, temperatures: Sequence[float],
                  label_temperature: float, seed: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Contexts the verifier's own decode loop reaches. `decoder` (a Decoder with the verifier as its gate) decodes
    each prompt in mode "sprinter" once per entry of `temperatures` (continuation c of prompt i with seed
    seed + i * len(temperatures) + c), and every position of each emitted path becomes a row, labelled at
    `label_temperature` by teacher forcing along the path (`corpus_rows`: the draft's own choice there, which at
    temperature 0 is the token the loop drafted at that context). The block features read the whole continuation
    as one block, as corpus rows do, not the loop's own blocks.

    prompts: (B, P). Returns the rows prompt-major, with `row_prompt` (0..B-1; a prompt's continuations share it,
    and so its split) and `continuation` (c: which temperature decoded the path)."""
    import warnings

    from sprinter.errors import SprinterWarning

    pair = decoder.pair
    parts = []
    for i, prompt in enumerate(prompts.tolist()):
        for c, temperature in enumerate(temperatures):
            with warnings.catch_warnings():  # the decode-time guard is about trusting an output, not about data
                warnings.simplefilter("ignore", SprinterWarning)
                out = decoder.generate(prompt, mode="sprinter", max_new_tokens=max_new_tokens, temperature=temperature,
                                       seed=seed + i * len(temperatures) + c)
            path = torch.tensor([prompt + out.token_ids], dtype=torch.long, device=prompts.device)  # (1, P + n)
            rows = corpus_rows(pair.draft, pair.target, path, len(prompt), pair.vocab_size, label_temperature, gen)
            rows["row_prompt"] = torch.full_like(rows["row_prompt"], i)
            rows["continuation"] = torch.full_like(rows["row_prompt"], c)  # 0: decoded at --temperature
            parts.append(rows)
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


class Context:
    """One prompt's decode context, as the batched loop's `outs` entry: the token path, and when it ends.

    The data stage budgets drafted rows, not emitted tokens: a prompt ends after `max_new_tokens` rows (a
    rejected token is a row too), at EOS on the target's path, or when another block would pass the context
    window. Every round drafts a whole block of k; rows past the budget are not recorded."""

    def __init__(self, prompt: list[int], *, max_new_tokens: int, k: int, eos_id: int | None, max_length: int):
        self.path, self.drafted, self.done = prompt, 0, False
        self.max_new_tokens, self.k, self.eos_id, self.max_length = max_new_tokens, k, eos_id, max_length

    @property
    def remaining(self) -> int:
        return self.k  # the loop drafts min(k, remaining): always a whole block

    def emit(self, ids: list[int]) -> None:
        """The round's accepted prefix and the target's token."""
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id) + 1]
            self.done = True
        self.path += ids
        self.drafted += min(self.k, self.max_new_tokens - self.drafted)
        if self.drafted >= self.max_new_tokens or len(self.path) + self.k > self.max_length:
            self.done = True


@torch.inference_mode()
def decode_rows(pair: Pair, prompts: torch.Tensor, *, max_new_tokens: int, k: int, temperature: float,
                gen: torch.Generator, pad_id: int, eos_id: int | None
                ) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Batched speculative decoding with `pair`'s draft and target from each prompt until it has `max_new_tokens`
    drafted rows.

    prompts: (B, P). A prompt also stops at EOS (`eos_id`; None: never) on the target's path or at the pair's
    context window.
    Returns (rows, prompt-major with `row_prompt`; the token path of each prompt).

    The loop is the batched decode loop (sprinter.decode.batched.decode_batch), all prompts in one batch; what
    the data stage adds:
    - `observe` turns every round's drafted tokens into rows: the draft's hidden states and q (the drafter's
      `record`), and p from the target's logits. At temperature 0 p and q are the untempered softmaxes
      (the labels read them); decoding itself works on one-hots.
    - `Context` ends a prompt by its drafted rows, and every round drafts exactly k tokens.
    - Both models `recompute`: every round reads each prompt's whole path again instead of keeping a KV
      cache. A kept cache computes the same values only up to float rounding, which flips near-ties of the
      greedy path and changes samples at temperature > 0; re-reading makes a row depend only on its path.
    """
    draft, target, vocab_size = pair.draft, pair.target, pair.vocab_size
    sampler = Sampler(temperature)
    contexts = [Context(row.tolist(), max_new_tokens=max_new_tokens, k=k, eos_id=eos_id, max_length=pair.max_length)
                for row in prompts]
    parts: list[dict[str, torch.Tensor]] = []

    def record(live: Sequence[int], block: Draft, logits: torch.Tensor) -> None:
        """Every drafted token (up to each prompt's budget) becomes a labelled row.  # logits: (b, k+1, V)"""
        device = logits.device
        keep = torch.tensor([[contexts[i].drafted + j < max_new_tokens for j in range(k)] for i in live],
                            device=device)  # (b, k)
        p = probabilities(logits[:, :k], temperature)  # (b, k, V): the distribution each drafted token met
        # block.hidden: (b, k, 2, H), the last layer's state and the one before it
        rows = row_columns(block.hidden[:, :, 0][keep], block.hidden[:, :, 1][keep], block.q_soft[keep], p[keep],
                           block.x[keep])
        # block features over the whole block (the kept rows are a prefix of it, so nothing kept reads a dropped one)
        rows.update({name: v[keep] for name, v in block_features(gather(block.q_soft, block.x)).items()})
        context_start = torch.tensor([len(contexts[i].path) for i in live], device=device)
        position = torch.arange(k, device=device).expand(len(live), k)
        rows["position"] = position[keep]
        rows["context_length"] = (context_start[:, None] + position)[keep]
        rows["row_prompt"] = torch.tensor(list(live), device=device)[:, None].expand(len(live), k)[keep]
        parts.append(rows)

    lm = dict(vocab_size=vocab_size, pad_id=pad_id, recompute=True)
    decode_batch(BatchCachedLM(target, **lm), BatchModelDrafter(BatchCachedLM(draft, **lm), sampler, record=True),
                 [c.path for c in contexts], state=BatchState(sampler, gen, contexts, [DecodeStats(mode="sd")
                                                                                     for _ in contexts]),
                 k_for=lambda batch: k, max_batch=len(contexts), observe=record)
    rows = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    order = torch.sort(rows["row_prompt"], stable=True).indices  # prompt-major, drafting order within a prompt
    return {name: t[order] for name, t in rows.items()}, [c.path for c in contexts]


# ------------------------------------------------------------------------------------------- prompts
def iter_windows(cfg, tokenizer) -> Iterator[torch.Tensor]:
    """Token windows of prompt_len + max_new_tokens tokens from the chosen split, in a fixed order."""
    length = cfg.prompt_len + cfg.max_new_tokens
    found = 0
    for doc in iter_documents(cfg.dataset, cfg.text_field, cfg.hub_split):
        if cfg.split != "all" and split_of(doc.id) != cfg.split:
            continue
        ids = tokenizer(doc.text)["input_ids"]
        for start in range(0, min(len(ids) // length, cfg.windows_per_document) * length, length):
            found += 1
            yield torch.tensor(ids[start: start + length], dtype=torch.long)
    if found == 0:
        raise SprinterError(f"dataset {cfg.dataset!r} has no document of at least {length} tokens "
                            f"(prompt_len + max_new_tokens) in its {cfg.split!r} split; expected some text, "
                            "or a smaller --prompt-len/--max-new-tokens")


def iter_batches(cfg, tokenizer, only: set[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the batch's first prompt, windows (B, L)) for the first num_prompts windows; with `only`, just
    those prompts, one a batch (onpolicy decodes prompt by prompt anyway)."""
    batch: list[torch.Tensor] = []
    first = 0
    for n, window in enumerate(iter_windows(cfg, tokenizer)):
        if n >= cfg.num_prompts:
            break
        if only is not None:
            if n in only:
                yield n, window[None]
            continue
        batch.append(window)
        if len(batch) == cfg.batch_size:
            yield first, torch.stack(batch)
            first, batch = n + 1, []
    if batch:
        yield first, torch.stack(batch)


# The collect options that cut a prompt list: two collections agree on them, or their prompt ids name other windows.
PROMPT_LIST = ("dataset", "split", "prompt_len", "max_new_tokens", "windows_per_document")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnPolicyOptions:
    """The onpolicy source's options (a base of the collect stage's CollectConfig)."""

    verifier: str | None = option(None, "onpolicy: the verifier whose sprinter loop (at its default threshold) makes "
                                        "the contexts")
    continuations: int = option(1, "onpolicy: continuations decoded per prompt, each its own rows: the first at "
                                   "--temperature, the others sampled at --continuation-temperature")
    continuation_temperature: float = option(0.8, "onpolicy: the temperature of continuations after the first")
    onpolicy_tokens: int = option(0, "onpolicy: tokens decoded per continuation (0: --max-new-tokens, which also "
                                     "cuts the prompt list: keep it, and decode longer with this)")
    held_out: bool = option(False, "onpolicy: only the prompts --verifier never trained on (its val and test splits, "
                                   "from its train_config.json; the prompt list it was trained on)")


def held_out_prompts(cfg) -> set[int] | None:
    """With `held_out`, the prompt ids of the verifier's val and test splits (None without): the prompt list this
    collection cuts must be the one the verifier was trained on."""
    if not cfg.held_out:
        return None
    from pathlib import Path

    from sprinter.data.shards import read_manifest
    from sprinter.train.recalibrate import val_prompts

    val, train_cfg = val_prompts(Path(cfg.verifier), "val")
    test, _ = val_prompts(Path(cfg.verifier), "test")
    trained_on = read_manifest(train_cfg["data"][0]).get("config", {})
    same = PROMPT_LIST
    if any(getattr(cfg, k) != trained_on.get(k) for k in same):
        raise SprinterError(f"held_out: this collection cuts its prompts with {[getattr(cfg, k) for k in same]} "
                            f"({same}), the verifier's data with {[trained_on.get(k) for k in same]}; expected the "
                            "same prompt list (decode longer with --onpolicy-tokens)")
    return set(val.tolist()) | set(test.tolist())


def check_onpolicy(cfg) -> None:
    """The onpolicy source's options on a CollectConfig: a verifier with it, neither without it."""
    check_integers(cfg, ("continuations",))
    check_integers(cfg, ("onpolicy_tokens",), 0)
    if cfg.source == "onpolicy" and cfg.verifier is None:
        raise SprinterError("source: got 'onpolicy' and no verifier; expected --verifier DIR (its loop decodes)")
    if cfg.source != "onpolicy" and (cfg.verifier is not None or cfg.continuations != 1 or cfg.onpolicy_tokens
                                     or cfg.held_out):
        raise SprinterError(f"verifier, continuations, onpolicy_tokens, held_out: got {cfg.verifier!r}, "
                            f"{cfg.continuations!r}, {cfg.onpolicy_tokens!r}, {cfg.held_out!r} with source="
                            f"{cfg.source!r}; expected them only with source 'onpolicy'")
    if not 0 < cfg.continuation_temperature < float("inf"):  # the continuations after the first are sampled
        raise SprinterError(f"continuation_temperature: got {cfg.continuation_temperature!r}; expected > 0")


__all__ = ["PROMPT_LIST", "Context", "OnPolicyOptions", "accept_labels", "check_onpolicy", "choose_tokens",
           "corpus_rows", "decode_rows", "held_out_prompts", "iter_batches", "iter_windows", "onpolicy_decoder",
           "onpolicy_rows", "probabilities"]
