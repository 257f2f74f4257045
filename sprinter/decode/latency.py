"""The latency model: predicted ms/token for every mode, from a cost profile and acceptance statistics.

Pure functions (no model runs here): what mode "auto" prices its candidates with (sprinter.decode.auto), and
what the benchmark's predictions (bench/latency.py) and the regime map (bench/regime_map.py) are made
of. The derivations are in docs/latency.md; docs/references.md §1 and §8 give the start. Every mode
runs in rounds: the draft proposes a block, one target forward reads it, the round emits the accepted tokens
and one token of the target's own. Time per token is a round's expected cost over its expected emitted
tokens (a ratio of expectations: the long-run rate of a renewal process).

Costs come from a `CostProfile` (sprinter.decode.costs): d = a draft step (d_h with the hidden state a
learned gate reads), g = a gate call, T(n) = a target forward over n new tokens, r = the rest of a round.
Acceptance comes from `AcceptanceStats`:
- `by_position` a_0, a_1, ...: the chance that block position i is accepted given positions 0..i-1 were
  (greedy: the draft's token is the target's); positions past the list take its last value;
- `verifier`: the gate's true-accept rate (share of label-1 tokens it passes) and false-accept rate (share of
  label-0 tokens it passes) per false-accept budget, from the verifier's metrics.json;
- `ngram`: the n-gram drafter's drafted and accepted tokens per target call and its lookup time per call.

The formulas, with P_j = a_0 ... a_{j-1} the chance that the first j drafted tokens are all accepted:
- ar:     T(1);  draft: d_run (the draft's plain decode step in a run of them; d where not measured)
- sd, k:  (k d + T(k + 1) + r) / (1 + sum_{j=1..k} P_j)
- gated blocks (sprinter, sd-gated, strict sprinter): drafting stops at the first token the gate flags or
  after M = max_block tokens; a label-1 token passes with probability TA, a label-0 one with FA. A Markov
  chain over (block position, run of accepted tokens) gives the block length L's distribution (`gated_block`).
  Cost E[L] (d_h + g) + E[T(L + 1)] + r. Emitted: sprinter keeps the passed tokens unchecked, the flagged
  one when it agrees, and the target's token: E[L] - P(flagged) + P(flagged and label 1) + 1; sd-gated and
  strict sprinter keep the accepted prefix: 1 + sum_{j=1..M} P_j TA^(j-1).
- ngram:  (T(D + 1) + lookup + r) / (1 + A), D and A the drafted and accepted tokens per call.
- a generation's fixed cost, added to any mode's per-token time: (P_target + P_draft) / N, the fresh caches and
  prompt prefills of the models it runs (`generation_ms`), over its N new tokens.

Assumptions (see docs/latency.md): batch 1; the end of a generation is ignored (a last block cut short);
at temperature > 0, a_i is the speculative-sampling acceptance; a token's label depends only on
how many accepted tokens precede it since its block started or since the last label-0 token (the run), and
the gate's decision only on the token's label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from sprinter.decode.costs import CostProfile
from sprinter.errors import SprinterError

# Assumed where no run has measured them (docs/latency.md, "The regime map"): the verifier's true-accept rate at
# the 0.05 false-accept budget (docs/references.md §8's example), and the operating points (TA, FA) a stop gate may take
# for sd-gated, of which the fastest is used (the benchmark sweeps its stop threshold the same way).
SPRINTER_RATES = (0.65, 0.05)
STOP_RATES = ((0.65, 0.05), (0.75, 0.1), (0.85, 0.2), (0.93, 0.4))


@dataclass(frozen=True)
class AcceptanceStats:
    """A run's acceptance statistics (see the module docstring)."""

    by_position: tuple[float, ...]  # a_i: P(position i accepted | positions 0..i-1 accepted)
    verifier: dict[str, tuple[float, float]] = field(default_factory=dict)  # budget key -> (true_accept, false_accept)
    ngram: tuple[float, float, float] | None = None  # (drafted per call, accepted per call, lookup ms per call)

    def __post_init__(self) -> None:
        if not self.by_position:
            raise SprinterError("by_position: got no acceptance rates; expected at least position 0's")
        check_rates("by_position", self.by_position)
        for budget, rates in self.verifier.items():
            check_rates(f"verifier rates at budget {budget}", rates)
        object.__setattr__(self, "by_position", tuple(float(a) for a in self.by_position))


