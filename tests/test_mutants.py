"""Tests written against the survivors of the decode core's mutation run (docs/testing.md, results/mutation/):
each pins a behaviour a one-line change in acceptance.py, cache.py, sampling.py, loops.py or gates.py altered
without any other test noticing. Hand-made inputs; no model larger than a stand-in."""

import sys
import types

import pytest
import torch

from sprinter.decode import cache as cache_module
from sprinter.decode.acceptance import lenient_accept
from sprinter.decode.drafters import DraftStep
from sprinter.decode.gates import MarginGate, load_learned_gate
from sprinter.errors import SprinterError


def step_with(q_soft: torch.Tensor) -> DraftStep:
    return DraftStep(token=q_soft.argmax(), q=q_soft, q_soft=q_soft, hidden=None)


def test_the_margin_of_a_one_token_vocabulary_is_its_probability():
    """With one token there is no runner-up: the margin is the top probability itself (no index past the end)."""
    assert float(MarginGate(0.5).accept_prob(step_with(torch.tensor([1.0])), 0)) == 1.0
    assert float(MarginGate(0.5).accept_prob(step_with(torch.tensor([0.7, 0.2, 0.1])), 0)) == pytest.approx(0.5)


def test_the_ratio_rule_rejects_at_exact_equality():
    """keep x iff u < p(x) / (lambda q(x)), strictly: at u * lambda * q(x) == p(x) the token is not kept (as
    speculative_accept's u < p/q)."""
    p, q, u = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.25])
    assert lenient_accept(p, q, u, 1.0).tolist() == [False, True]
    assert lenient_accept(p, q, u, 2.0).tolist() == [False, False]  # 0.25 * 2 * 1 == 0.5: not kept either


def test_a_missing_verifier_names_the_path_and_the_commands_that_make_one(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SprinterError) as err:
        load_learned_gate(missing, "fp", 8, torch.device("cpu"), torch.float32)
    assert str(err.value) == (
        f"verifier: got {str(missing)!r}, which does not exist; train one with `python scripts/collect.py` then "
        "`python scripts/train.py` (which writes checkpoints/verifiers/demo), or decode with the draft's "
        "confidence instead (gate='confidence', CLI --gate confidence)")


def test_a_transformers_without_static_layers_has_no_static_cache(monkeypatch):
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "transformers.cache_utils", types.ModuleType("transformers.cache_utils"))
        assert cache_module.static_cache_supported() is False
    from transformers import __version__

    monkeypatch.setattr(cache_module, "static_cache_supported", lambda: False)
    with pytest.raises(SprinterError) as err:
        cache_module.static_cache(torch.nn.Linear(1, 1), 8)
    assert str(err.value) == (f"static cache: transformers {__version__} has no StaticCache whose length can be "
                              "moved back; expected a release that has one (5.17 or later), or engine=\"eager\"")


class _Layer:
    def __init__(self, sliding):
        if sliding is not None:
            self.is_sliding = sliding


@pytest.mark.parametrize("flags, refused", [((False, True), True), ((False, False), False), ((None, None), False)])
def test_a_static_cache_with_sliding_window_layers_is_refused(monkeypatch, flags, refused):
    """A layer that says is_sliding=True cannot move its length back; a layer that says nothing is a full one."""
    import transformers

    class FakeStatic:
        def __init__(self, config, max_cache_len):
            self.layers = [_Layer(f) for f in flags]

    class Model(torch.nn.Module):
        config = None

    monkeypatch.setattr(cache_module, "static_cache_supported", lambda: True)
    monkeypatch.setattr(transformers, "StaticCache", FakeStatic)
    if refused:
        with pytest.raises(SprinterError) as err:
            cache_module.static_cache(Model(), 8)
        assert str(err.value) == ("static cache: Model has sliding-window layers, whose static cache cannot move its "
                                  "length back; expected engine=\"eager\"")
    else:
        assert len(cache_module.static_cache(Model(), 8).layers) == 2


def test_a_token_the_target_likes_more_than_the_draft_is_no_false_accept():
    """ratio_tally's false-accept count is a sum of 1 - min(1, p/q): a kept token with p(x) > q(x) adds 0, never a
    negative share that would hide another token's rejection."""
    from sprinter.decode.acceptance import ratio_tally

    p_x, q_x, u = torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.4]), torch.tensor([0.1, 0.6])
    p_soft, x = torch.full((2, 4), 0.25), torch.tensor([0, 1])
    e, n, m = ratio_tally(0.5, p_x, q_x, u, p_soft, x, greedy=False).tolist()
    assert (e, n) == (1.0, 2.0)  # exact: 0.6 * 0.4 >= 0.2 rejects the second; ratio 0.5: 0.12 < 0.2 keeps it
    assert m == pytest.approx(0.5)  # 0 for the first (p > q), 1 - 0.2 / 0.4 for the second


