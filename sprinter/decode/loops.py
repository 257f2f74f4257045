"""The single-prompt decode loops: `autoregressive` (one model: modes "ar" and "draft") and `speculative`
(a drafter, an optional gate and the target: modes "sd", "sprinter", "sd-gated"), one verification round of
which is `speculative_round` (mode "auto" runs rounds of its own choosing: sprinter.decode.auto). `GateRule` is
how a gate ends a drafted block. `Decoder.generate` (sprinter.decode.decoder) sets up the caches, the drafter
and the gate, and calls these; the batched and two-thread loops live in sprinter.decode.batched and
sprinter.decode.asynchronous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sprinter.decode.acceptance import correction, kept_count, ratio_tally, relaxed_checks
from sprinter.decode.budget import ThresholdController
from sprinter.decode.cache import CachedLM
from sprinter.decode.drafters import Drafter, DraftStep
from sprinter.decode.emit import Emitter
from sprinter.decode.gates import Gate
from sprinter.decode.options import DecodeOptions
from sprinter.decode.sampling import Sampler, uniform
from sprinter.decode.stats import DecodeStats, FalseAcceptMeter


@dataclass
class LoopState:
    """What every decode loop carries besides the models and the options: how logits become a distribution
    (`sampler`), where every random draw comes from (`gen`), where decided tokens go (`out`), what the loop
    counts (`stats`) and the rule at the target's call (`accept`, DecodeOptions.acceptance). Made once per
    generation by `Decoder.generate`. `relaxed`: mode "auto" with a fidelity budget sets it to the ratio rule's
    lambda, and every round the target checks then also tallies what that rule would keep (`Round.tally`)."""

    sampler: Sampler
    gen: torch.Generator
    out: Emitter
    stats: DecodeStats
    accept: tuple[str, float] = ("exact", 0.0)  # (rule, threshold): which checked tokens a target call keeps
    relaxed: float | None = None  # the ratio rule's lambda to tally in every checked round (auto), or None


def autoregressive(lm: CachedLM, tokens: torch.Tensor, state: LoopState) -> None:
    """Plain decoding with one model ("ar": the target; "draft": the draft). tokens: (1, T) the prompt."""
    sampler, gen, out = state.sampler, state.gen, state.out
    while not out.done:
        # 1. Run the model over what its cache lacks (the prompt first, then the last token).
        logits, _ = lm.append(tokens[:, lm.length:])  # (1, V)
        # 2. Draw the next token from its distribution.
        x = sampler.draw(sampler.probs(logits[0]), gen)
        # 3. Emit it.
        tokens = torch.cat([tokens, x.view(1, 1)], 1)
        out.emit([x.item()])


class GateRule:
    """How a gate ends a drafted block (the drafter's stop rule): it scores each drafted token from the
    draft's state, and `stopped` says whether the block ended at the rule. "sprinter": at the first flagged token
    (P(accept) < the gate's threshold: the token the target checks); "sd-gated" (`stop_threshold` given): once
    1 - prod P(accept) over the block exceeds it (SpecDec++; it flags nothing, the target checks every token)."""

    def __init__(self, gate: Gate, stop_threshold: float | None):
        self.gate, self.stop_threshold = gate, stop_threshold
        self.start()

    def start(self) -> None:
        """A new block."""
        self.stopped, self.survival, self.calls = False, 1.0, 0

    def __call__(self, step: DraftStep, position: int) -> bool:
        self.calls += 1
        p_accept = step.p_accept if step.p_accept is not None else self.gate.accept_prob(step, position)
        if self.stop_threshold is None:  # sprinter: this token is checked iff flagged
            self.stopped = not bool(p_accept >= self.gate.threshold)  # flagged; one host sync
        else:  # sd-gated: stop drafting once the block probably holds a rejection
            self.survival = self.survival * p_accept
            self.stopped = bool(1 - self.survival > self.stop_threshold)  # one host sync
        return self.stopped


@dataclass
class Round:
    """What one round of `speculative_round` did."""

    decided: list[int]  # what it emits: the kept drafted tokens and (unless it ended the budget) the target's
    drafted: int
    kept: int  # drafted tokens kept (sprinter: passed by the gate, or checked and accepted)
    # with state.relaxed (acceptance.ratio_tally): (kept by the exact rule, kept by the ratio rule, its false accepts)
    tally: tuple[int, int, float] | None = None


def speculative_round(target: CachedLM, drafter: Drafter, ids: list[int], k: int, *, rule: GateRule | None,
                      check_all: bool, state: LoopState,
                      meter: FalseAcceptMeter | ThresholdController | None = None) -> Round:
    """One round of `speculative` after `ids` (the prompt and every emitted token, not changed here): draft up to
    `k` tokens, verify, roll both caches back to `ids` + the decided tokens but the last. `meter`: where the
    tokens passed unchecked add their rejection probability (the target scored them anyway in step 3).
    The checked tokens meet `state.accept`'s rule."""
    sampler, gen, stats, remaining = state.sampler, state.gen, state.stats, state.out.remaining
    device = next(target.model.parameters()).device
    # 1. Draft up to `k` tokens; with a gate, drafting stops where the gate says (see GateRule).
    if rule is not None:
        rule.start()
    draft = drafter.propose([ids], [k], gen, stop=rule)
    n = draft.lengths[0]
    x = draft.x[0].to(device)  # (n,)
    flagged = rule is not None and rule.stopped  # sprinter: the last token is flagged (sd-gated checks all)
    stats.verifier_calls += 0 if rule is None else rule.calls
    stats.drafted += n
    stats.flagged += int(flagged)
    # 2. A block that ends the generation with nothing flagged needs no target (unless every token is checked).
    if not flagged and not check_all and n == remaining:
        stats.accepted += n
        return Round(draft.chains()[0], n, n)
    # 3. One target forward over every token it has not seen (the last emitted one(s) and the block);
    #    this also fills its cache. p[i] is the target's distribution for block position i, p[n] after it.
    unseen = torch.tensor(ids[target.length:], dtype=torch.long, device=device)
    logits, _ = target.append(torch.cat([unseen, x])[None], logits=n + 1)
    p = sampler.probs(logits)  # (n + 1, V)
    q = draft.q[0].to(device) if draft.q is not None else \
        torch.nn.functional.one_hot(x, p.shape[-1]).float()  # (n, V); a deterministic chain: one-hot
    # 4. Check the flagged token (strict / SD: every token) with the speculative-sampling rule, or a relaxed one
    #    that also keeps some tokens the target would not have chosen (it reads the target's soft distribution).
    positions = torch.arange(n, device=device)
    p_x, q_x = p[positions, x], q[positions, x]  # (n,), (n,)
    accept_rule, rule_threshold = state.accept
    exact = accept_rule == "exact" and state.relaxed is None
    p_soft = p[:n] if exact or not sampler.greedy else sampler.soft_probs(logits[:n])  # (n, V)
    u = uniform(n, gen, device)  # (n,)
    checks = relaxed_checks(accept_rule, rule_threshold, p_x, q_x, u, p_soft, x, sampler.greedy)
    n_kept = kept_count(checks, flagged, check_all)
    passed = n - int(flagged)  # sprinter: the tokens before the flagged one (all, if none was) went unchecked
    if meter is not None and not check_all and passed:
        meter.add(p_x[:passed], q_x[:passed])
    # 5. The target's own token: from the residual after a rejection, else a bonus token from p[n].
    y = sampler.draw(correction(p, q, n_kept), gen)
    kept, *decided = torch.cat([n_kept.view(1), x, y.view(1)]).tolist()  # the one host sync of this round
    decided = decided[:kept] + decided[-1:]
    tally = None
    if state.relaxed is not None:  # auto's free look at its lossy candidate: p is at hand (one more host sync)
        exact_kept, ratio_kept, false_accepts = ratio_tally(state.relaxed, p_x, q_x, u, p_soft, x,
                                                            sampler.greedy).tolist()
        tally = (int(exact_kept), int(ratio_kept), false_accepts)
    stats.accepted += kept
    stats.rejected += n - kept
    if check_all:
        stats.count_block(n, kept)
    # 6. Roll both caches back to what was emitted (the target has not read its own token y yet).
    emitted = len(ids) + len(decided)
    target.rollback_to(emitted - 1)
    drafter.keep([0], [emitted - 1])
    return Round(decided, n, kept, tally)


def speculative(target: CachedLM, drafter: Drafter, prompt: list[int], *, options: DecodeOptions,
                gate: Gate | None, state: LoopState) -> None:
    """Draft, (maybe) verify, emit, roll back; until the budget, EOS or a stop string.

    From `options`: "sd" drafts k tokens per block and the target checks all of them. "sprinter" drafts
    until the gate flags a token or max_block (None: unbounded) and checks only the flagged one (`strict`:
    every one). `state.accept` (options.rule) decides which checked tokens a target call keeps
    (sprinter.decode.acceptance; "exact" unless asked). "sd-gated" drafts until 1 - prod P(accept) exceeds
    `stop_threshold` (resolved by the caller) or max_block, and checks all. The target's cache always covers
    every emitted token but the last; its first forward reads the prompt together with the first block."""
    mode, out = options.mode, state.out
    max_block = options.k if mode == "sd" else options.max_block
    check_all = mode != "sprinter" or options.strict
    meter = None if check_all or gate is None else FalseAcceptMeter()
    if meter is not None and options.adapt_threshold:  # the threshold moves with the free checks (decode.budget)
        meter = ThresholdController(options.max_false_accept, gate.threshold)
        gate = meter.gate(gate)
    rule = None if gate is None else GateRule(gate, options.stop_threshold if mode == "sd-gated" else None)
    ids = list(prompt)  # the prompt and every emitted token
    while not out.done:
        k = out.remaining if max_block is None else min(max_block, out.remaining)
        step = speculative_round(target, drafter, ids, k, rule=rule, check_all=check_all, state=state, meter=meter)
        ids += step.decided
        out.emit(step.decided)
    if meter is not None:
        meter.write(state.stats)  # the measurement's one host sync, once per generation


__all__ = ["GateRule", "LoopState", "Round", "autoregressive", "speculative", "speculative_round"]