def check_rates(name: str, rates: Sequence[float]) -> None:
    bad = [r for r in rates if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1]
    if bad:
        raise SprinterError(f"{name}: got {list(rates)!r}; expected probabilities in [0, 1]")


def rate_at(a: Sequence[float], i: int) -> float:
    """a_i, with positions past the list taking its last value."""
    return a[min(i, len(a) - 1)]


def prefix_accept(a: Sequence[float], j: int) -> float:
    """P_j = a_0 ... a_{j-1}: the first j drafted tokens are all accepted (P_0 = 1)."""
    out = 1.0
    for i in range(j):
        out *= rate_at(a, i)
    return out


# ------------------------------------------------------------------------------------------- the modes
def ar_ms(profile: CostProfile) -> float:
    """Mode "ar": a plain decode step of the target in a run of them; a profile measured before target_run_ms
    existed: a lone one-token forward, T(1)."""
    return profile.target_run_ms or profile.target(1)


def draft_ms(profile: CostProfile) -> float:
    """The draft alone (mode "draft"): a plain decode step in a run of them; a profile measured before
    draft_run_ms existed: the drafter's step."""
    return profile.draft_run_ms or profile.draft_step_ms


def sd_tokens_per_call(a: Sequence[float], k: int) -> float:
    """Expected tokens a standard SD round emits: the accepted prefix and the target's token."""
    return 1 + sum(prefix_accept(a, j) for j in range(1, k + 1))


def sd_ms(profile: CostProfile, a: Sequence[float], k: int) -> float:
    """Standard speculative decoding with k drafted tokens per target call."""
    if not (isinstance(k, int) and k >= 1):
        raise SprinterError(f"k: got {k!r}; expected an integer >= 1")
    return (k * profile.draft_step_ms + profile.target(k + 1) + profile.round_ms) / sd_tokens_per_call(a, k)


@dataclass(frozen=True)
class Block:
    """What a gated round drafts and keeps, in expectation."""

    length: float  # E[L]: drafted tokens
    target_ms: float  # E[T(L + 1)]: the verification forward
    flagged: float  # P(the block ended at a flagged token, not at max_block)
    flagged_label1: float  # P(... and that token is label 1: kept by the check)
    accepted_prefix: float  # E[leading label-1 tokens]: what a round that checks every token keeps


def gated_block(profile: CostProfile, a: Sequence[float], true_accept: float, false_accept: float,
                max_block: int) -> Block:
    """The block-length distribution of a gated round, by a Markov chain over (position i, run r).

    mass[r]: P(i tokens drafted, all passed by the gate, and the last r of them accepted in a row). Drafting
    token i: label 1 with probability a_r, passed with TA (run r + 1) or flagged (the block ends, L = i + 1);
    label 0 with 1 - a_r, passed with FA (run 0) or flagged. After M tokens the block ends unflagged."""
    check_rates("true/false accept", (true_accept, false_accept))
    if not (isinstance(max_block, int) and max_block >= 1):
        raise SprinterError(f"max_block: got {max_block!r}; expected an integer >= 1")
    mass = [1.0]
    length = target = flagged = flagged1 = accepted = 0.0
    for i in range(max_block):
        accepted += mass[i] * rate_at(a, i)  # run i covers the whole block: every token so far accepted
        nxt = [0.0] * (i + 2)
        ends = 0.0
        for r, m in enumerate(mass):
            if m == 0.0:
                continue
            a_r = rate_at(a, r)
            flag1, flag0 = m * a_r * (1 - true_accept), m * (1 - a_r) * (1 - false_accept)
            ends += flag1 + flag0
            flagged1 += flag1
            nxt[r + 1] += m * a_r * true_accept
            nxt[0] += m * (1 - a_r) * false_accept
        flagged += ends
        length += ends * (i + 1)
        target += ends * profile.target(i + 2)
        mass = nxt
    rest = sum(mass)  # drafted max_block tokens, every one passed
    length += rest * max_block
    target += rest * profile.target(max_block + 1)
    return Block(length, target, flagged, flagged1, accepted)