def _saved_verifier(folder, features, hidden_size=8, draft=None):
    from sprinter.verifier import Verifier, VerifierInfo, default_arch, save_verifier

    info = VerifierInfo(features=features, hidden_size=hidden_size, arch=default_arch(depth=0, vocab_size=3),
                        draft=draft or {}, default_threshold=0.5)
    save_verifier(folder, Verifier(info), info)
    return folder


def test_a_verifier_for_another_draft_or_width_is_refused_word_for_word(tmp_path):
    path = _saved_verifier(tmp_path / "v", ("hidden",), draft={"name": "other-draft", "fingerprint": "aaaa"})
    with pytest.raises(SprinterError) as err:
        load_learned_gate(path, "bbbb", 8, torch.device("cpu"), torch.float32)
    assert str(err.value) == (f"verifier {str(path)!r} was trained for draft 'other-draft' (fingerprint aaaa); this "
                              "draft's fingerprint is bbbb: expected a verifier trained on this draft")
    with pytest.raises(SprinterError) as err:
        load_learned_gate(path, "aaaa", 16, torch.device("cpu"), torch.float32)
    assert str(err.value) == (f"verifier {str(path)!r} reads hidden states of size 8; this draft's hidden size is "
                              "16: expected a verifier trained on this draft")


def test_a_learned_gate_runs_in_the_drafts_dtype(tmp_path):
    path = _saved_verifier(tmp_path / "v", ("hidden",))
    gate, _ = load_learned_gate(path, "fp", 8, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in gate.verifier.parameters()} == {torch.bfloat16} and gate.dtype == torch.bfloat16


def test_the_learned_gates_refusals_are_word_for_word(tmp_path):
    from sprinter.decode.gates import LearnedGate
    from sprinter.verifier import load_verifier

    verifier, info = load_verifier(_saved_verifier(tmp_path / "b", ("hidden", "prev_draft_prob")))
    gate = LearnedGate(verifier, info.features, 0.5)
    step = DraftStep(token=torch.tensor(0), q=torch.tensor([0.6, 0.4]), q_soft=torch.tensor([0.6, 0.4]),
                     hidden=torch.zeros(8))
    gate.step_features(step, 0)
    with pytest.raises(SprinterError) as err:
        gate.step_features(step, 2)
    assert str(err.value) == ("LearnedGate: got position 2 after 1 token(s) of this block; expected every drafted "
                              "token in order, the block's first at position 0")
    verifier, info = load_verifier(_saved_verifier(tmp_path / "p", ("hidden", "hidden_prev_layer")))
    with pytest.raises(SprinterError) as err:
        LearnedGate(verifier, info.features, 0.5).step_features(step, 0)
    assert str(err.value) == ("LearnedGate: the verifier reads hidden_prev_layer and the drafter gave none; expected "
                              "a ModelDrafter made with hidden_layers=gate.hidden_layers")


def test_the_entropy_rule_reads_the_last_axis_of_any_batch_shape():
    from sprinter.decode.acceptance import entropy_keep

    p = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])  # (b=1, k=2, V=3): entropies ln 2 and 0
    assert entropy_keep(p, 0.5).tolist() == [[True, False]]


def test_a_learned_gate_computes_exactly_its_features_in_its_own_dtype(tmp_path):
    """Every feature the verifier reads, and no other, each in the verifier's dtype (bfloat16 here: the draft's
    float32 states and the int position are converted), the token id left an id."""
    from sprinter.decode.gates import LearnedGate
    from sprinter.verifier import load_verifier

    features = ("hidden", "hidden_prev_layer", "token_id", "draft_prob", "draft_margin", "prev_draft_prob",
                "block_cum_prob", "position")
    path = _saved_verifier(tmp_path / "all", features)
    verifier, info = load_verifier(path)
    gate = LearnedGate(verifier.to(torch.bfloat16), info.features, 0.5)
    q = torch.tensor([0.6, 0.3, 0.1])
    step = DraftStep(token=torch.tensor(0), q=q, q_soft=q, hidden=torch.ones(8), hidden_prev=torch.ones(8))
    gate.step_features(step, 0)
    out = gate.step_features(step, 1)
    assert set(features) <= set(out)  # with a top-k feature every distribution feature comes from one topk
    assert {k: v.dtype for k, v in out.items() if k != "token_id"} == dict.fromkeys(set(out) - {"token_id"},
                                                                                   torch.bfloat16)
    assert out["token_id"].dtype == torch.long and float(out["position"]) == 1.0
    assert float(out["prev_draft_prob"]) == pytest.approx(0.6, abs=1e-2)
    assert 0 < float(gate.accept_prob(step, 2)) < 1


