"""What one generation cost and how the drafted tokens fared (names as in Spec-Bench and vLLM,
docs/references.md §5)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from sprinter.errors import warn

# The decode-time guard (`check_promise`): a measured rate is "far" from the promised rate r when it lies
# outside r +- (SLACK + SIGMAS * sqrt(r (1 - r) / n)) over n >= MIN_TOKENS tokens: a 4-sigma binomial bound,
# widened by an absolute slack because decode-time contexts differ from the training contexts (and the
# tokens of one generation are not independent).
MIN_TOKENS, SIGMAS, SLACK = 30, 4.0, 0.1
Z90 = 1.6448536269514722  # a two-sided 90% interval: each end is a one-sided 95% bound


@dataclass
class DecodeStats:
    """Counts for one `Decoder.generate` call.

    Every drafted token is either accepted (emitted without being replaced; in SPRINTER this
    includes tokens the verifier passed, which the target never checks) or rejected (replaced by
    the target, or discarded after a rejection): drafted = accepted + rejected. Each target call
    adds one token of its own (a replacement or a bonus) unless the generation ends first.
    """

    mode: str
    new_tokens: int = 0
    wall_seconds: float = 0.0  # batched modes: the whole batch's time, the same for each of its prompts
    batch_size: int = 1  # prompts decoded together (batched modes: the number given to generate)
    compile_seconds: float = 0.0  # compiling graphs (included in wall_seconds): paid once per Decoder and graph
    draft_seconds: float = 0.0  # batched modes: time spent drafting (n-gram lookups or the draft model), batch-wide
    target_calls: int = 0  # target forward passes (the first one also reads the prompt)
    target_tokens: int = 0  # positions the target processed, prompt included
    draft_calls: int = 0
    draft_tokens: int = 0
    verifier_calls: int = 0  # gate decisions
    flagged: int = 0  # blocks that ended at the gate: sprinter's flagged tokens (sent to the target), sd-gated's stops
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    target_flops: int = 0
    draft_flops: int = 0
    verifier_flops: int = 0
    # async: drafted tokens the target never checked (run-ahead after a rejection, or made redundant by the
    # target's own token); they count as rejected. And each side's busy time: wall time minus its waits.
    discarded: int = 0
    draft_busy_seconds: float = 0.0
    target_busy_seconds: float = 0.0
    # Modes whose target checks every drafted token (sd, sd-gated, strict sprinter, ngram): per block position i,
    # the blocks that drafted an i-th token after accepting the i before it (reached), and those that accepted it
    # too. accepted_by_position[i] / reached_by_position[i] is the acceptance at position i given the earlier
    # ones were accepted: the shape the latency model (sprinter.decode.latency) reads.
    reached_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    # The tokens each mode emitted: one entry ({"sd": 128}) except in mode "auto", whose rounds name their
    # candidate: {"ar": 12, "sd-k4": 40, "ngram-k8": 76}.
    modes: dict[str, int] = field(default_factory=dict)
    # Mode "sprinter" (not strict): the decode-time false-accept measurement. The tokens the gate passed unchecked
    # that the target scored anyway in its next forward over the block (`passed_unchecked`), and the sum over them
    # of the speculative-sampling rejection probability 1 - min(1, p(x) / q(x)) (greedy: 1 where x is not the
    # target's argmax, else 0): `false_accept_rate` is their mean. `promised_*`: what the verifier's calibration
    # promised at the threshold used (None for an uncalibrated threshold or a checkpoint without the rates);
    # `verifier_warning`: set when a measured rate is far from its promise (see check_promise).
    passed_unchecked: int = 0
    false_accepts: float = 0.0
    promised_false_accept: float | None = None
    promised_flag_rate: float | None = None
    verifier_warning: str | None = None
    # DecodeOptions adapt_threshold: the gate's threshold when the generation ended (sprinter.decode.budget)
    adapted_threshold: float | None = None

    def count_block(self, drafted: int, kept: int) -> None:
        """Add one checked block of `drafted` tokens whose first `kept` were accepted to the by-position counts."""
        reached = min(kept + 1, drafted)
        grow = reached - len(self.reached_by_position)
        if grow > 0:
            self.reached_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(reached):
            self.reached_by_position[i] += 1
        for i in range(kept):
            self.accepted_by_position[i] += 1

    @property
    def false_accept_rate(self) -> float | None:
        """Decode-time false-accept rate: the mean rejection probability of the tokens passed unchecked."""
        return self.false_accepts / self.passed_unchecked if self.passed_unchecked else None

    @property
    def false_accept_interval(self) -> tuple[float, float] | None:
        """The 90% Wilson interval of `false_accept_rate` (sprinter.decode.budget explains why it serves at T > 0)."""
        return wilson_interval(self.false_accepts, self.passed_unchecked)

    @property
    def flag_rate(self) -> float | None:
        """Gate decisions that flagged the token (sent it to the target)."""
        return self.flagged / self.verifier_calls if self.verifier_calls else None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def mean_acceptance_length(self) -> float | None:
        """vLLM's definition, 1 + accepted / target calls (plain decoding: 1.0); None without a target call."""
        return 1 + self.accepted / self.target_calls if self.target_calls else None

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted (vLLM's draft acceptance rate); None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def overlap(self) -> float | None:
        """async: how much of the less busy side's work ran while the other side worked:
        (draft_busy + target_busy - wall) / min(draft_busy, target_busy). 1: hidden entirely behind the
        busier side; 0: the sides took turns; below 0: waiting and handover cost more than any overlap.
        None for the other modes."""
        shorter = min(self.draft_busy_seconds, self.target_busy_seconds)
        if shorter <= 0 or self.wall_seconds <= 0:
            return None
        return (self.draft_busy_seconds + self.target_busy_seconds - self.wall_seconds) / shorter

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tokens_per_second"] = round(self.tokens_per_second, 3)
        out["mean_acceptance_length"] = self.mean_acceptance_length
        out["acceptance_rate"] = self.acceptance_rate
        out["overlap"] = self.overlap
        out["false_accept_rate"] = self.false_accept_rate
        low_high = self.false_accept_interval
        out["false_accept_lower90"], out["false_accept_upper90"] = low_high if low_high else (None, None)
        out["flag_rate"] = self.flag_rate
        out["wall_seconds"] = round(self.wall_seconds, 6)
        return out


def wilson_centre_half(rate, n, z: float = Z90):
    """The Wilson score interval of a rate observed over n trials as (centre, half width): floats, or tensors
    elementwise (the decode-time recalibration reads a whole curve of counts at once)."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5
    return centre, half


def wilson_interval(events: float, n: int, z: float = Z90) -> tuple[float, float] | None:
    """(low, high) of the Wilson score interval for `events` out of `n` (None when n is 0)."""
    if n <= 0:
        return None
    centre, half = wilson_centre_half(min(max(events / n, 0.0), 1.0), n, z)
    return max(0.0, centre - half), min(1.0, centre + half)


class FalseAcceptMeter:
    """Sums the rejection probability of the tokens a gate passed unchecked, on the device: read once a generation
    (`write`), so the hot path gains no host sync."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, p_x: torch.Tensor, q_x: torch.Tensor) -> None:
        """p_x, q_x (m,): the target's and the draft's probability of each passed token."""
        rejected = (1 - (p_x / q_x.clamp_min(1e-30)).clamp(max=1)).sum()  # ()
        self.total = rejected if self.total is None else self.total + rejected
        self.count += len(p_x)

    def write(self, stats: DecodeStats) -> None:
        stats.passed_unchecked += self.count
        stats.false_accepts += float(self.total) if self.total is not None else 0.0


def far(measured: float, promised: float, n: int, both_sides: bool) -> bool:
    """Whether `measured` over n tokens lies far outside `promised` (the rule above MIN_TOKENS)."""
    if n < MIN_TOKENS:
        return False
    bound = SLACK + SIGMAS * math.sqrt(promised * (1 - promised) / n)
    return measured > promised + bound or (both_sides and measured < promised - bound)


def promise_warning(false_accepts: float, passed: int, flagged: int, calls: int, promised_false_accept: float,
                    promised_flag_rate: float | None) -> str | None:
    """The guard's message for these counts, or None when both rates are within the rule."""
    faults = []
    if passed and far(false_accepts / passed, promised_false_accept, passed, both_sides=False):
        faults.append(f"false-accept rate {false_accepts / passed:.3f} over {passed} tokens passed unchecked, "
                      f"promised {promised_false_accept:.3f}")
    if promised_flag_rate is not None and calls and far(flagged / calls, promised_flag_rate, calls, both_sides=True):
        faults.append(f"flag rate {flagged / calls:.3f} over {calls} gate decisions, promised {promised_flag_rate:.3f}")
    return "; ".join(faults) or None


def check_promise(stats: DecodeStats, rates: dict | None, verifier: str = "verifier") -> None:
    """Compare the decode-time rates with the verifier's promise at the threshold used ({"false_accept_share",
    "pass_rate"} from its calibration, or None): sets the promised_* fields, and on a far miss
    `verifier_warning` and a SprinterWarning (docs/decoding.md, "the decode-time guard")."""
    if not rates:
        return
    stats.promised_false_accept = rates["false_accept_share"]
    stats.promised_flag_rate = 1 - rates["pass_rate"]
    message = promise_warning(stats.false_accepts, stats.passed_unchecked, stats.flagged, stats.verifier_calls,
                              stats.promised_false_accept, stats.promised_flag_rate)
    if message is not None:
        stats.verifier_warning = (f"{verifier}: {message}: far outside its calibration; do not trust this "
                                  "output's speed or fidelity figures (docs/decoding.md, the decode-time guard)")
        warn(stats.verifier_warning)


__all__ = ["DecodeStats", "FalseAcceptMeter", "check_promise", "promise_warning", "wilson_centre_half",
           "wilson_interval"]
