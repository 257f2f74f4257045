"""Invariants the other decode tests leave open, each written against a bug decoding libraries have shipped:
the gate's threshold boundary, sprinter's output distribution at temperature > 0 (and the decode-time
false-accept rate), top-k / top-p in the distribution tests, the bonus token, the context window filled
exactly, and EOS inside an accepted block. docs/testing.md lists which planted bug each one catches.

The distribution tests run on the hand-made 4-token models of test_decode_distribution (a few seconds each),
with fixed seeds, against distributions computed here by hand from the models' logits, never through the
Sampler under test. Each states its power: the chi-square statistic the planted bug produces, expected under
that bug, against the critical value at p = 0.001.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import torch_threads
from test_decode_distribution import VOCAB, IdTokenizer, random_lm

from sprinter.decode.decoder import Decoder
from sprinter.decode.engine import Engine
from sprinter.decode.loops import GateRule
from sprinter.errors import SprinterError
from sprinter.pairs.load import Pair


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (conftest's single_thread without building the tiny pairs, which these tests never read)."""
    with torch_threads(1):
        yield


CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27}  # chi-square critical values at p = 0.001 by degrees of freedom
N = 1000  # generations per distribution test
# A planted bug whose expected chi-square statistic (noncentrality) exceeds this fails the test with probability
# > 0.99 at 3 degrees of freedom and p = 0.001 (noncentral chi-square: mean 3 + 45, sd 13.7, 2.3 sd above 16.27).
POWERFUL = 45.0


def pair_decoder(target, draft) -> Decoder:
    pair = Pair(draft=draft, target=target, tokenizer=IdTokenizer(), draft_name="d", target_name="t",
                device=torch.device("cpu"), dtype=torch.float32)
    return Decoder(pair)


def far_decoder() -> Decoder:
    """Draft and target far apart (test_decode_distribution's pair): drafts are often rejected."""
    return pair_decoder(random_lm(0, 0.6), random_lm(1, 0.6))


def close_decoder() -> Decoder:
    """The draft is the target with a flatter head (same weights, logits x 2/3): the same greedy token always, and
    at temperature > 0 a draft that is often, not always, accepted, so whole blocks are kept and bonus tokens drawn."""
    return pair_decoder(random_lm(0, 0.6), random_lm(0, 0.4))


def logits_after(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].double()  # (V,)