def test_a_gate_without_top_k_features_computes_no_top_k(tmp_path):
    """A default verifier (hidden, draft_prob, draft_entropy) asks only for what it reads: no topk per step."""
    from sprinter.decode.gates import LearnedGate
    from sprinter.verifier import load_verifier

    verifier, info = load_verifier(_saved_verifier(tmp_path / "d", ("hidden", "draft_prob", "draft_entropy")))
    q = torch.tensor([0.6, 0.3, 0.1])
    step = DraftStep(token=torch.tensor(1), q=q, q_soft=q, hidden=torch.ones(8))
    out = LearnedGate(verifier, info.features, 0.5).step_features(step, 0)
    assert set(out) == {"hidden", "draft_prob", "draft_entropy"} and float(out["draft_prob"]) == pytest.approx(0.3)


def test_make_gate_names_the_learned_gate_and_a_parameterless_verifier_runs_in_float32(tmp_path):
    from sprinter.decode.gates import NO_VERIFIER, LearnedGate, make_gate
    from sprinter.verifier import load_verifier

    verifier, info = load_verifier(_saved_verifier(tmp_path / "v", ("hidden",)))
    learned = LearnedGate(verifier, info.features, 0.5)
    assert make_gate("learned", None, learned) is learned and make_gate(None, None, learned) is learned
    at = make_gate("learned", 0.9, learned)
    assert isinstance(at, LearnedGate) and at.threshold == 0.9 and at.verifier is verifier
    with pytest.raises(SprinterError) as err:
        make_gate("learned", None, None)
    assert str(err.value) == NO_VERIFIER

    class Fixed(torch.nn.Module):  # no parameters at all: the features go in float32
        def forward(self, inputs):
            return inputs["hidden"].sum(-1)

    assert LearnedGate(Fixed(), ("hidden",), 0.5).dtype == torch.float32


def test_a_training_free_gate_takes_the_threshold_it_is_given():
    from sprinter.decode.gates import CONFIDENCE_THRESHOLD, make_gate

    for name in ("confidence", "entropy", "margin"):
        assert make_gate(name, 0.9, None).threshold == 0.9
        assert make_gate(name, None, None).threshold == CONFIDENCE_THRESHOLD


def test_when_sampling_the_verifier_reads_the_sampling_distribution():
    """q_soft is the untempered softmax only when greedy; sampling at T / top-p it is q itself."""
    from sprinter.decode.sampling import Sampler

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    sampler = Sampler(temperature=0.5, top_p=0.9)
    assert torch.allclose(sampler.soft_probs(logits), sampler.probs(logits))
    assert not torch.allclose(sampler.soft_probs(logits), logits.softmax(-1))
    assert torch.allclose(Sampler().soft_probs(logits), logits.softmax(-1))


class _Half:
    """A stand-in gate: every drafted token has P(accept) 0.5, at threshold 0.5 (sprinter would pass them all)."""

    hidden_layers = 0
    threshold = 0.5

    def accept_prob(self, step, position):
        return torch.tensor(0.5)


def test_sd_gated_stops_by_its_own_stop_threshold(gpt2_decoder):
    """sd-gated ends a block once 1 - prod P(accept) > stop_threshold: at P 0.5 a block of 2 at 0.6 (1 - 0.25),
    of 1 at 0.4, never at 0.99 for k = 4 (1 - 0.0625); the gate's own threshold plays no part."""
    drafted = {}
    for stop in (0.4, 0.6, 0.99):
        out = gpt2_decoder.generate("def f(x):", mode="sd-gated", gate=_Half(), stop_threshold=stop, k=4,
                                    max_new_tokens=24)
        drafted[stop] = out.stats.drafted / out.stats.target_calls
    assert drafted[0.4] < drafted[0.6] < drafted[0.99]


