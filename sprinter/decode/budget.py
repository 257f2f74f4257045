"""The false-accept budget at decode time: its interval, and a controller that makes it hold.

`max_false_accept=F` means: of the tokens a gate passes unchecked, at most a fraction F are tokens the
target would have rejected (greedy: not its argmax; sampling: the speculative-sampling rejection, whose
probability for a passed token x is 1 - min(1, p(x)/q(x)), p and q after the same temperature/top-p).
The target scores every passed token anyway, in the forward it runs over the block for the flagged one,
so each round brings a free check of the tokens passed in it (sprinter.decode.stats.FalseAcceptMeter).

- `wilson_interval`: the 90% interval of a measured rate. The Wilson score interval for a binomial count;
  at temperature > 0 the "count" is a sum of rejection probabilities in [0, 1], whose variance is at most
  that of a Bernoulli with the same mean, so the same interval is (slightly) conservative. The tokens of one
  generation are not independent: read the interval as a floor on the uncertainty.
- `ThresholdController`: online adaptation of the gate's threshold from those free checks (DecodeOptions
  `adapt_threshold`). The threshold lives here, in the loop's state, never on the gate (`AdaptedGate` is a
  view of the gate through the controller's threshold).
"""

from __future__ import annotations

import math

import torch

from sprinter.decode.drafters import DraftStep
from sprinter.decode.gates import Gate
from sprinter.decode.stats import DecodeStats, FalseAcceptMeter, wilson_interval

# The controller's step (see ThresholdController): each passed token moves the threshold's logit by
# ETA * (r - F) / F, r its rejection probability: a false accept at F = 0.05 raises it by ~1 logit, a kept good
# token lowers it by ETA = 0.05.
ETA = 0.05
LOGIT_LIMIT = 12.0  # thresholds stay in [sigmoid(-12), sigmoid(12)]: 6e-6 from 0 and from 1


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class ThresholdController:
    """Holds a gate's false-accept rate at the budget F by moving its threshold between rounds.

    It stands where the decode loop puts its FalseAcceptMeter (`add` after every round that passed tokens,
    `write` once at the end) and counts what the meter counts. After each round it reads the round's rejection
    sum (one host sync per round: the price of adapting) and moves the threshold's logit z by
    ETA / F * (rejections - F * passed): up after a false accept, down a little for each good passed token.
    This is adaptive conformal inference's update (Gibbs and Candes 2021) on the passed tokens: whatever the
    scores, sum(r - F) over the passed tokens equals F / ETA times z's total move, which stays within the
    logit range, so the realised rate of a stream is within F * (LOGIT_LIMIT - z_start) / (ETA * passed) of F
    (a few hundred passed tokens: within ~0.01 at F = 0.05), and a threshold that undershoots relaxes until the
    rate reaches F. One controller serves one generation (`Decoder.generate` makes a new one each time).
    """

    def __init__(self, budget: float, threshold: float):
        self.budget = budget
        self.logit = _logit(threshold)
        self.meter = FalseAcceptMeter()  # the totals of the generation, as without adapting

    @property
    def threshold(self) -> float:
        return 1 / (1 + math.exp(-self.logit))

    def observe(self, events: float, count: int) -> None:
        """A round whose `count` passed tokens had rejection probabilities summing to `events`."""
        step = ETA / self.budget * (events - self.budget * count)
        self.logit = min(max(self.logit + step, -LOGIT_LIMIT), LOGIT_LIMIT)

    def add(self, p_x: torch.Tensor, q_x: torch.Tensor) -> None:
        """FalseAcceptMeter.add, then adapt. p_x, q_x (m,)."""
        before = self.meter.total
        self.meter.add(p_x, q_x)
        events = self.meter.total if before is None else self.meter.total - before
        self.observe(float(events), len(p_x))  # the host sync

    def write(self, stats: DecodeStats) -> None:
        self.meter.write(stats)
        stats.adapted_threshold = self.threshold

    def gate(self, gate: Gate) -> AdaptedGate:
        """`gate` seen through this controller's threshold."""
        return AdaptedGate(gate, self)


class AdaptedGate:
    """A gate whose threshold is a controller's: the scores are the gate's own (a fused draft step's p_accept,
    computed from the gate itself, stays valid)."""

    def __init__(self, gate: Gate, controller: ThresholdController):
        self.inner, self.controller = gate, controller
        self.hidden_layers = gate.hidden_layers

    @property
    def threshold(self) -> float:
        return self.controller.threshold

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return self.inner.accept_prob(step, position)


__all__ = ["AdaptedGate", "ThresholdController", "wilson_interval"]  # wilson_interval: from stats, read here
