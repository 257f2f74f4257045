"""The verifier's input features: one definition, used by the data stage and by the decode-time gate.

A feature must mean the same thing where the verifier learns it (sprinter.data.contexts) and where it is
read (sprinter.decode.gates.LearnedGate), so each one is computed here, by one function, from what both
places hold: the draft's distribution q over the vocabulary at the drafted position, the drafted token x,
the draft's hidden states, and the draft probabilities of the tokens drafted before x in the same block.

- vectors: `hidden` (the draft's last layer, hidden_states[-1]), `hidden_prev_layer` (the layer before it,
  hidden_states[-2]: for a one-block draft, the embedding output);
- `token_id`: the drafted token (the verifier embeds it);
- scalars of q (DISTRIBUTION): q(x), its entropy, the top-k probabilities (sorted), the top-1/top-2 margin;
- scalars of the block so far (BLOCK), causal, so a decode loop can supply them: `prev_draft_prob`, q of
  the previous drafted token in the block (1.0 at the block's first token: what precedes it the target
  has emitted), and `block_cum_prob`, the product of q over the earlier tokens of the block (1.0 first);
- `position`: the 0-based index of x in its block (a k-block when collecting decode contexts, the chain
  since the last target call when decoding; a corpus window counts as one block).
"""

from __future__ import annotations

import torch

HIDDEN, HIDDEN_PREV, TOKEN = "hidden", "hidden_prev_layer", "token_id"
VECTORS = (HIDDEN, HIDDEN_PREV)
TOP_K = 4  # draft_max_prob is top-1; draft_top2_prob .. draft_top4_prob the next
DISTRIBUTION = ("draft_prob", "draft_entropy", "draft_max_prob", *(f"draft_top{i}_prob" for i in range(2, TOP_K + 1)),
                "draft_margin")
BLOCK = ("prev_draft_prob", "block_cum_prob")
SCALARS = (*DISTRIBUTION, *BLOCK, "position")
KNOWN = (*VECTORS, TOKEN, *SCALARS)  # every feature the gate can compute at decode time


def entropy(q: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution on the last axis (0 log 0 = 0): the verifier's
    `draft_entropy` feature (its one definition), computed alike when collecting and decoding.  # (..., V) -> (...)"""
    return torch.special.entr(q).sum(-1)


def distribution_features(q: torch.Tensor, x: torch.Tensor, names: tuple[str, ...] = DISTRIBUTION
                          ) -> dict[str, torch.Tensor]:
    """The DISTRIBUTION features of drafted tokens x under q (those in `names`: the decode-time gate asks only for
    what its verifier reads, so a default verifier's step makes no top-k).  # (..., V), (...) -> each (...)"""
    out = {"draft_prob": q.gather(-1, x.unsqueeze(-1)).squeeze(-1), "draft_entropy": entropy(q)}
    if not set(names) - set(out):
        return {name: out[name] for name in names}
    top = q.topk(min(TOP_K, q.shape[-1]), dim=-1).values  # (..., K) sorted, largest first
    if top.shape[-1] < TOP_K:  # a vocabulary smaller than K: the missing ranks have probability 0
        top = torch.nn.functional.pad(top, (0, TOP_K - top.shape[-1]))
    out["draft_max_prob"] = top[..., 0]
    out.update({f"draft_top{i}_prob": top[..., i - 1] for i in range(2, TOP_K + 1)})
    out["draft_margin"] = top[..., 0] - top[..., 1]
    return out


def block_features(draft_prob: torch.Tensor) -> dict[str, torch.Tensor]:
    """The BLOCK features of each token of a block from the q(x) of its tokens in drafting order.
    # (..., n) -> each (..., n): entry j reads only tokens 0..j-1 (causal)."""
    ones = torch.ones_like(draft_prob[..., :1])
    earlier = torch.cat([ones, draft_prob[..., :-1]], dim=-1)  # (..., n): q of the token before, 1 first
    return {"prev_draft_prob": earlier, "block_cum_prob": earlier.cumprod(-1)}


__all__ = ["BLOCK", "DISTRIBUTION", "HIDDEN", "HIDDEN_PREV", "KNOWN", "SCALARS", "TOKEN", "TOP_K", "VECTORS",
           "block_features", "distribution_features", "entropy"]