def test_modes_without_a_gate_make_no_gate_decisions(gpt2_decoder):
    out = gpt2_decoder.generate("def f(x):", mode="sd", k=4, max_new_tokens=16)
    assert out.stats.verifier_calls == 0 and out.stats.flagged == 0 and out.stats.target_calls > 1
    gated = gpt2_decoder.generate("def f(x):", mode="sprinter", gate=_Half(), max_new_tokens=16)
    assert gated.stats.verifier_calls >= gated.stats.drafted > 0  # one decision a drafted token


def test_a_flagged_token_is_never_counted_as_passed_unchecked(gpt2_decoder):
    """The flagged token is the one the target checks: a gate that flags every token passes nothing unchecked."""
    out = gpt2_decoder.generate("def f(x):", mode="sprinter", gate="always", max_new_tokens=12)
    assert out.stats.flagged > 0 and out.stats.passed_unchecked == 0 and out.stats.false_accepts == 0


def test_last_states_are_the_last_layers_last_first():
    from sprinter.decode.cache import last_states

    layers = tuple(torch.full((1, 3, 2), float(i)) for i in range(4))  # embeddings, then 3 layers
    states = last_states(layers, 2, 1)  # (T - start, n, H)
    assert states.shape == (2, 2, 2) and states[:, 0].unique().item() == 3.0 and states[:, 1].unique().item() == 2.0
    assert last_states(layers, 0, 0) is None


def test_an_append_returns_states_only_when_asked_and_a_rollback_of_nothing_keeps_the_cache(gpt2_decoder):
    from sprinter.decode.cache import CachedLM

    pair = gpt2_decoder.pair
    lm = CachedLM(pair.target, pair.vocab_size)
    ids = torch.tensor([[1, 2, 3]])
    logits, states = lm.append(ids)
    assert states is None and logits.shape == (1, pair.vocab_size)
    lm.rollback(0)
    assert lm.length == 3 and lm.cache.get_seq_length() == 3
    _, states = lm.append(torch.tensor([[4]]), hidden=1)
    assert states.shape == (1, 1, pair.target.config.hidden_size)


def test_the_prefill_runs_eagerly_even_where_a_compiled_step_would_fit(gpt2_decoder):
    """The compiled step serves appends after the prefill (`past > 0`, a one-token prefill included); the first
    append of a fresh static cache (whose buffers a graph must not allocate) runs the model eagerly. The step is
    asked whether it fits with the append's own numbers and runs on the LM's cache with the states asked for; a
    step without a static cache is refused; the FLOPs start at 0 and count every append."""
    from sprinter.decode.cache import CachedLM, FlopModel, static_cache, static_cache_supported
    from sprinter.pairs.load import run_with_cache

    if not static_cache_supported():
        pytest.skip("this transformers has no StaticCache whose length can be moved back")
    pair = gpt2_decoder.pair

    class Step:  # a stand-in for CompiledForward that fits every append and records what it is asked and given
        asked: list[tuple] = []
        served: list[tuple] = []

        def fits(self, past, new, capacity):
            self.asked.append((past, new, capacity))
            return True

        def bucket(self, new):
            return new

        def __call__(self, ids, cache, hidden):
            self.served.append((ids.shape[1], cache, hidden))
            return run_with_cache(pair.target, cache, input_ids=ids).logits[0], None

    with pytest.raises(RuntimeError, match="^a compiled step needs a static cache$"):
        CachedLM(pair.target, pair.vocab_size, None, Step())
    cache = static_cache(pair.target, 16)
    lm = CachedLM(pair.target, pair.vocab_size, cache, Step())
    assert lm.flops == 0
    lm.append(torch.tensor([[1]]))
    assert Step.served == [] and lm.length == 1 and lm.flops == FlopModel.of(pair.target).forward(0, 1, 1)
    lm.append(torch.tensor([[4, 5]]), logits=2)
    assert Step.asked == [(1, 2, 16)] and Step.served == [(2, cache, 0)] and lm.length == 3
    assert lm.flops == FlopModel.of(pair.target).forward(0, 1, 1) + FlopModel.of(pair.target).forward(1, 2, 2)