def warped(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a sampler with these settings draws from, by its definition: temperature, then keep the
    top_k most likely tokens, renormalise, then keep the smallest most-likely-first prefix whose mass reaches
    top_p (the token that crosses top_p stays), renormalise.  # (V,) -> (V,) float64"""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    if top_k:
        probs[order[top_k:]] = 0
        probs = probs / probs.sum()
    kept, mass = [], 0.0
    for token in order:
        if mass >= top_p:
            break
        kept.append(token)
        mass += float(probs[token])
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, critical value at p = 0.001): over the tokens `probs` gives mass; a token it gives none must
    not occur at all (else the statistic is infinite)."""
    counts, probs = counts.double(), probs.double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return float("inf"), CHI2_P001[3]
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), CHI2_P001[max(1, int(support.sum()) - 1)]


def noncentrality(n: int, wrong: torch.Tensor, right: torch.Tensor) -> float:
    """The chi-square statistic expected when the samples come from `wrong` and the test expects `right`
    (the power of the test against that bug: far above the critical value means it is caught)."""
    support = right > 0
    if (wrong[~support] > 1e-3).any():
        return float("inf")
    return float(n * ((wrong[support] - right[support]) ** 2 / right[support]).sum())


def counts_of(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=VOCAB).double()


# ------------------------------------------------------------------------------ the gate's threshold boundary
class FixedGate:
    """P(accept) is the same number for every token."""

    hidden_layers = 0

    def __init__(self, p_accept: float, threshold: float):
        self.p, self.threshold = p_accept, threshold

    def accept_prob(self, step, position: int) -> torch.Tensor:
        return torch.tensor(self.p)


def test_a_token_at_exactly_the_threshold_passes():
    """gates.py: a token PASSES iff P(accept) >= threshold (calibrate.py picks thresholds on that contract)."""
    step = SimpleNamespace(p_accept=None)
    for p, threshold, flagged in ((0.5, 0.5, False), (0.25, 0.25, False), (0.0, 0.0, False), (1.0, 1.0, False),
                                  (0.4999, 0.5, True), (0.5, 0.5001, True)):
        rule = GateRule(FixedGate(p, threshold), None)
        assert rule(step, 0) is flagged and rule.stopped is flagged, (p, threshold)
        assert rule.calls == 1
    # the fused draft step hands P(accept) in: the same rule applies to it
    assert GateRule(FixedGate(0.0, 0.5), None)(SimpleNamespace(p_accept=torch.tensor(0.5)), 0) is False


def test_sd_gated_stops_once_the_rejection_chance_exceeds_the_stop_threshold():
    """SpecDec++: stop when 1 - prod P(accept) > stop_threshold (strictly): 0.5 after one token of P = 0.5 is not
    over 0.5; 0.75 after two is."""
    rule = GateRule(FixedGate(0.5, 0.0), stop_threshold=0.5)
    step = SimpleNamespace(p_accept=None)
    assert rule(step, 0) is False and rule.survival == 0.5
    assert rule(step, 1) is True and rule.survival == 0.25 and rule.calls == 2
    rule.start()
    assert (rule.stopped, rule.survival, rule.calls) == (False, 1.0, 0)


# ------------------------------------------------------------------- sprinter's distribution at temperature > 0
class TokenGate:
    """Passes exactly the tokens in `passes` (P(accept) 1 for them, 0 for the rest): a gate whose every decision
    is known, so sprinter's output distribution can be written down."""

    hidden_layers = 0
    threshold = 0.5

    def __init__(self, passes: set[int]):
        self.passes = passes

    def accept_prob(self, step, position: int) -> torch.Tensor:
        return torch.tensor(1.0 if int(step.token) in self.passes else 0.0)


def sprinter_first_token(p: torch.Tensor, q: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """The first token's distribution under sprinter: x ~ q; a passed x is kept unchecked; a flagged x is kept with
    probability min(1, p(x)/q(x)), else replaced from norm(max(0, p - q)). So
    P = q on the passed tokens + min(p, q) on the flagged ones + R * residual, R = sum over flagged of max(0, q - p).
    The false accepts (passed tokens the target would have rejected) are what moves P away from p."""
    flagged = ~passed
    residual = (p - q).clamp_min(0)
    rejected = ((q - p).clamp_min(0) * flagged).sum()
    return torch.where(passed, q, torch.minimum(p, q)) + rejected * residual / residual.sum()


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=3, top_p=0.97)])
def test_sprinter_samples_the_mixture_its_false_accepts_imply(sampling):
    decoder = far_decoder()
    target, draft = decoder.pair.target, decoder.pair.draft
    prompt, passes = [3, 1], {2, 3}
    p = warped(logits_after(target, prompt), **sampling)
    q = warped(logits_after(draft, prompt), **sampling)
    passed = torch.tensor([t in passes for t in range(VOCAB)])
    want = sprinter_first_token(p, q, passed)
    torch.testing.assert_close(want.sum(), torch.tensor(1.0, dtype=torch.float64))
    # the decode-time rates the gate implies: P(flag) and the false-accept rate among passed tokens
    flag_rate = float(q[~passed].sum())
    false_accept = float(((q - p).clamp_min(0) * passed).sum() / q[passed].sum())
    # power: a sprinter that checked every token (p), or none (q), is told apart from the mixture
    assert noncentrality(N, p, want) > POWERFUL and noncentrality(N, q, want) > POWERFUL

    gate = TokenGate(passes)
    tokens, flagged, passed_rejects = [], 0, []
    for seed in range(N):
        # blocks of one token and a budget of two: the first block is followed by the target (its bonus token), so
        # a passed token meets the target's forward too, and must still be kept unchecked
        out = decoder.generate(prompt, max_new_tokens=2, max_block=1, mode="sprinter", gate=gate, seed=seed,
                               **sampling)
        x = out.token_ids[0]
        tokens.append(x)
        if out.stats.flagged:  # the first block's token was flagged (a later round runs only after that)
            flagged += 1
        else:  # passed: kept as drafted, the target's bonus token after it
            assert x in passes and out.stats.target_calls == 1
            passed_rejects.append(float((1 - p[x] / q[x]).clamp_min(0)))  # P(the target would have rejected x)
    stat, critical = chi_square(counts_of(tokens), want)
    assert stat < critical, (counts_of(tokens) / N, want)
    assert abs(flagged / N - flag_rate) < 4.5 * (flag_rate * (1 - flag_rate) / N) ** 0.5, (flagged / N, flag_rate)
    measured = sum(passed_rejects) / len(passed_rejects)
    assert abs(measured - false_accept) < 4.5 * (false_accept * (1 - false_accept) / len(passed_rejects)) ** 0.5 \
        + 1e-9, (measured, false_accept)


