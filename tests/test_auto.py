"""Mode auto: the controller's choices on hand-made profiles, auto == ar at temperature 0 across forced switches,
exact caches after switching, the target's distribution at temperature 1, a pair where drafting never pays, and
bad options refused."""

import copy
import dataclasses

import pytest
import torch
from test_decode_distribution import (
    CHI2_DF3_P001,
    chi_square,
    random_decoder,
    sample_two_tokens,
    target_marginals,
)

from sprinter.bench.regime_map import synthetic_profile
from sprinter.decode.auto import DRAFT_KS, PRIOR_WEIGHT, PROMPT_SKIP, AutoController, Estimate, auto_decode
from sprinter.decode.cache import CachedLM
from sprinter.decode.costs import stand_in_verifier
from sprinter.decode.decoder import Decoder
from sprinter.decode.drafters import ModelDrafter
from sprinter.decode.emit import Emitter
from sprinter.decode.gates import ConfidenceGate, LearnedGate
from sprinter.decode.latency import ar_ms, sd_ms
from sprinter.decode.loops import LoopState
from sprinter.decode.options import DecodeOptions
from sprinter.decode.stats import DecodeStats
from sprinter.errors import SprinterError
from sprinter.pairs.load import Pair
from sprinter.verifier import VerifierInfo, default_arch

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "def foo(x):"
SWITCHES = ["ar", "ar", "sd-k4", "ngram-k4", "sd-k1", "ar", "ar", "ar", "sd-k8", "ngram-k2", "sd-k2", "ar", "sd-gated"]


class Scripted(AutoController):
    """Runs the candidates of `script` in turn (from `start`), whatever the latency model says: forced switches."""

    def __init__(self, script, start=0, **kwargs):
        super().__init__(synthetic_profile(0.1), gated=True, **kwargs)
        self.script, self.turn = script, start
        self.chosen: list[str] = []  # the candidates run, in order

    def choose(self):
        name = self.script[self.turn % len(self.script)]
        self.turn += 1
        self.chosen.append(name)
        return self.candidates[name]



def target_as_draft(pair: Pair) -> Pair:
    """A pair whose draft is a copy of `pair`'s target: as deep as the target (cost ratio ~1) and always right, so
    drafting cannot pay whatever the acceptance (mode auto's reference case: it must run plain decoding)."""
    return Pair(draft=copy.deepcopy(pair.target), target=pair.target, tokenizer=pair.tokenizer,
                draft_name=f"copy of {pair.target_name}", target_name=pair.target_name, device=pair.device,
                dtype=pair.dtype)

def scripted(decoder, script, start=0):
    """`decoder` with its auto controller replaced by a Scripted one (a fresh one per request, the last one kept
    as `decoder.controller`)."""
    starts = iter(range(start, 1 << 30))

    def make_controller(options):
        decoder.controller = Scripted(script, next(starts))
        return decoder.controller

    decoder.make_controller = make_controller
    return decoder


def costly(profile, round_ms=0.05):
    return dataclasses.replace(profile, round_ms=round_ms)


# ------------------------------------------------------------------------------------------- the controller
def test_cheap_draft_and_high_acceptance_choose_sd():
    c = AutoController(synthetic_profile(0.05), draft_prior=0.9)
    assert c.choose().kind == "sd"


def test_an_expensive_draft_chooses_ar():
    c = AutoController(costly(synthetic_profile(1.0)), draft_prior=0.9, ngram_prior=(0.0, 0.0))
    assert c.choose().name == "ar"