def test_the_flop_model_by_hand(gpt2_decoder):
    """2 x non-embedding parameters per new token, the output projection for each row of logits, and 4 x layers x
    width per attended position (every new token attends the cached ones and the new ones up to itself)."""
    from sprinter.decode.cache import FlopModel

    flops = FlopModel(non_embedding_params=1000, layers=2, width=8, vocab_size=50)
    # past 3, new 2: attended 2 * 3 + (1 + 2) = 9; 2 * 1000 * 2 + 2 * 50 * 8 * 1 + 4 * 2 * 8 * 9
    assert flops.forward(3, 2, 1) == 4000 + 800 + 576 and isinstance(flops.forward(3, 2, 1), int)  # a count
    assert flops.forward(0, 1, 1) == 2000 + 800 + 64  # a first token attends itself
    assert flops.forward(5, 4, 4) == 8000 + 3200 + 64 * (20 + 10)
    model = gpt2_decoder.pair.target
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    of = FlopModel.of(model)
    assert embedding > 0 and of.non_embedding_params == sum(p.numel() for p in model.parameters()) - embedding
    assert (of.layers, of.width, of.vocab_size) == (model.config.num_hidden_layers, model.config.hidden_size,
                                                   model.config.vocab_size)


def test_a_compiled_step_that_pads_to_its_bucket_leaves_the_cache_as_an_eager_append_does(gpt2_decoder):
    """A graph runs a whole bucket of positions: CachedLM forgets the padding at once and returns the real
    positions' logits and states, so the next append continues exactly as after an eager one."""
    from sprinter.decode.cache import CachedLM, last_states, static_cache, static_cache_supported
    from sprinter.pairs.load import run_with_cache

    if not static_cache_supported():
        pytest.skip("this transformers has no StaticCache whose length can be moved back")
    pair = gpt2_decoder.pair

    class PaddingStep:  # a stand-in for CompiledForward with one bucket of 4 positions
        def fits(self, past, new, capacity):
            return new <= 4

        def bucket(self, new):
            return 4

        def __call__(self, ids, cache, hidden):
            padded = torch.cat([ids, ids.new_zeros(1, 4 - ids.shape[1])], 1)
            out = run_with_cache(pair.target, cache, input_ids=padded, output_hidden_states=bool(hidden))
            return out.logits[0], last_states(out.hidden_states, int(hidden), 0)

    padded = CachedLM(pair.target, pair.vocab_size, static_cache(pair.target, 32), PaddingStep())
    eager = CachedLM(pair.target, pair.vocab_size)
    for lm in (padded, eager):
        lm.append(torch.tensor([[1, 2, 3]]))
    (a, sa), (b, sb) = (lm.append(torch.tensor([[4, 5]]), logits=2, hidden=1) for lm in (padded, eager))
    assert a.shape == b.shape == (2, pair.vocab_size) and torch.allclose(a, b, atol=1e-5)
    assert sa.shape == sb.shape == (2, 1, pair.target.config.hidden_size) and torch.allclose(sa, sb, atol=1e-5)
    assert padded.length == eager.length == 5
    (a, _), (b, _) = (lm.append(torch.tensor([[6]])) for lm in (padded, eager))
    assert torch.allclose(a, b, atol=1e-5)  # the padding was forgotten: position 5 follows position 4
    _, states = eager.append(torch.tensor([[7, 8, 9]]), hidden=1)  # states of the logits' positions only
    assert states.shape == (1, 1, pair.target.config.hidden_size)


def test_the_samplers_refusals_name_the_value():
    from sprinter.decode.sampling import Sampler

    for kwargs, message in (({"temperature": float("inf")}, "temperature: got inf"),
                            ({"top_k": -1}, "top_k: got -1; expected an integer >= 0"),
                            ({"top_p": 0.0}, r"top_p: got 0.0; expected a number in \(0, 1\]")):
        with pytest.raises(SprinterError, match=message):
            Sampler(**kwargs)


def test_top_p_drops_a_token_once_the_tokens_above_it_reach_top_p_and_never_at_1():
    """The nucleus keeps a token while the mass ranked above it is below top_p: at exactly top_p it goes; at
    top_p = 1 nothing is dropped, not even a token the float32 cumulative sum has already rounded to 1."""
    from sprinter.decode.sampling import Sampler

    logits = torch.tensor([0.5, 0.25, 0.25]).log()  # mass above each: 0, 0.5, 0.75 (exact in float32)
    assert Sampler(1.0, top_p=0.75).probs(logits).tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    tiny = Sampler(1.0).probs(torch.tensor([0.0, -30.0]))  # [1.0, 9.4e-14]: the mass above the second is 1.0
    assert 0 < tiny[1] < 1e-12
