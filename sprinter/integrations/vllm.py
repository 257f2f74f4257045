"""sprinter inside vLLM: the draft model and a trained verifier as a vLLM speculative proposer.

    vllm serve TARGET --speculative-config '{"method": "custom_class", "num_speculative_tokens": 8,
        "model": "sprinter.integrations.vllm.SprinterProposer"}'

with `SPRINTER_VLLM_CONFIG=proposer.yaml` in the environment (a `ProposerConfig`: the draft's folder, the verifier's,
the threshold). vLLM builds the proposer with `cls(vllm_config)`, hands it the loaded target in `load_model`, and each
step calls `propose(...)`, which returns one chain of draft tokens per request, each of its own length (docs/vllm.md).

What the verifier can do inside vLLM: vLLM's rejection sampler is fixed (no plugin point for the acceptance rule), so
every proposed token is checked by the target and the output is vLLM's own. The verifier is a lossless *stop rule*
(sprinter's `sd-gated`, SpecDec++): a request's chain ends at the first token it flags (P(accept) < threshold),
or at K, so the target is not asked to check tokens the verifier expects it to reject. SPRINTER's lossy mode (the
target skipped where the verifier passes a token) would need a patched vLLM.

How the proposer drafts, per vLLM step (numbered as in the code):
1. find each request's draft cache: vLLM passes no request ids, only each row's tokens, so a row is matched to the
   cached row sharing the longest prefix with it (one to one). Rows nobody matches belong to finished requests and
   are freed; rows of new requests are admitted with their prompt;
2. roll each cache back to what it shares with the request's tokens (the rejected drafts go) and read the rest;
3. draft all requests as one batch (sprinter.decode.batch_cache), one token per forward; after each token the
   verifier reads the draft's state at it, and a request whose token is flagged, or whose chain reached K, stops
   drafting (its row reads masked slots while the others go on).
Drafting is greedy (the draft's argmax): vLLM gets no draft probabilities from a custom proposer and checks the
chain as a deterministic proposal, which is lossless at any temperature.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sprinter.config import build_config, load_yaml, option
from sprinter.decode.batch_cache import BatchCachedLM
from sprinter.decode.gates import LearnedGate, check_threshold, load_learned_gate
from sprinter.errors import SprinterError
from sprinter.features import BLOCK, DISTRIBUTION, HIDDEN, HIDDEN_PREV, TOKEN, block_features, distribution_features

CONFIG_ENV = "SPRINTER_VLLM_CONFIG"  # the environment variable naming the proposer's YAML file
CLASS_PATH = "sprinter.integrations.vllm.SprinterProposer"  # what speculative_config's "model" holds


@dataclass
class ProposerConfig:
    """The proposer's settings, read from the YAML file named by SPRINTER_VLLM_CONFIG (the speculative config's
    "model" field holds the class path, so it cannot hold these)."""

    draft: str = option("", "the draft model's folder (it must share the target's tokenizer)")
    verifier: str | None = option(None, "a verifier trained for this draft (scripts/train.py); none: every chain "
                                        "is num_speculative_tokens long")
    threshold: float | None = option(None, "a token is flagged (its chain ends there) when the verifier's P(accept) "
                                           "is below this; none: the verifier's calibrated default")
    trace: str | None = option(None, "append each step's chain lengths (one JSON list per line, one entry per "
                                     "drafting request) to this file: for tests and measurements")

    def __post_init__(self) -> None:
        if not isinstance(self.draft, str) or not self.draft:
            raise SprinterError(f"{CONFIG_ENV}: draft: got {self.draft!r}; expected the draft model's folder")
        if self.verifier is not None and not isinstance(self.verifier, str):
            raise SprinterError(f"{CONFIG_ENV}: verifier: got {self.verifier!r}; expected a folder, or none")
        if self.threshold is not None:
            check_threshold(self.threshold)


def load_config(path: str | Path | None = None) -> ProposerConfig:
    """The ProposerConfig in `path`, by default the file SPRINTER_VLLM_CONFIG names."""
    path = path if path is not None else os.environ.get(CONFIG_ENV)
    if not path:
        raise SprinterError(f"{CONFIG_ENV} is not set; expected the path of the sprinter proposer's YAML file "
                            "(draft: DIR, verifier: DIR, threshold: P), see docs/vllm.md")
    return build_config(ProposerConfig, load_yaml(path), f"{CONFIG_ENV} {str(path)!r}")


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def match_rows(held: Sequence[np.ndarray], seqs: Sequence[np.ndarray]) -> list[int | None]:
    """For each sequence, the held row (index) it continues: the one sharing the longest non-empty prefix with it,
    one to one, longest matches first. None: a new request."""
    pairs = sorted(((common_prefix(h, s), -i, -r) for i, s in enumerate(seqs) for r, h in enumerate(held)),
                   reverse=True)
    out: list[int | None] = [None] * len(seqs)
    taken = set()
    for shared, i, r in pairs:
        if shared and out[-i] is None and -r not in taken:
            out[-i] = -r
            taken.add(-r)
    return out


def accept_probs(gate: LearnedGate, logits: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor | None,
                 block_probs: list[torch.Tensor], position: int) -> torch.Tensor:
    """The verifier's P(accept) of each row's drafted token x, from the features the data stage defined
    (sprinter.features), computed for the whole batch at once. block_probs: q(x) of the block's earlier tokens and
    this one, in order.  # (B, V), (B,), (B, 2, H), [(B,)] * (position + 1) -> (B,)"""
    q_soft = torch.softmax(logits.float(), -1)  # greedy drafting: the untempered softmax is the draft's confidence
    features: dict[str, torch.Tensor] = {}
    if HIDDEN in gate.features:
        features[HIDDEN] = hidden[:, 0]
    if HIDDEN_PREV in gate.features:
        features[HIDDEN_PREV] = hidden[:, 1]
    if TOKEN in gate.features:
        features[TOKEN] = x
    wanted = tuple(f for f in gate.features if f in DISTRIBUTION)
    if wanted:
        features.update(distribution_features(q_soft, x, wanted))
    if set(gate.features) & set(BLOCK):
        features.update({k: v[:, -1] for k, v in block_features(torch.stack(block_probs, 1)).items()})
    if "position" in gate.features:
        features["position"] = torch.full_like(x, position, dtype=torch.float32)
    return torch.sigmoid(gate.verifier({k: v.to(gate.dtype) if v.is_floating_point() else v
                                        for k, v in features.items()}).float())