def test_a_predictable_text_chooses_ngram():
    c = AutoController(costly(synthetic_profile(1.0)), draft_prior=0.9, ngram_prior=(0.1, 0.1))
    for _ in range(10):  # the free lookups found chains, and the text followed them
        c.observe_ngram([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert c.choose().kind == "ngram"


def test_falling_acceptance_falls_back_to_ar_within_a_few_target_calls():
    c = AutoController(costly(synthetic_profile(0.1)), draft_prior=0.9, relax=1.0)  # relax 1: only a probe returns
    assert c.choose().kind == "sd"
    calls = 0
    while c.choose().kind != "ar":
        c.observe_draft(0, 1)  # every block rejected at its first token
        c.observe_ngram([], [7])  # and the text has no repeats to look up
        calls += 1
        assert calls <= 10, c.predict()  # the draft estimate's memory (DRAFT_DECAY 0.9): 7 blocks here; 0.7 took 4
    # After a stretch of ar the draft is probed with one small block, and comes back when it is right again.
    for _ in range(200):
        choice = c.choose()
        if choice.kind == "sd":
            assert choice.name == "sd-k1"  # the probe
            c.observe_draft(1, 1)
            break
        c.observe_ngram([], [7])
    else:
        pytest.fail("the draft was never probed again")


def test_while_ar_runs_the_draft_estimate_goes_back_to_its_prior_and_drafting_resumes_without_a_probe():
    c = AutoController(costly(synthetic_profile(0.1)), draft_prior=0.9, ngram_prior=(0.0, 0.0), draft_decay=0.9,
                       relax=0.9)
    for _ in range(10):  # a run of unlucky blocks on text where drafting pays
        c.observe_draft(0, 1)
    low, rounds = c.draft.rate, 0
    assert c.choose().kind == "ar"
    while (choice := c.choose()).kind == "ar":
        c.observe_ngram([], [7])
        rounds += 1
    assert choice.kind == "sd" and not c.probing and rounds < c.probe_every  # not a probe: the prior brought it
    assert rounds >= 1 and low < c.draft.rate <= 0.9


def test_an_estimate_moves_back_toward_its_prior_by_the_factor():
    e = Estimate(0.9, weight=4.0)
    e.update(0, 10)
    assert e.rate == pytest.approx(3.6 * 0.7 / (4 * 0.7 + 10))
    before = (e.hits, e.trials)
    e.toward(0.9, 1.0)  # 1: nothing moves
    assert (e.hits, e.trials) == before
    e.toward(0.9, 0.5)
    assert (e.hits, e.trials) == pytest.approx((before[0] * 0.5 + 0.9 * 2, before[1] * 0.5 + 2))
    for _ in range(100):
        e.toward(0.9, 0.9)
    assert e.rate == pytest.approx(0.9, abs=1e-3) and e.trials == pytest.approx(4.0, abs=1e-3)
    with pytest.raises(SprinterError, match=r"auto relax: got 0; expected a number in \(0, 1\]"):
        AutoController(synthetic_profile(0.05), relax=0)


def test_the_prompt_prior_is_the_prompts_teacher_forced_acceptance(decoder):
    made = []

    def make_controller(options):
        made.append(dataclasses.replace(Decoder.make_controller(dec, options), prompt_prior=True))
        return made[-1]

    dec = Decoder(decoder.pair)
    dec.profile = synthetic_profile(0.05)
    dec.make_controller = make_controller
    ids = decoder.tokenizer("def foo(x):\n    return x + 1\n\ndef bar(y):\n    return foo(y)").input_ids
    out = dec.generate(ids, max_new_tokens=24, mode="auto")
    assert out.token_ids == decoder.generate(ids, max_new_tokens=24, mode="ar").token_ids  # still lossless
    with torch.no_grad():  # greedy: the share of the prompt's positions where both models' argmaxes agree
        p = decoder.pair.target(torch.tensor([ids[:-1]])).logits[0].argmax(-1)
        q = decoder.pair.draft(torch.tensor([ids[:-1]])).logits[0].argmax(-1)
    skip = min(PROMPT_SKIP, (len(ids) - 1) // 2)
    assert made[-1].draft_prior == pytest.approx((p == q)[skip:].float().mean().item())
    copy_pair = Decoder(target_as_draft(decoder.pair))
    copy_pair.profile, copy_pair.make_controller = dec.profile, make_controller
    dec = copy_pair
    copy_pair.generate(ids, max_new_tokens=4, mode="auto")
    assert made[-1].draft_prior == pytest.approx(1.0)  # a draft that is the target agrees everywhere


def test_a_probe_that_loses_waits_longer():
    c = AutoController(costly(synthetic_profile(1.0)), draft_prior=0.2, ngram_prior=(0.0, 0.0), probe_every=4)
    waits = []
    for _ in range(3):
        rounds = 0
        while c.choose().name != "sd-k1":
            rounds += 1
        c.observe_draft(0, 1)
        waits.append(rounds)
    assert waits[0] < waits[1] < waits[2]


def test_the_sprinter_candidate_needs_its_rates():
    c = AutoController(synthetic_profile(0.05), draft_prior=0.9, budget=0.05, sprinter_rates=(0.9, 0.05))
    assert "sprinter@0.05" in c.predict()
    assert "sprinter@0.05" not in AutoController(synthetic_profile(0.05)).predict()  # lossless: never a candidate
    with pytest.raises(SprinterError, match="sprinter candidate"):
        AutoController(synthetic_profile(0.05), budget=0.05)


def relaxed_controller(**kwargs):
    """A cheap draft that the exact rule keeps half the time, with a budget of 0.05 and the ratio candidates."""
    return AutoController(synthetic_profile(0.05), draft_prior=0.5, budget=0.05, sprinter_rates=(0.1, 0.05),
                          relaxed=0.5, **kwargs)


def test_the_ratio_candidate_runs_when_predicted_fastest_and_within_the_budget():
    c = relaxed_controller()
    assert c.choose().kind != "sd-ratio"  # before any block: the ratio rule keeps what the exact one keeps (a tie)
    for _ in range(20):  # every block: the exact rule keeps 1 of 4, the ratio rule all 4, one in 40 a false accept
        c.observe_draft(1, 2)
        c.observe_relaxed(4, 4, 0.1)
    assert c.false_accepts.rate == pytest.approx(0.025, abs=0.005) and c.relaxed_allowed
    assert c.choose().name == "sd-k8+ratio"


def test_the_ratio_candidate_is_refused_while_its_false_accepts_exceed_the_budget():
    c = relaxed_controller()
    for _ in range(20):  # as fast as above, but one kept token in ten is one the target rejects
        c.observe_draft(1, 2)
        c.observe_relaxed(4, 4, 0.4)
    times = c.predict()
    assert c.candidates[min(times, key=times.__getitem__)].kind == "sd-ratio"  # the fastest on speed alone
    assert not c.relaxed_allowed and c.choose().kind != "sd-ratio"
    for _ in range(60):  # the text changes: no more false accepts, and the share decays back under 0.05
        c.observe_draft(1, 2)
        c.observe_relaxed(4, 4, 0.0)
    assert c.choose().kind == "sd-ratio"


def test_the_ratio_candidate_is_never_offered_without_a_budget(gpt2_decoder):
    lossless = AutoController(synthetic_profile(0.05), draft_prior=0.9)
    assert not lossless.relaxed_allowed and not any("ratio" in name for name in lossless.predict())
    budget_only = AutoController(synthetic_profile(0.05), budget=0.05, sprinter_rates=(0.9, 0.05))
    assert not any("ratio" in name for name in budget_only.predict())  # a hand-made one without a lambda
    with pytest.raises(SprinterError, match="ratio candidates: got lambda 0.5 with budget=None"):
        AutoController(synthetic_profile(0.05), relaxed=0.5)
    with pytest.raises(SprinterError, match="auto_candidate: got 'sd-k4\\+ratio'"):
        gpt2_decoder.generate("def f():", mode="auto", auto_candidate="sd-k4+ratio", max_new_tokens=4)
    with pytest.raises(SprinterError, match="max_false_accept=None"):
        DecodeOptions(mode="auto", rule="ratio", rule_threshold=0.3)


def test_a_fixed_candidate_runs_every_round_and_never_probes():
    c = AutoController(costly(synthetic_profile(1.0)), draft_prior=0.2, ngram_prior=(0.0, 0.0), probe_every=1,
                       fixed="ngram-k8")
    assert {c.choose().name for _ in range(50)} == {"ngram-k8"}
    with pytest.raises(SprinterError, match="auto_candidate: got 'ngram-k5'"):
        AutoController(synthetic_profile(0.05), fixed="ngram-k5")


def test_the_decoders_draft_prior_overrides_the_pairs_agreement(gpt2_decoder):
    dec = Decoder(gpt2_decoder.pair)
    dec.profile = synthetic_profile(0.05)
    dec.draft_prior = 0.123  # the benchmark's calibration acceptance
    assert dec.make_controller(DecodeOptions(mode="auto")).draft.rate == pytest.approx(0.123)


def test_auto_with_a_fixed_ngram_candidate_equals_ar(decoder):
    ar = decoder.generate("def foo(x):", max_new_tokens=40, mode="ar")
    fixed = decoder.generate("def foo(x):", max_new_tokens=40, mode="auto", auto_candidate="ngram-k8")
    assert fixed.token_ids == ar.token_ids and set(fixed.stats.modes) == {"ngram-k8"}


# ------------------------------------------------------------------------------------------- decoding
def gated(decoder):
    """The same pair with a gate for sd-gated rounds (the draft's confidence)."""
    return Decoder(decoder.pair, gate=ConfidenceGate())


@pytest.mark.parametrize("start", [0, 5])
def test_auto_equals_ar_at_temperature_0_across_forced_switches(decoder, start):
    dec = scripted(gated(decoder), SWITCHES, start)
    rejected = 0
    for prompt in ["def foo(x):", [5, 17, 33, 2, 9]]:
        ar = decoder.generate(prompt, max_new_tokens=40, mode="ar")
        auto = dec.generate(prompt, max_new_tokens=40, mode="auto")
        assert auto.token_ids == ar.token_ids, prompt
        assert sum(auto.stats.modes.values()) == auto.stats.new_tokens == ar.stats.new_tokens
        # every round the script ran emitted under its name, and the script switched kinds at least once
        chosen = dec.controller.chosen
        assert set(auto.stats.modes) == set(chosen) and len(set(chosen)) >= 2, (auto.stats.modes, chosen)
        rejected += auto.stats.rejected
    assert rejected > 0  # drafts were rejected: rollbacks happened between switches


def test_auto_on_static_caches_equals_ar(llama_decoder):
    from sprinter.decode.engine import Engine

    static = scripted(Decoder(llama_decoder.pair, ConfidenceGate(), engine=Engine(llama_decoder.pair.device,
                                                                                   static=True)), SWITCHES)
    prompt = [5, 17, 33, 2, 9]
    want = llama_decoder.generate(prompt, max_new_tokens=40, mode="ar").token_ids
    assert static.generate(prompt, max_new_tokens=40, mode="auto").token_ids == want


def test_switching_keeps_both_caches_exact(gpt2_decoder):
    pair = gpt2_decoder.pair
    vocab = pair.vocab_size
    target, draft = CachedLM(pair.target, vocab), CachedLM(pair.draft, vocab)
    prompt = [5, 17, 33, 2, 9]
    options = DecodeOptions(mode="auto", max_new_tokens=30)
    out = Emitter(pair.tokenizer, 30, None, (), None)
    stats = DecodeStats(mode="auto")
    auto_decode(target, ModelDrafter(draft, options.sampler), prompt, controller=Scripted(SWITCHES[:-1]),
                options=options, stop_rule=None, sprinter_rule=None,
                state=LoopState(options.sampler, torch.Generator().manual_seed(0), out, stats))
    ids = prompt + out.ids
    assert target.length == len(ids) - 1  # the target covers every emitted token but the last
    assert draft.length <= len(ids) - 1  # the draft may lag (skipped tokens) but never holds an unemitted one
    for lm, model in ((target, pair.target), (draft, pair.draft)):
        rest = torch.tensor([ids[lm.length:]])
        got, _ = lm.append(rest, logits=rest.shape[1])
        want, _ = CachedLM(model, vocab).append(torch.tensor([ids]), logits=rest.shape[1])
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("pair", ["far", "close"])
def test_auto_samples_from_the_target_distribution(pair):
    """Both tokens come from drafted rounds (sd-2, then sd-1 when the first round kept nothing), so a bug in their
    acceptance is not diluted by ar rounds. The close pair (test_invariants: the draft is the target, flattened)
    accepts often, and only there does a rule that keeps x with probability p(x) instead of min(1, p(x)/q(x))
    move the output far (the far pair's residual makes up for it)."""
    from test_invariants import close_decoder

    decoder, target, _ = random_decoder() if pair == "far" else (close_decoder(), None, None)
    target = decoder.pair.target
    scripted(decoder, ["sd-k2", "sd-k1", "ar", "ngram-k2", "ar", "sd-k4"])
    prompt = [1, 2, 1, 2]
    p1, p2 = target_marginals(target, prompt)
    n = 1000
    first, second, rejected = sample_two_tokens(decoder, prompt, n, mode="auto")
    assert rejected > n // 20  # residual sampling was exercised
    assert chi_square(first, p1) < CHI2_DF3_P001, (first / n, p1)
    assert chi_square(second, p2) < CHI2_DF3_P001, (second / n, p2)


def test_auto_with_its_own_controller_equals_ar(decoder):
    dec = Decoder(decoder.pair)
    dec.profile = synthetic_profile(0.05)  # a cheap draft: drafted modes run, and the text decides how long
    ar = decoder.generate("def foo(x):", max_new_tokens=40, mode="ar")
    auto = dec.generate("def foo(x):", max_new_tokens=40, mode="auto")
    assert auto.token_ids == ar.token_ids
    assert sum(auto.stats.modes.values()) == auto.stats.new_tokens
    assert auto.stats.to_dict()["modes"] == auto.stats.modes


def test_on_a_pair_where_drafting_never_pays_auto_runs_ar(gpt2_decoder):
    dec = Decoder(target_as_draft(gpt2_decoder.pair))
    for _ in range(3):  # the draft costs what the target costs: no k pays even if every token is accepted ...
        dec.profiles.clear()
        profile = dec.cost_profile(budget_s=0.5)  # measured (random weights work), kept in memory
        if min(sd_ms(profile, (1.0,), k) for k in DRAFT_KS) > ar_ms(profile):
            break
    else:  # ... unless a busy machine timed the draft's steps well below the target's (the same model's) three times
        pytest.skip(f"timings too noisy to tell a copy of the target from it (cost ratio {profile.cost_ratio:.2f})")
    assert dec.cost_profile() is profile
    auto = dec.generate([5, 17, 33, 2, 9], max_new_tokens=64, mode="auto")
    drafted = sum(n for mode, n in auto.stats.modes.items() if mode.startswith("sd"))
    assert auto.stats.modes.get("ar", 0) >= auto.stats.new_tokens // 2, auto.stats.modes
    assert drafted <= auto.stats.new_tokens // 4, auto.stats.modes  # the draft's probes only


def test_the_profile_is_saved_beside_the_pair(tiny_pair, gpt2_decoder):
    from sprinter.decode.costs import FILE_NAME, read_profiles

    dec = Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), device="cpu", dtype="float32")
    profile = dec.cost_profile(budget_s=0.3)
    assert profile.key in read_profiles(tiny_pair / FILE_NAME)
    again = Decoder(dec.pair)
    assert again.cost_profile() == profile  # read from the file: not measured again


# ------------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="auto", max_false_accept=1.5), "max_false_accept: got 1.5"),
    (dict(mode="auto", max_false_accept=0), "max_false_accept: got 0"),
    (dict(mode="auto", max_false_accept=True), "max_false_accept: got True"),
    (dict(mode="sd", max_false_accept=0.05), "expected it only with a mode of \\('auto', 'sprinter'\\)"),
    (dict(mode="auto", max_block=None), "max_block: got None with mode='auto'"),
    (dict(mode="auto", gate="confidence"), "gate: got 'confidence' with mode='auto'"),
    (dict(mode="sd", auto_candidate="ngram-k8"), "auto_candidate: got 'ngram-k8' with mode='sd'"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(SprinterError, match=message):
        DecodeOptions(**kwargs)


def budgeted(pair) -> Decoder:
    """A decoder with a stand-in verifier calibrated for the budgets 0.05 and 0.1 (auto's lossy candidates may
    run) and a cheap draft on a hand-made profile."""
    features = ("hidden", "token_id", "draft_prob", "draft_entropy")
    gate = LearnedGate(stand_in_verifier(pair.draft.config.hidden_size, pair.vocab_size), features, 0.5)
    info = VerifierInfo(features=features, hidden_size=pair.draft.config.hidden_size, arch=default_arch(),
                        thresholds={"0.05": 0.5, "0.1": 0.4})
    dec = Decoder(pair, gate, info)
    dec.profile = synthetic_profile(0.05)
    return dec


def test_autos_ratio_candidate_decodes_as_sd_with_the_ratio_rule(gpt2_decoder):
    dec = budgeted(gpt2_decoder.pair)
    ar = gpt2_decoder.generate(PROMPT, mode="ar", max_new_tokens=40).token_ids
    for lam in (0.3, 0.5):
        sd = gpt2_decoder.generate(PROMPT, mode="sd", k=4, rule="ratio", rule_threshold=lam, max_new_tokens=40)
        auto = dec.generate(PROMPT, mode="auto", max_false_accept=0.05, auto_candidate="sd-k4+ratio", rule="ratio",
                            rule_threshold=lam, max_new_tokens=40)
        assert auto.token_ids == sd.token_ids != ar  # the rule kept tokens that are not the target's choice
        assert auto.stats.modes == {"sd-k4+ratio": auto.stats.new_tokens}
    default = dec.generate(PROMPT, mode="auto", max_false_accept=0.05, auto_candidate="sd-k4+ratio", max_new_tokens=40)
    assert default.token_ids == sd.token_ids  # without rule='ratio': lambda 0.5


def test_auto_with_a_budget_says_which_candidates_ran_and_estimates_the_ratio_rule_for_free(gpt2_decoder):
    dec = budgeted(gpt2_decoder.pair)
    made = []
    make = dec.make_controller
    dec.make_controller = lambda options: made.append(make(options)) or made[-1]
    out = dec.generate(PROMPT, mode="auto", max_false_accept=0.05, max_new_tokens=40)
    assert sum(out.stats.modes.values()) == out.stats.new_tokens
    assert set(out.stats.modes) <= set(made[-1].candidates)
    assert made[-1].ratio.trials > PRIOR_WEIGHT  # observed in the checked rounds, whichever rule ran
    sampled = dec.generate(PROMPT, mode="auto", max_false_accept=0.05, auto_candidate="sd-k4+ratio",
                           temperature=0.8, seed=3, max_new_tokens=24)
    assert sampled.stats.modes == {"sd-k4+ratio": sampled.stats.new_tokens}
    assert 0 <= made[-1].false_accepts.rate <= 1 and made[-1].ratio.rate >= made[-1].draft.rate - 0.05
    lossless = dec.generate(PROMPT, mode="auto", max_new_tokens=40)
    assert made[-1].relaxed is None and lossless.token_ids == gpt2_decoder.generate(
        PROMPT, mode="ar", max_new_tokens=40).token_ids


def test_the_ratio_candidate_at_lambda_1_is_exact(decoder):
    """lambda = 1 keeps only the target's argmax: forced switches through the ratio candidates give ar's tokens,
    and the free tallies find the ratio rule keeping what the exact rule keeps, with no false accept."""
    script = ["sd-k4+ratio", "ar", "sd-k2", "sd-k8+ratio", "ngram-k4", "sd-k1+ratio", "sd-gated"]
    dec = budgeted(decoder.pair)
    controllers = []

    def make_controller(options):
        controllers.append(Scripted(script, budget=0.05, sprinter_rates=(0.9, 0.05), relaxed=options.acceptance[1]))
        return controllers[-1]

    dec.make_controller = make_controller
    ar = decoder.generate([5, 17, 33, 2, 9], mode="ar", max_new_tokens=40)
    auto = dec.generate([5, 17, 33, 2, 9], mode="auto", max_false_accept=0.05, rule="ratio", rule_threshold=1.0,
                        max_new_tokens=40)
    c = controllers[-1]
    assert auto.token_ids == ar.token_ids and {"sd-k4+ratio", "sd-k2"} <= set(auto.stats.modes)
    assert c.false_accepts.rate == 0 and c.ratio.rate == pytest.approx(c.draft.rate) and c.ratio.trials > PRIOR_WEIGHT


def test_exact_rounds_tally_the_ratio_rule_on_the_targets_soft_distribution(gpt2_decoder):
    """Greedy rounds that ran the exact rule still tally what the ratio rule would keep, reading softmax(logits)
    (greedy p is one-hot: read as the ratio rule's input it would keep just the argmax, what exact keeps)."""
    dec = budgeted(gpt2_decoder.pair)
    controllers = []

    def make_controller(options):
        controllers.append(Scripted(["sd-k4"], budget=0.05, sprinter_rates=(0.9, 0.05), relaxed=options.acceptance[1]))
        return controllers[-1]

    dec.make_controller = make_controller
    auto = dec.generate(PROMPT, mode="auto", max_false_accept=0.05, rule="ratio", rule_threshold=0.3,
                        max_new_tokens=40)
    c = controllers[-1]
    assert auto.token_ids == gpt2_decoder.generate(PROMPT, mode="ar", max_new_tokens=40).token_ids  # exact rounds
    assert c.ratio.trials > PRIOR_WEIGHT and c.ratio.rate > c.draft.rate + 0.05  # the ratio rule keeps more
    assert c.false_accepts.rate > 0  # and some of what it adds is not the target's choice


def test_auto_requests_are_checked_against_the_decoder(gpt2_decoder):
    with pytest.raises(SprinterError, match="no verifier"):
        gpt2_decoder.generate("def f():", mode="auto", max_false_accept=0.05)
    with pytest.raises(SprinterError, match="batch of 2 prompts with mode='auto'"):
        gpt2_decoder.generate(["a", "b"], mode="auto")
    pair = gpt2_decoder.pair
    gate = LearnedGate(stand_in_verifier(pair.draft.config.hidden_size, pair.vocab_size),
                       ("hidden", "token_id", "draft_prob", "draft_entropy"), 0.5)
    info = VerifierInfo(features=("hidden", "token_id", "draft_prob", "draft_entropy"),
                        hidden_size=pair.draft.config.hidden_size, arch=default_arch(),
                        thresholds={"0.05": 0.5, "0.1": 0.4})
    dec = Decoder(pair, gate, info)
    with pytest.raises(SprinterError, match=r"expected one of the verifier's calibrated budgets \[0.05, 0.1\]"):
        dec.generate("def f():", mode="auto", max_false_accept=0.2)
    dec.profile = synthetic_profile(0.05)
    out = dec.generate("def f():", mode="auto", max_false_accept=0.05, max_new_tokens=16)  # sprinter may run
    assert sum(out.stats.modes.values()) == out.stats.new_tokens