# ------------------------------------------------------------- sd with top-k / top-p, and the bonus token
@pytest.mark.parametrize("prompt, sampling", [([0], dict(temperature=0.7, top_p=0.8)),
                                              ([0], dict(temperature=1.0, top_k=3)),
                                              ([3], dict(temperature=0.9, top_k=3, top_p=0.8))])
def test_sd_samples_the_truncated_target(prompt, sampling):
    """Draft and target are warped by the same settings; sd must give the warped target, both tokens."""
    decoder = far_decoder()
    target = decoder.pair.target
    p1 = warped(logits_after(target, prompt), **sampling)
    p2 = sum(p1[a] * warped(logits_after(target, prompt + [a]), **sampling) for a in range(VOCAB))
    untruncated = (logits_after(target, prompt) / sampling["temperature"]).softmax(-1)
    # the truncation removes tokens whose untruncated mass would show up ~20+ times in N draws: a sampler that
    # ignored it would emit one (chi_square is infinite on a token outside the support) but with p < 1e-8
    assert float(untruncated[p1 == 0].sum()) * N > 20, (p1, untruncated)
    first, second = [], []
    rejected = 0
    for seed in range(N):
        out = decoder.generate(prompt, max_new_tokens=2, mode="sd", k=2, seed=seed, **sampling)
        first.append(out.token_ids[0])
        second.append(out.token_ids[1])
        rejected += out.stats.rejected
    assert rejected > N // 10  # residual sampling was exercised
    for got, want in ((first, p1), (second, p2)):
        stat, critical = chi_square(counts_of(got), want)
        assert stat < critical, (sampling, counts_of(got) / N, want)