class SprinterProposer:
    """A vLLM speculative proposer (method "custom_class"): the draft model drafts each request's chain, the
    verifier ends it at the first flagged token. vLLM calls `load_model(target)` once, then `propose` every step."""

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.target_vocab = int(vllm_config.model_config.get_vocab_size())
        self.config = load_config()
        self.lm: BatchCachedLM | None = None
        self.gate: LearnedGate | None = None
        self.held: list[np.ndarray] = []  # the tokens each cache row has read, in the cache's row order

    def load_model(self, target: torch.nn.Module) -> None:
        """Load the draft (and the verifier) on the target's device, in float32 (the verifier's features are
        defined on the draft's float32 states)."""
        from sprinter.decode.decoder import _hidden_size
        from sprinter.pairs.load import fingerprint, load_model
        from sprinter.verifier import check_vocabulary

        weight = next(target.parameters(), None)
        device = weight.device if weight is not None else torch.device("cpu")
        draft = load_model(self.config.draft, "draft", device, torch.float32)
        vocab = min(draft.config.vocab_size, self.target_vocab)
        if self.config.verifier is not None:
            self.gate, info = load_learned_gate(self.config.verifier, fingerprint(self.config.draft),
                                                _hidden_size(self.config.draft, False), device, torch.float32)
            check_vocabulary(info, vocab, self.config.verifier)
            if self.config.threshold is not None:
                self.gate.threshold = self.config.threshold
        self.lm = BatchCachedLM(draft, vocab, 0, draft.config.eos_token_id or 0)

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings: object = None, **unused: object) -> list[list[int]]:
        """One chain per row of vLLM's batch (empty for rows that sampled nothing this step, e.g. mid-prefill)."""
        if self.lm is None:
            raise RuntimeError("SprinterProposer.propose before load_model")  # a vLLM contract change
        rows = [i for i, sampled in enumerate(sampled_token_ids)
                if sampled and num_tokens_no_spec[i] < self.max_model_len]
        chains: list[list[int]] = [[] for _ in sampled_token_ids]
        if not rows:  # every request mid-prefill (or at its length limit): the caches wait for the next step
            return chains
        seqs = [np.asarray(token_ids_cpu[i, : int(num_tokens_no_spec[i])]) for i in rows]
        limits = [min(self.k, self.max_model_len - len(s)) for s in seqs]
        # 1. Each row's cache (None: a new request); unmatched caches belong to finished requests and go.
        found = match_rows(self.held, seqs)
        old = [i for i, r in enumerate(found) if r is not None]
        new = [i for i, r in enumerate(found) if r is None]
        self._keep([found[i] for i in old],
                   [min(common_prefix(self.held[found[i]], seqs[i]), len(seqs[i]) - 1) for i in old])
        if new:  # a new row's cache reads its prompt but the last token (step 2 reads that one)
            self.lm.admit([seqs[i][:-1].tolist() for i in new])
            self.held += [seqs[i][:-1] for i in new]
        order = old + new  # the cache's row order
        seqs, limits = [seqs[i] for i in order], [limits[i] for i in order]
        # 2. Read what each cache has not (the tokens after its shared prefix).
        unseen = [s[len(h):].tolist() for s, h in zip(seqs, self.held)]
        self.held = list(seqs)
        drafted = self._draft(unseen, limits)
        for i, chain in zip(order, drafted):
            chains[rows[i]] = chain
        if self.config.trace:
            with open(self.config.trace, "a", encoding="utf-8") as log:
                log.write(json.dumps([len(chains[i]) for i in rows]) + "\n")
        return chains

    def _keep(self, rows: list[int], lengths: list[int]) -> None:
        """Keep only these cache rows, in this order, each holding only its first `lengths` tokens."""
        self.lm.select(rows)
        self.lm.rollback_to(lengths)
        self.held = [self.held[r][:n] for r, n in zip(rows, lengths)]

    def _draft(self, unseen: list[list[int]], limits: list[int]) -> list[list[int]]:
        """3. Greedy chains for every row at once, each ending at its first flagged token or at its limit."""
        gate = self.gate
        hidden = bool(gate is not None and gate.hidden_layers)
        chains: list[list[int]] = [[] for _ in unseen]
        going = [limit > 0 for limit in limits]
        block_probs: list[torch.Tensor] = []
        logits, states = self.lm.append_last(unseen, hidden=hidden)  # (B, V), (B, 2, H) | None
        for position in range(max(limits)):
            x = logits.argmax(-1)  # (B,)
            flagged = [False] * len(chains)
            if gate is not None:
                block_probs.append(torch.softmax(logits.float(), -1).gather(-1, x[:, None])[:, 0])
                flagged = (accept_probs(gate, logits, x, states, block_probs, position) < gate.threshold).tolist()
            feed: list[list[int]] = []
            for b, token in enumerate(x.tolist()):
                if going[b]:
                    chains[b].append(token)
                    going[b] = not flagged[b] and len(chains[b]) < limits[b]
                feed.append([token] if going[b] else [])
            if not any(going):
                break
            logits, states = self.lm.append_last(feed, hidden=hidden)
            self.held = [np.append(h, f) if f else h for h, f in zip(self.held, feed)]
        return chains


__all__ = ["CLASS_PATH", "CONFIG_ENV", "ProposerConfig", "SprinterProposer", "accept_probs", "load_config",
           "match_rows"]
