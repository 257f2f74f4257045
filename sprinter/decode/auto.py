"""Mode "auto": before every target call, run the candidate the latency model predicts fastest for this request.

The candidates (`candidates`): "ar"; "sd-k{k}" for k in DRAFT_KS; "sd-gated" (when a learned gate is loaded);
"ngram-k{k}" for k in NGRAM_KS; and, only when the caller allows a fidelity loss (`max_false_accept=F`, one of the
verifier's calibrated budgets), "sprinter@F" and "sd-k{k}+ratio" (sd-k{k} whose target call keeps by the ratio
rule, sprinter.decode.acceptance, at lambda = `rule_threshold` with rule="ratio", else RULE_THRESHOLDS' 0.5).
Each is priced in ms/token by sprinter.decode.latency from the pair's cost profile (sprinter.decode.costs) and
acceptance estimates, all flat across block positions:
- the draft model's: P(a drafted token is accepted), starting from the pair's greedy agreement (pair.json) when
  present, else DRAFT_PRIOR, worth PRIOR_WEIGHT observations; updated from every block the target checks
  (sd-k, sd-gated), and in sprinter rounds from the gate's decisions (a passed token counts as accepted, a
  flagged one as what the target said);
- with a budget, the ratio rule's: P(it keeps a drafted token), from the draft's prior, and the share of the tokens
  it keeps that the exact rule rejects (its false accepts, as budget.py counts them), from 0. Every round the
  target checks a draft-model block gives both for free (acceptance.ratio_tally: p is at hand), whichever rule
  ran. The share forgets at FALSE_ACCEPT_DECAY, slower than DECAY: the budget bounds a share over the request.
  The ratio candidates run only while that share is within F (they are priced, never chosen, beyond it);
- the n-gram drafter's: P(a lookup finds a chain) and P(a chained token is accepted), from NGRAM_PRIOR. A
  lookup costs microseconds, so it is made before every round whatever runs, and compared with the tokens the
  round emits: the n-gram estimate never goes stale.
Each estimate forgets its past per observed round (an exponentially weighted ratio; the n-gram ones at DECAY, the
draft model's at DRAFT_DECAY), so a request whose text stops being predictable leaves a drafted mode within a few
target calls. While "ar" (or n-gram) runs the draft model is not observed: its estimate goes back toward its prior
(RELAX per round: after a few unlucky rejections on text where drafting pays, drafting resumes within ~10 rounds;
results/auto-prior), and after `probe_every` such rounds auto runs one sd-1 round (the draft first catches up on the
tokens it skipped), the wait doubling after each probe that does not bring drafting back (up to PROBE_MAX). With
`prompt_prior` the prior is the request's own, its prompt's teacher-forced acceptance (`prompt_acceptance`).

`AutoController` is pure (no model): `choose()` names the next round's candidate, `observe_draft` /
`observe_ngram` feed it what the rounds showed. The loop that runs the rounds is `auto_decode`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from sprinter.decode.acceptance import RULE_THRESHOLDS, expected_acceptance
from sprinter.decode.cache import CachedLM
from sprinter.decode.costs import CostProfile
from sprinter.decode.drafters import Draft, ModelDrafter
from sprinter.decode.gates import LearnedGate
from sprinter.decode.latency import SPRINTER_RATES, ar_ms, ngram_ms, sd_gated_ms, sd_ms, sprinter_ms, verifier_rates
from sprinter.decode.loops import GateRule, LoopState, speculative_round
from sprinter.decode.ngram import NgramDrafter, NgramIndex
from sprinter.decode.options import DecodeOptions
from sprinter.errors import SprinterError
from sprinter.files import read_json
from sprinter.verifier import budget_key

if TYPE_CHECKING:
    from sprinter.decode.decoder import Decoder

DRAFT_KS = (1, 2, 4, 8)  # sd's draft lengths to choose among
NGRAM_KS = (2, 4, 8)  # n-gram chain lengths to choose among
DRAFT_PRIOR = 0.6  # P(accept) of a drafted token when the pair states no greedy agreement
NGRAM_PRIOR = (0.3, 0.3)  # (P(a lookup finds a chain), P(a chained token is accepted)) before any lookup
PRIOR_WEIGHT = 4.0  # the prior counts as this many observed tokens
DECAY = 0.7  # per observed round: the weight of everything seen before it (the n-gram estimates)
DRAFT_DECAY = 0.9  # the same for the draft model's estimate (0.7 until results/auto-prior: it left sd after one or
# two early rejections on sampled text where sd pays)
RELAX = 0.9  # per round that does not observe the draft model: its estimate's evidence keeps this weight and the
# rest goes back to the prior (1: the estimate waits for a probe)
PROMPT_PRIOR = False  # start each request from its prompt's teacher-forced acceptance (measured slower on demo:
# results/auto-prior/README.md)
PROMPT_SKIP = 16  # the prompt prior reads the positions with at least this many tokens of context
FALSE_ACCEPT_DECAY = 0.95  # the same for the ratio rule's false-accept share (~20 rounds, ~60 checked tokens)
PROBE_EVERY = 16  # ar rounds before the draft model is probed again with one sd-1 round
PROBE_MAX = 128  # the longest wait between probes (it doubles after each probe that loses)
GATED_RATES = (0.75, 0.1)  # sd-gated's stop rule modelled as a gate at (TA, FA): latency.STOP_RATES' second point
QUANTUM = 0.02  # predictions are cached per estimate rounded to this (the controller runs before every round)


class Estimate:
    """An exponentially weighted rate: hits / trials, both multiplied by `decay` before each update."""

    def __init__(self, prior: float, weight: float = PRIOR_WEIGHT, decay: float = DECAY):
        if not (0 <= prior <= 1 and weight > 0 and 0 < decay <= 1):
            raise SprinterError(f"estimate: got prior={prior!r}, weight={weight!r}, decay={decay!r}; expected a "
                                "prior in [0, 1], a weight > 0 and a decay in (0, 1]")
        self.hits, self.trials, self.decay = prior * weight, weight, decay

    def toward(self, prior: float, factor: float, weight: float = PRIOR_WEIGHT) -> None:
        """Keep `factor` of the evidence and give the rest back to `prior` (at most `weight` observations' worth)."""
        if factor < 1:
            self.hits = self.hits * factor + prior * weight * (1 - factor)
            self.trials = self.trials * factor + weight * (1 - factor)

    def update(self, hits: float, trials: float) -> None:
        if trials <= 0:
            return
        self.hits = self.hits * self.decay + hits
        self.trials = self.trials * self.decay + trials

    @property
    def rate(self) -> float:
        return self.hits / self.trials


@dataclass(frozen=True)
class Candidate:
    """One thing auto can run for a round: kind "ar", "sd" (k tokens), "sd-gated", "ngram" (k tokens), "sprinter",
    "sd-ratio" (k tokens, the ratio rule at the target's call)."""

    name: str
    kind: str
    k: int = 0


def candidates(*, gated: bool, budget: float | None, relaxed: bool = False, ks: Sequence[int] = DRAFT_KS,
               ngram_ks: Sequence[int] = NGRAM_KS) -> dict[str, Candidate]:
    """Every candidate by name; the lossy ones (sprinter, with `relaxed` the ratio rule's) only with a `budget`.
    The ratio candidates come last, so that a tie with a lossless one goes to the lossless one."""
    out = {"ar": Candidate("ar", "ar")}
    out.update({f"sd-k{k}": Candidate(f"sd-k{k}", "sd", k) for k in ks})
    if gated:
        out["sd-gated"] = Candidate("sd-gated", "sd-gated")
    out.update({f"ngram-k{k}": Candidate(f"ngram-k{k}", "ngram", k) for k in ngram_ks})
    if budget is not None:
        out[f"sprinter@{budget:g}"] = Candidate(f"sprinter@{budget:g}", "sprinter")
        if relaxed:
            out.update({f"sd-k{k}+ratio": Candidate(f"sd-k{k}+ratio", "sd-ratio", k) for k in ks})
    return out


@dataclass
class AutoController:
    """Chooses each round's candidate from predicted ms/token (see the module docstring).

    `sprinter_rates`: the verifier's (true accept, false accept) at the allowed budget (None: no sprinter
    candidate); `gated`: offer sd-gated (a learned gate is loaded); `relaxed`: the ratio rule's lambda (None: no
    ratio candidates; needs a budget)."""

    profile: CostProfile
    draft_prior: float = DRAFT_PRIOR
    ngram_prior: tuple[float, float] = NGRAM_PRIOR
    max_block: int = 20
    gated: bool = False
    budget: float | None = None
    sprinter_rates: tuple[float, float] | None = None
    relaxed: float | None = None
    probe_every: int = PROBE_EVERY
    cache: dict | None = None  # predictions by rounded estimate; a Decoder shares one across requests of one setting
    fixed: str | None = None  # run this candidate every round (a fixed rival on this loop; the benchmark's ngram-8)
    draft_decay: float = DRAFT_DECAY
    relax: float = RELAX
    prompt_prior: bool = PROMPT_PRIOR  # auto_decode calls `start` with the prompt's acceptance before any round
    draft: Estimate = field(init=False)
    ngram_hit: Estimate = field(init=False)
    ngram_accept: Estimate = field(init=False)
    ratio: Estimate = field(init=False)  # P(the ratio rule keeps a drafted token)
    false_accepts: Estimate = field(init=False)  # the share of what it keeps that the exact rule rejects

    def __post_init__(self) -> None:
        if (self.budget is None) != (self.sprinter_rates is None):
            raise SprinterError(f"sprinter candidate: got budget={self.budget!r} with rates {self.sprinter_rates!r}; "
                                "expected both or neither")
        if self.relaxed is not None and (self.budget is None or not 0 < self.relaxed <= 1):
            raise SprinterError(f"ratio candidates: got lambda {self.relaxed!r} with budget={self.budget!r}; expected "
                                "a lambda in (0, 1] and a budget (they are lossy)")
        self.candidates = candidates(gated=self.gated, budget=self.budget, relaxed=self.relaxed is not None)
        if self.fixed is not None and self.fixed not in self.candidates:
            raise SprinterError(f"auto_candidate: got {self.fixed!r}; expected one of {sorted(self.candidates)}")
        if not 0 < self.relax <= 1:
            raise SprinterError(f"auto relax: got {self.relax!r}; expected a number in (0, 1] (1: off)")
        self.start(self.draft_prior)  # the draft's estimate and the ratio rule's (observed when the draft is)
        self.ngram_hit, self.ngram_accept = Estimate(self.ngram_prior[0]), Estimate(self.ngram_prior[1])
        self.false_accepts = Estimate(0.0, decay=FALSE_ACCEPT_DECAY)
        self.since_draft = 0  # rounds since the draft model was last observed
        self.wait = self.probe_every  # ar rounds before the next probe
        self.probing = False
        if self.cache is None:
            self.cache = {}

    @property
    def max_chain(self) -> int:
        """The longest n-gram chain any candidate drafts (what the free lookup before each round asks for)."""
        return max(c.k for c in self.candidates.values() if c.kind == "ngram")

    def predict(self) -> dict[str, float]:
        """Predicted ms/token of every candidate under the current estimates, each rounded to QUANTUM. The draft
        model's candidates, the ratio rule's and the n-gram ones are cached apart (the gated ones' Markov chain
        costs ~0.3 ms)."""
        a, hit, a_ng, a_r = (round(e.rate / QUANTUM) for e in (self.draft, self.ngram_hit, self.ngram_accept,
                                                                self.ratio))
        keys = {("model", a): ("ar", "sd", "sd-gated", "sprinter"), ("ngram", hit, a_ng): ("ngram",),
                ("ratio", a_r): ("sd-ratio",)}
        for key, kinds in keys.items():
            if key not in self.cache:
                rates = [q * QUANTUM for q in key[1:]]
                self.cache[key] = {name: self._ms(c, *rates) for name, c in self.candidates.items() if c.kind in kinds}
        return {name: ms for key in keys for name, ms in self.cache[key].items()}

    def _ms(self, c: Candidate, *rates: float) -> float:
        """ms/token of `c` at rates (a) for the draft model's and the ratio rule's candidates, (hit, a_ng) for the
        n-gram ones."""
        p = self.profile
        if c.kind == "ar":
            return ar_ms(p)
        if c.kind == "ngram":  # a lookup finds a chain (of k tokens) with probability `hit`, else the round is ar's
            hit, a_ng = rates
            accepted = hit * sum(a_ng ** j for j in range(1, c.k + 1))
            return ngram_ms(p, hit * c.k, accepted)
        (a,) = rates
        if c.kind in ("sd", "sd-ratio"):  # the ratio rule's block: sd's, at the ratio rule's acceptance
            return sd_ms(p, (a,), c.k)
        if c.kind == "sd-gated":
            return sd_gated_ms(p, (a,), *GATED_RATES, self.max_block)
        return sprinter_ms(p, (a,), *self.sprinter_rates, self.max_block)

    @property
    def relaxed_allowed(self) -> bool:
        """Whether the ratio candidates may run: offered, and their estimated false-accept share within the budget."""
        return self.relaxed is not None and self.false_accepts.rate <= self.budget

    def fastest(self) -> str:
        """The candidate predicted fastest among those allowed now."""
        times = self.predict()
        allowed = self.relaxed_allowed
        return min((name for name in times if allowed or self.candidates[name].kind != "sd-ratio"),
                   key=times.__getitem__)

    def choose(self) -> Candidate:
        """The next round's candidate: the fastest predicted, or a probe of the draft after a stretch of ar."""
        if self.fixed is not None:
            return self.candidates[self.fixed]
        best = self.fastest()
        self.probing = False
        if self.candidates[best].kind in ("ar", "ngram"):
            self.since_draft += 1
            if self.since_draft > self.wait:
                self.probing = True
                return self.candidates["sd-k1"]
            self.draft.toward(self.draft_prior, self.relax)
            self.ratio.toward(self.draft_prior, self.relax)
        return self.candidates[best]

    def start(self, prior: float) -> None:
        """Start the draft's estimate and the ratio rule's from `prior` (at construction: the pair's; with
        `prompt_prior`, before a request's first round: its prompt's teacher-forced acceptance)."""
        self.draft_prior = min(max(float(prior), 0.0), 1.0)
        self.draft = Estimate(self.draft_prior, decay=self.draft_decay)
        self.ratio = Estimate(self.draft_prior, decay=self.draft_decay)

    def observe_draft(self, accepted: int, reached: int) -> None:
        """A round of the draft model: `reached` drafted tokens were judged (a block's accepted prefix and its
        first rejection), `accepted` of them kept."""
        self.draft.update(accepted, reached)
        self.since_draft = 0
        if self.probing:  # the probe decides how long until the next one
            drafting = self.candidates[self.fastest()].kind not in ("ar", "ngram")
            self.wait = self.probe_every if drafting else min(2 * self.wait, PROBE_MAX)

    def observe_relaxed(self, kept: int, drafted: int, false_accepts: float) -> None:
        """What the ratio rule would keep of a checked block of `drafted` tokens (`kept`, its first rejection
        judged too), and the false accepts among those kept (acceptance.ratio_tally)."""
        self.ratio.update(kept, min(kept + 1, drafted))
        self.false_accepts.update(false_accepts, kept)

    def observe_ngram(self, chain: Sequence[int], emitted: Sequence[int]) -> None:
        """A lookup's chain (before the round) against the tokens the round emitted after it."""
        self.ngram_hit.update(float(bool(chain)), 1.0)
        n = min(len(chain), len(emitted))
        match = next((i for i in range(n) if chain[i] != emitted[i]), n)
        self.ngram_accept.update(match, min(match + 1, n))


def prompt_acceptance(target: CachedLM, draft: CachedLM, ids: Sequence[int], sampler) -> float:
    """The prompt's teacher-forced acceptance: both models read all of it but its last token (prefills the first
    rounds need anyway), and the mean of 1 - TV(p, q) under the request's sampler over the positions with at least
    PROMPT_SKIP tokens of context (a shorter prompt: its later half)."""
    head = torch.tensor([list(ids[:-1])], dtype=torch.long, device=next(target.model.parameters()).device)
    n = head.shape[1]
    p, _ = target.append(head, logits=n)  # (n, V)
    q, _ = draft.append(head, logits=n)
    return expected_acceptance(sampler.probs(p), sampler.probs(q))[min(PROMPT_SKIP, n // 2):].mean().item()


class IndexDrafter:
    """The drafter interface over an `NgramIndex` of the request's sequence (auto extends it as tokens are emitted)."""

    def __init__(self, index: NgramIndex):
        self.index = index

    def propose(self, seqs, limits, gen, *, stop=None) -> Draft:
        (limit,) = limits
        chain = self.index.chain(limit)
        return Draft(torch.tensor([chain], dtype=torch.long).view(1, len(chain)), [len(chain)], None, None, [chain])

    def keep(self, rows, lengths) -> None:
        """Nothing to forget: the index only ever holds emitted tokens."""


def auto_decode(target: CachedLM, draft: ModelDrafter, prompt: list[int], *, controller: AutoController,
                options: DecodeOptions, stop_rule: GateRule | None, sprinter_rule: GateRule | None,
                state: LoopState) -> None:
    """Rounds of whichever candidate `controller` chooses, until the budget, EOS or a stop string. From `options`:
    the gated candidates' longest block (`max_block`) and the n-gram lookup's longest suffix (`ngram_n`).

    Both caches stay exact across switches: the target's covers every emitted token but the last after every
    round of every kind (an ar round reads what it lacks, as `autoregressive` does; a drafted round rolls back
    to it); the draft's may fall behind during ar and n-gram rounds, and the next draft-model round reads the
    tokens it skipped first (ModelDrafter feeds `seq[lm.length:]`).

    Only the ratio candidates' target calls keep by the ratio rule (at `controller.relaxed`); every other round
    keeps by the exact rule, whatever `state.accept` says. With `controller.relaxed` every draft-model round the
    target checks also tallies both rules (`Round.tally`) for the controller's estimates."""
    sampler, gen, out, max_block = state.sampler, state.gen, state.out, options.max_block
    ids = list(prompt)
    index = NgramDrafter(options.ngram_n).index(ids)
    ngram = IndexDrafter(index)
    device = next(target.model.parameters()).device
    rules = {"sd-gated": stop_rule, "sprinter": sprinter_rule}
    exact = dataclasses.replace(state, accept=("exact", 0.0), relaxed=controller.relaxed)  # the draft model's rounds
    states = {"ngram": dataclasses.replace(exact, relaxed=None)}
    if controller.relaxed is not None:
        states["sd-ratio"] = dataclasses.replace(exact, accept=("ratio", controller.relaxed))
    modes = state.stats.modes
    if controller.prompt_prior and len(ids) > 2 and target.length == 0 and draft.lm.length == 0:
        controller.start(prompt_acceptance(target, draft.lm, ids, sampler))
    while not out.done:
        choice = controller.choose()
        chain = index.chain(controller.max_chain)  # the free n-gram probe: compared with what this round emits
        if choice.kind == "ar":
            logits, _ = target.append(torch.tensor([ids[target.length:]], dtype=torch.long, device=device))  # (1, V)
            decided = [sampler.draw(sampler.probs(logits[0]), gen).item()]
        else:
            k = min(max_block if choice.kind in ("sd-gated", "sprinter") else choice.k, out.remaining)
            drafter = ngram if choice.kind == "ngram" else draft
            step = speculative_round(target, drafter, ids, k, rule=rules.get(choice.kind),
                                     check_all=choice.kind != "sprinter", state=states.get(choice.kind, exact))
            decided = step.decided
            if drafter is draft:  # the judged tokens: the kept prefix and the first rejection (if any)
                kept = step.tally[0] if choice.kind == "sd-ratio" else step.kept  # what the exact rule kept
                controller.observe_draft(kept, min(kept + 1, step.drafted))
                if step.tally is not None:
                    controller.observe_relaxed(step.tally[1], step.drafted, step.tally[2])
        controller.observe_ngram(chain, decided)
        ids += decided
        index.extend(decided)
        before = len(out.ids)
        out.emit(decided)
        modes[choice.name] = modes.get(choice.name, 0) + len(out.ids) - before


# ------------------------------------------------------------------------------------- a Decoder's request
def run_auto(decoder: Decoder, target: CachedLM, draft: ModelDrafter, ids: list[int], options: DecodeOptions,
             state: LoopState) -> None:
    """Mode "auto" for one request of `decoder`: its controller, sd-gated's stop rule (the loaded verifier at its
    stop threshold) and, with max_false_accept, sprinter's rule (the verifier at that budget's threshold)."""
    controller = decoder.make_controller(options)
    gate, sprinter_rule = decoder.gate, None
    if options.max_false_accept is not None:
        threshold = decoder.verifier_info.threshold_for(options.max_false_accept, options.temperature)
        sprinter_rule = GateRule(LearnedGate(gate.verifier, gate.features, threshold), None)
    stop_rule = None if gate is None else GateRule(gate, decoder.stop_threshold(None, gate))
    auto_decode(target, draft, ids, controller=controller, options=options, stop_rule=stop_rule,
                sprinter_rule=sprinter_rule, state=state)


def make_controller(decoder: Decoder, options: DecodeOptions) -> AutoController:
    """The controller of one request. Its draft prior is `decoder.draft_prior` when set (the benchmark's
    calibration prompts), else the pair's greedy agreement (pair.json beside the draft) when stated, else
    DRAFT_PRIOR; with max_false_accept, sprinter's rates come from the verifier's metrics.json (true accept at
    that budget), else (SPRINTER_RATES' true accept, the budget), and the ratio candidates' lambda is
    `rule_threshold` with rule="ratio", else RULE_THRESHOLDS["ratio"] (0.5: the relaxed label's lambda, whose
    false-accept share on the bench pair's val rows, 0.21, is already above any calibrated budget; a smaller
    lambda keeps more of the target's rejections, so its candidates would be allowed less often)."""
    meta_path = Path(decoder.pair.draft_name).parent / "pair.json"
    meta = read_json(meta_path, "pair.json") if meta_path.is_file() else {}
    agreement = meta.get("greedy_agreement") if isinstance(meta, dict) else None
    prior = float(agreement) if isinstance(agreement, (int, float)) and 0 <= agreement <= 1 else DRAFT_PRIOR
    prior = decoder.draft_prior if decoder.draft_prior is not None else prior
    budget = options.max_false_accept
    rates = relaxed = None
    if budget is not None:
        relaxed = options.acceptance[1] if options.rule == "ratio" else RULE_THRESHOLDS["ratio"]
        path = decoder.verifier_dir / "metrics.json" if decoder.verifier_dir else None
        metrics = read_json(path, "metrics.json") if path is not None and path.is_file() else {}
        rates = verifier_rates(metrics).get(budget_key(budget), (SPRINTER_RATES[0], float(budget)))
    profile = decoder.cost_profile()
    gated = decoder.gate is not None
    setting = (repr(profile), options.max_block, gated, budget, rates, relaxed)  # what predictions read
    return AutoController(profile, draft_prior=prior, max_block=options.max_block, gated=gated, budget=budget,
                          sprinter_rates=rates, relaxed=relaxed, cache=decoder.predictions.setdefault(setting, {}),
                          fixed=options.auto_candidate)


__all__ = ["DECAY", "DRAFT_KS", "DRAFT_PRIOR", "FALSE_ACCEPT_DECAY", "NGRAM_PRIOR", "NGRAM_KS", "PRIOR_WEIGHT",
           "PROBE_EVERY", "AutoController", "Candidate", "Estimate", "IndexDrafter", "auto_decode", "candidates",
           "make_controller", "prompt_acceptance", "run_auto"]
