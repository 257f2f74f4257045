"""The acceptance rules, as pure tensor functions (no models, no state; randomness comes in as `u`).

Vocabulary: `p` = target probabilities, `q` = draft probabilities, `x` = the drafted tokens,
`k` = the number of drafted tokens in a block. At temperature 0 the decoder passes one-hot `p` and
`q`, and the speculative-sampling rule below reduces to exact greedy matching (u < p(x)/q(x) is
u < 1 on a match and u < 0 otherwise; the residual is the target's argmax).

1. `greedy_match`: how many drafted tokens equal the target's argmax, counting from the first.
2. `speculative_accept` + `residual`: speculative sampling (Leviathan et al. 2023; Chen et al. 2023):
   keep x with probability min(1, p(x)/q(x)); on the first rejection sample from norm(max(0, p - q)).
   The output is distributed exactly as p.
3. `flag_then_check`: SPRINTER (docs/references.md §1): the tokens the verifier passed are kept
   unchecked, only the flagged (last) token of the block meets rule 2; `strict=True` checks all.
"""

from __future__ import annotations

import torch


def leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries before the first False.  # (..., k) bool -> (...) long"""
    return mask.long().cumprod(-1).sum(-1)


def greedy_match(x: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """How many drafted tokens `x` the target's greedy tokens confirm, from the first on.  # (..., k) x2 -> (...)"""
    return leading_true(x == target_tokens)


def speculative_accept(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token acceptance of speculative sampling: u < p(x) / q(x), written without the division.

    p_x, q_x: (..., k) the target's and the draft's probability of each drafted token (q_x > 0: x was
    drawn from q); u: (..., k) uniform [0, 1) draws. Returns (..., k) bool."""
    return u * q_x < p_x


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to sample after a rejection.  # (..., V), (..., V) -> (..., V)

    When p == q a rejection has probability 0; should rounding produce one anyway, the residual is
    all zeros and p itself is the right distribution, so it is returned instead of dividing by 0."""
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def flag_then_check(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor, flagged: bool,
                    strict: bool = False) -> torch.Tensor:
    """How many tokens of a SPRINTER block are kept.  # (k,), (k,), (k,) -> () long

    The verifier passed x[:-1]; x[-1] is the flagged token when `flagged` (else the block ended at
    max_block with every token passed, and none is checked). Only the flagged token meets the
    speculative-sampling rule; `strict=True` checks every token (lossless, as standard SD)."""
    checks = speculative_accept(p_x, q_x, u)
    if not strict:
        passed = torch.ones_like(checks)
        if flagged:
            passed[-1] = checks[-1]
        checks = passed
    return leading_true(checks)


def correction(p: torch.Tensor, q: torch.Tensor, n_kept: torch.Tensor | int) -> torch.Tensor:
    """The distribution of the target's token after `n_kept` of k drafted tokens were kept.

    p: (..., k + 1, V) target probabilities for each block position and the one after it; q: (..., k, V);
    n_kept: (...) (a tensor, or an int without leading axes). A rejection at position n_kept < k samples
    from the residual there; when all k were kept the target adds a bonus token from p[k], which is the
    residual against an all-zero q. `n_kept` may stay on the device: no host synchronisation. Returns (..., V)."""
    q_after = torch.cat([q, torch.zeros_like(p[..., :1, :])], -2)  # (..., k + 1, V): nothing drafted after the block
    index = torch.as_tensor(n_kept, device=p.device)[..., None, None].expand(*p.shape[:-2], 1, p.shape[-1])
    return residual(p.gather(-2, index), q_after.gather(-2, index)).squeeze(-2)


__all__ = ["correction", "flag_then_check", "greedy_match", "leading_true", "residual", "speculative_accept"]