def test_sd_bonus_token_is_drawn_from_the_target_after_the_block():
    """k = 2 with max_new_tokens = 3: a fully kept block is followed by the target's bonus token, drawn from
    p(. | prompt, x1, x2). Checked on the runs that kept their block (one target call for three tokens), against
    the sum of those runs' bonus distributions, and on the third token's marginal over all runs."""
    decoder = close_decoder()
    target = decoder.pair.target
    prompt = [1, 2]
    p1 = logits_after(target, prompt).softmax(-1)
    p2 = torch.stack([logits_after(target, prompt + [a]).softmax(-1) for a in range(VOCAB)])  # (V, V)
    p3 = torch.stack([torch.stack([logits_after(target, prompt + [a, b]).softmax(-1) for b in range(VOCAB)])
                      for a in range(VOCAB)])  # (V, V, V)
    third = torch.einsum("a,ab,abc->c", p1, p2, p3)
    bonus_counts, bonus_expected, thirds = torch.zeros(VOCAB, dtype=torch.float64), [], []
    for seed in range(N):
        out = decoder.generate(prompt, max_new_tokens=3, mode="sd", k=2, temperature=1.0, seed=seed)
        a, b, c = out.token_ids
        thirds.append(c)
        if out.stats.target_calls == 1:  # both drafted tokens kept: c is the bonus
            bonus_counts[c] += 1
            bonus_expected.append(p3[a, b])
    kept = len(bonus_expected)
    assert kept > N // 4, kept  # the bonus was observed often
    expected = torch.stack(bonus_expected).sum(0)  # (V,) expected counts, each run its own distribution
    statistic = float(((bonus_counts - expected) ** 2 / expected).sum())
    assert statistic < CHI2_P001[3], (bonus_counts, expected)
    stat, critical = chi_square(counts_of(thirds), third)
    assert stat < critical, (counts_of(thirds) / N, third)


# ------------------------------------------------------------------------------------------------ edges
@pytest.mark.parametrize("static", [False, True])
def test_prompt_and_budget_exactly_filling_the_context_window(static):
    decoder = close_decoder()
    decoder = Decoder(decoder.pair, engine=Engine(decoder.pair.device, static=static))
    window = decoder.pair.max_length  # 32 positions
    budget = 6
    prompt = [t % VOCAB for t in range(window - budget)]
    far = Decoder(far_decoder().pair, engine=Engine(decoder.pair.device, static=static))
    for dec in (decoder, far):
        ar = dec.generate(prompt, max_new_tokens=budget, mode="ar")
        assert len(ar.token_ids) == budget and ar.stop_reason == "max_new_tokens"
        for options in (dict(mode="sd", k=4), dict(mode="sd", k=budget + 2), dict(mode="sprinter", gate="always"),
                        dict(mode="sprinter", gate="confidence", strict=True),
                        dict(mode="sd-gated", gate="confidence", stop_threshold=0.5), dict(mode="draft")):
            out = dec.generate(prompt, max_new_tokens=budget, **options)
            assert len(out.token_ids) == budget, options
            if options["mode"] != "draft":
                assert out.token_ids == ar.token_ids, options
        sampled = dec.generate(prompt, max_new_tokens=budget, mode="sprinter", gate="never", temperature=1.0)
        assert len(sampled.token_ids) == budget
    with pytest.raises(SprinterError, match="context window of 32"):
        decoder.generate(prompt + [0], max_new_tokens=budget, mode="ar")


def test_eos_inside_an_accepted_block_ends_the_output_there():
    """The close pair's draft always has the target's greedy token, so each sd / strict sprinter block is kept
    whole and an EOS token lands inside one: the output must stop at it, and the stats count what was emitted."""
    decoder = close_decoder()
    prompt = [1, 2]
    free = decoder.generate(prompt, max_new_tokens=12, mode="ar").token_ids
    eos = free[2]
    decoder.pair.tokenizer.eos_token_id = eos  # an instance attribute: IdTokenizer's class keeps None
    try:
        want = free[: free.index(eos) + 1]
        assert len(want) < 6  # EOS comes before the end of a k = 6 block
        ar = decoder.generate(prompt, max_new_tokens=12, mode="ar")
        assert ar.token_ids == want and ar.stop_reason == "eos"
        for options in (dict(mode="sd", k=6), dict(mode="sd", k=4),
                        dict(mode="sprinter", gate="confidence", threshold=0.0, strict=True, max_block=6),
                        dict(mode="sprinter", gate="always")):
            out = decoder.generate(prompt, max_new_tokens=12, **options)
            assert out.token_ids == want and out.stop_reason == "eos", options
            assert out.stats.new_tokens == len(want) and out.stats.rejected == 0, options
    finally:
        del decoder.pair.tokenizer.eos_token_id


