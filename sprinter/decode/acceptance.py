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
4. `relaxed_checks`: the rules at the target's call (RULES; docs/decoding.md, "Relaxed acceptance"), which see
   p and decide which drafted tokens the call keeps: "exact" is rule 2 (lossless); "ratio" and "entropy" also
   keep some tokens that differ from the target's choice (lossy). `kept_count` turns the per-token checks into
   the number kept, as `flag_then_check` does for rule 2. `ratio_tally`: what the exact and the ratio rule
   would keep of a checked block, and how much of the latter the exact rule rejects (mode "auto"'s free look at
   its lossy candidate).
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
    return kept_count(speculative_accept(p_x, q_x, u), flagged, strict)


def kept_count(checks: torch.Tensor, flagged: bool, strict: bool = False) -> torch.Tensor:
    """How many tokens of a block are kept, given each token's check.  # (k,) bool -> () long

    `strict` (or SD): every check counts; else (SPRINTER) the passed tokens are kept unchecked and only the last
    token's check counts when it was `flagged`."""
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


RULES = ("exact", "ratio", "entropy")  # the rules at the target's call; every one but "exact" is lossy
RULE_THRESHOLDS = {"ratio": 0.5, "entropy": 2.0}  # the default lambda and tau (nats) of the lossy rules


def expected_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(a token drawn from q is kept by the exact rule) = sum_x min(p(x), q(x)) = 1 - TV(p, q) (greedy one-hots:
    1 where the argmaxes agree).  # (..., V), (..., V) -> (...)"""
    return torch.minimum(p, q).sum(-1)


def ratio_keep(p_x: torch.Tensor, p_max: torch.Tensor, lam: float) -> torch.Tensor:
    """The greedy probability-ratio rule: keep x iff p(x) >= lambda * max p, i.e. the target finds x nearly as
    likely as its own choice (lambda = 1: only its argmax; the token the relaxed label calls acceptable).
    # (...), (...) -> (...) bool"""
    return p_x >= lam * p_max


def lenient_accept(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """The sampled probability-ratio rule: keep x iff u < min(1, p(x) / (lambda q(x))), speculative sampling with
    the lenience of Leviathan et al. 2023 (their appendix A.5; lambda = 1 is `speculative_accept`).
    # (...) x3 -> (...) bool"""
    return u * lam * q_x < p_x


def entropy_keep(p: torch.Tensor, tau: float) -> torch.Tensor:
    """The entropy rule: keep a token the exact rule would reject when the target is uncertain there, its
    entropy H(p) >= tau nats (after FLy, ICLR 2026, whose gate also reads the target's entropy).  # (..., V) -> (...)"""
    return torch.special.entr(p).sum(-1) >= tau


def relaxed_checks(rule: str, threshold: float, p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor,
                   p_soft: torch.Tensor, x: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Per-token checks of a drafted block under one of RULES.  # (k,) x3, (k, V), (k,) -> (k,) bool

    p_x, q_x: the sampling distributions' probability of each drafted token (one-hot at temperature 0), u its
    uniform draw; p_soft: the target's soft distribution at each position (its untempered softmax when greedy,
    else p itself). "exact": `speculative_accept`. "ratio" (threshold: lambda in (0, 1]): greedy,
    `ratio_keep` on p_soft; sampled, `lenient_accept`. "entropy" (threshold: tau >= 0 nats): what the exact rule
    keeps, and any token where H(p_soft) >= tau (the entropy rule was chosen over KL(p || q) because it needs
    no draft distribution: a greedy or n-gram draft's q is one-hot, where the KL is infinite or meaningless).
    A token the lossy rules still reject is a mismatch, so `correction` after it is unchanged."""
    exact = speculative_accept(p_x, q_x, u)
    if rule == "exact":
        return exact
    if rule == "ratio":
        if not greedy:
            return lenient_accept(p_x, q_x, u, threshold)
        return exact | ratio_keep(p_soft.gather(-1, x[:, None]).squeeze(-1), p_soft.amax(-1), threshold)
    if rule == "entropy":
        return exact | entropy_keep(p_soft, threshold)
    raise ValueError(f"rule: got {rule!r}; expected one of {RULES}")


def ratio_tally(lam: float, p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor, p_soft: torch.Tensor,
                x: torch.Tensor, greedy: bool) -> torch.Tensor:
    """What the exact rule and the ratio rule at `lam` keep of one checked block, with the same draws `u`, and
    how many of the ratio rule's tokens are false accepts.  # (k,) x3, (k, V), (k,) -> (3,) float

    Returns [e, n, m]: e and n the leading tokens `relaxed_checks` keeps under "exact" and "ratio"; m the sum over
    the n of the exact rule's rejection probability 1 - min(1, p(x) / q(x)) (greedy, p and q one-hot: how many
    kept tokens are not the target's argmax), as the fidelity budget counts false accepts (sprinter.decode.budget).
    With shared draws the ratio rule keeps a superset of what the exact rule keeps (u lambda q < p whenever
    u q < p, and greedy it adds to the exact checks), so whichever of the two rules ran, [e, n] is what each would
    have kept of the very same block."""
    e = leading_true(speculative_accept(p_x, q_x, u))
    n = leading_true(relaxed_checks("ratio", lam, p_x, q_x, u, p_soft, x, greedy))
    rejection = 1 - (p_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny)).clamp(max=1)  # (k,)
    kept = torch.arange(p_x.shape[-1], device=p_x.device) < n
    return torch.stack([e.to(p_x.dtype), n.to(p_x.dtype), (rejection * kept).sum()])


__all__ = ["RULES", "RULE_THRESHOLDS", "correction", "entropy_keep", "expected_acceptance", "flag_then_check",
           "greedy_match", "kept_count", "leading_true", "lenient_accept", "ratio_keep", "ratio_tally",
           "relaxed_checks", "residual", "speculative_accept"]