def gated_round_ms(profile: CostProfile, block: Block, gate: str) -> float:
    """A gated round's cost: E[L] draft steps and gate calls, the verification forward, the rest of the round."""
    step = profile.draft_hidden_step_ms if gate == "learned" else profile.draft_step_ms
    return block.length * (step + profile.gate_ms[gate]) + block.target_ms + profile.round_ms


def sprinter_ms(profile: CostProfile, a: Sequence[float], true_accept: float, false_accept: float, max_block: int,
                gate: str = "learned") -> float:
    """SPRINTER: the passed tokens are kept unchecked; only the flagged token meets the target."""
    block = gated_block(profile, a, true_accept, false_accept, max_block)
    emitted = block.length - block.flagged + block.flagged_label1 + 1
    return gated_round_ms(profile, block, gate) / emitted


def sd_gated_ms(profile: CostProfile, a: Sequence[float], true_accept: float, false_accept: float, max_block: int,
                gate: str = "learned") -> float:
    """A lossless block whose length a gate decides (drafting stops at its first flag): every token is checked.
    Strict sprinter is this; sd-gated's stop rule (1 - prod P(accept) > c) is modelled as a gate whose
    operating point (TA, FA) stands for the threshold c."""
    block = gated_block(profile, a, true_accept, false_accept, max_block)
    return gated_round_ms(profile, block, gate) / (1 + block.accepted_prefix)


def ngram_ms(profile: CostProfile, drafted: float, accepted: float, lookup_ms: float = 0.0) -> float:
    """SSSD-style n-gram drafting: D drafted and A accepted tokens per target call, `lookup_ms` to draft."""
    if not 0 <= accepted <= drafted:
        raise SprinterError(f"ngram: got {accepted!r} accepted of {drafted!r} drafted per call; expected "
                            "0 <= accepted <= drafted")
    return (profile.target(drafted + 1) + lookup_ms + profile.round_ms) / (1 + accepted)


def generation_ms(profile: CostProfile, new_tokens: float, draft: bool = True) -> float:
    """A generation's fixed cost spread over its `new_tokens`: the target's fresh cache and prefill, and the
    draft's when the mode drafts with the draft model (`draft`). 0 for a profile measured without them."""
    if not new_tokens > 0:
        raise SprinterError(f"new_tokens: got {new_tokens!r}; expected the tokens a generation emits (> 0)")
    return (profile.target_prefill_ms + (profile.draft_prefill_ms if draft else 0.0)) / new_tokens


def counted_ms(profile: CostProfile, *, draft_calls: float, target_calls: float, target_tokens: float,
               gate_calls: float, new_tokens: float, gate: str = "learned") -> float:
    """Costs weighed by a run's own counts (every step counted once): for rows whose block statistics the
    model does not derive (sd-gated's stop rule, the confidence gates, hf-assisted). target_tokens: the
    tokens the verification forwards read, the prompt left out."""
    if target_calls < 0 or new_tokens <= 0:
        raise SprinterError(f"counts: got {target_calls!r} target calls for {new_tokens!r} tokens; expected calls >= 0 "
                            "and tokens > 0")
    step = profile.draft_hidden_step_ms if gate == "learned" and gate_calls else profile.draft_step_ms
    n = max(1.0, target_tokens / target_calls) if target_calls else 1.0
    verify = target_calls * (profile.target(n) + profile.round_ms)
    return (draft_calls * step + gate_calls * profile.gate_ms[gate] + verify) / new_tokens


def verifier_rates(metrics: dict, scorer: str = "verifier") -> dict[str, tuple[float, float]]:
    """{budget key: (true_accept, false_accept)} on the test split from a metrics.json (written by scripts/train.py):
    the trained verifier's ("verifier") or a baseline's ("linear", ...)."""
    report = metrics.get(scorer) if scorer == "verifier" else metrics.get("baselines", {}).get(scorer)
    if not report or "operating_points" not in report:
        return {}
    return {key: (p["true_accept"], p["false_accept"]) for key, p in report["operating_points"].items()}


__all__ = ["SPRINTER_RATES", "STOP_RATES", "AcceptanceStats", "Block", "ar_ms", "check_rates",
           "counted_ms", "draft_ms", "gated_block", "gated_round_ms", "generation_ms", "ngram_ms", "prefix_accept",
           "rate_at", "sd_gated_ms", "sd_ms", "sd_tokens_per_call", "sprinter_ms", "verifier_rates"]