# ------------------------------------------------------------------------------- small contracts mutants probed
def test_the_limit_gates_answer_on_the_draft_device():
    """AlwaysFlag / NeverFlag put P(accept) where the draft's q lives (a fused CUDA step reads it there); a "meta"
    tensor stands in for a device other than the CPU default."""
    from sprinter.decode.gates import AlwaysFlag, NeverFlag

    step = SimpleNamespace(q=torch.zeros(4, device="meta"))
    for gate, value in ((AlwaysFlag(), 0.0), (NeverFlag(), 1.0)):
        assert gate.accept_prob(step, 0).device.type == "meta"
        assert float(gate.accept_prob(SimpleNamespace(q=torch.zeros(4)), 0)) == value


def test_a_static_rollback_skips_layers_not_yet_allocated():
    """static_rollback moves only the layers that hold keys: a layer the first append has not allocated keeps
    length 0 (moving it would make it negative)."""
    from sprinter.decode.cache import static_cache, static_cache_supported, static_rollback

    if not static_cache_supported():
        pytest.skip("this transformers has no StaticCache whose length moves back")
    model = random_lm(0, 0.6)
    cache = static_cache(model, 8)
    assert not any(layer.is_initialized for layer in cache.layers)
    static_rollback(cache, 2)
    assert all(int(layer.cumulative_length) == 0 for layer in cache.layers)


def test_a_threshold_is_a_number_in_the_closed_unit_interval():
    """Both ends are thresholds (0 passes every token, 1 only a certain one); a bool or a string is refused in one
    line, never compared."""
    from sprinter.decode.gates import check_threshold

    assert [check_threshold(t) for t in (0, 1, 0.5, 1.0)] == [0.0, 1.0, 0.5, 1.0]
    for bad in (True, False, "0.5", None, -0.01, 1.01):
        with pytest.raises(SprinterError, match="threshold: got"):
            check_threshold(bad)


def test_a_rollback_forgets_at_most_what_the_cache_holds():
    """rollback(n) accepts 0 <= n <= length (all of it included) and names a decoder bug otherwise."""
    from sprinter.decode.cache import CachedLM

    lm = CachedLM(random_lm(0, 0.6), VOCAB)
    lm.append(torch.tensor([[1, 2, 3, 0]]))
    with pytest.raises(RuntimeError, match=r"rollback\(5\) on a cache of 4 tokens"):
        lm.rollback(5)
    with pytest.raises(RuntimeError, match=r"rollback\(-1\) on a cache of 4 tokens"):
        lm.rollback(-1)
    lm.rollback(0)
    assert lm.length == 4
    lm.rollback(4)
    assert lm.length == 0 and lm.cache.get_seq_length() == 0


def test_rollback_to_keeps_a_cache_of_that_length_or_less_untouched():
    """rollback_to(n) drops only what is past n: at or under n the cache is left as it is (a mutant that always
    dropped a token there survived the decode tests)."""
    from sprinter.decode.cache import CachedLM

    lm = CachedLM(random_lm(0, 0.6), VOCAB)
    lm.append(torch.tensor([[1, 2, 3, 0]]))
    for length in (4, 6):
        lm.rollback_to(length)
        assert lm.length == 4 and lm.cache.get_seq_length() == 4
    lm.rollback_to(1)
    assert lm.length == 1 and lm.cache.get_seq_length() == 1


def test_leading_true_counts_each_row_of_a_batch():
    """leading_true works row by row over any leading dims (# (..., k) -> (...)): the batched rounds count each
    sequence's accepted prefix apart (a mutant that summed over the whole batch survived the decode tests)."""
    from sprinter.decode.acceptance import leading_true

    mask = torch.tensor([[True, True, False, True], [False, True, True, True], [True, True, True, True]])
    assert leading_true(mask).tolist() == [2, 0, 4]
    assert leading_true(mask[None]).tolist() == [[2, 0, 4]]
