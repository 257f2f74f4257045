"""The decode engine: transformers compatibility (the cache keyword), the static KV cache, compiled steps.

The eager, dynamic-cache path is the reference: every other way of running the models must give the same
tokens at temperature 0 in float32.
"""

import os
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from sprinter import Decoder
from sprinter.bench.methods import hf_assisted_runner
from sprinter.decode.cache import CachedLM, static_cache, static_capacity
from sprinter.decode.engine import Engine, compiler_problem
from sprinter.decode.gates import LearnedGate
from sprinter.pairs.load import cache_keyword, run_with_cache
from sprinter.verifier import Verifier, VerifierInfo, default_arch

pytestmark = pytest.mark.usefixtures("single_thread")

# One call per decode path: each single-prompt mode, the batched loop, and Hugging Face's assisted generation.
CALLS = [dict(mode="ar"), dict(mode="draft"), dict(mode="sd", k=3), dict(mode="sprinter", gate="confidence"),
         dict(mode="sd-gated", gate="confidence"), dict(mode="ngram"), dict(mode="async")]


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_no_mode_makes_transformers_warn_of_a_deprecation(decoder):
    """transformers 5.24 warns that `past_key_values=` goes in 5.40; every model call names the cache keyword
    through `run_with_cache`, which picks the one this release takes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for options in CALLS:
            decoder.generate("def foo(x):", max_new_tokens=6, **options)
        decoder.generate(["def foo(x):", "import os"], max_new_tokens=6, mode="sd", k=2)
        hf_assisted_runner(decoder, 0.0)([5, 17, 33], 0, 6)
    assert _deprecations(caught) == []


def test_the_cache_keyword_is_read_from_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return cache

    assert cache_keyword(Old) == "past_key_values" and cache_keyword(New) == "cache"
    assert run_with_cache(Old(), "c", input_ids=None) == "c" and run_with_cache(New(), "c", input_ids=None) == "c"


# Every single-prompt mode; each must equal its eager, dynamic-cache self token for token (and the lossless
# ones equal ar). Sprinter with a confidence gate is lossy, so it is compared with itself.
SINGLE = [dict(mode="ar"), dict(mode="draft"), dict(mode="sd", k=3), dict(mode="sprinter", gate="always"),
          dict(mode="sprinter", gate="confidence"), dict(mode="sprinter", gate="confidence", strict=True),
          dict(mode="sd-gated", gate="confidence"), dict(mode="async")]
LOSSLESS = ("ar", "sd", "sd-gated", "async")


def _same_tokens_as_the_reference(decoder, other: Decoder, prompts, max_new_tokens: int) -> int:
    """Asserts `other` decodes as `decoder` (eager, dynamic cache) in every mode; returns the tokens rejected."""
    rejected = 0
    for prompt in prompts:
        ar = decoder.generate(prompt, max_new_tokens=max_new_tokens, mode="ar").token_ids
        for options in SINGLE:
            want = decoder.generate(prompt, max_new_tokens=max_new_tokens, **options)
            got = other.generate(prompt, max_new_tokens=max_new_tokens, **options)
            assert got.token_ids == want.token_ids, (prompt, options)
            if options["mode"] in LOSSLESS or options.get("gate") == "always" or options.get("strict"):
                assert got.token_ids == ar, (prompt, options)
            rejected += got.stats.rejected
    return rejected


def test_the_static_cache_decodes_every_mode_as_the_dynamic_one(decoder):
    static = Decoder(decoder.pair, engine=Engine(decoder.pair.device, static=True))
    rejected = _same_tokens_as_the_reference(decoder, static, ["def foo(x):"], 32)
    assert rejected > 0  # rollbacks happened: the static cache moved its length back and overwrote stale keys
    # one cache per model, reused across generations (a longer request grows it)
    assert len(static.engine.caches) == 2
    static.generate("def foo(x):", max_new_tokens=100, mode="sd")
    assert min(static_capacity(c) for c in static.engine.caches.values()) >= 100


def test_a_static_rollback_only_moves_the_length(gpt2_decoder):
    model = gpt2_decoder.pair.target
    lm = CachedLM(model, gpt2_decoder.pair.vocab_size, static_cache(model, 64))
    ids = torch.tensor([[5, 17, 33, 2, 9, 11]])
    lm.append(ids[:, :4])
    keys = lm.cache.layers[0].keys
    lm.append(torch.tensor([[7, 8]]))  # a rejected block
    lm.rollback(2)
    assert lm.length == 4 and int(lm.cache.get_seq_length()) == 4 and lm.cache.layers[0].keys is keys
    logits, _ = lm.append(ids[:, 4:], logits=2)  # overwrites the forgotten slots
    want, _ = CachedLM(model, gpt2_decoder.pair.vocab_size).append(ids, logits=2)
    torch.testing.assert_close(logits, want)


@pytest.mark.slow
def test_compiled_steps_decode_as_the_eager_reference_in_ci():
    """The compiled fast path on every CI run: the 4-token one-layer pair of test_decode_distribution (the smallest
    graphs there are), greedy ar and sd with k = 2, whose 3-token verify forward is padded to bucket 4 (the padding
    must be forgotten and its logits never read). About four graphs, dynamic=False, compiled once per session
    (inductor keeps compiled artifacts in its cache folder, so a rerun on the same machine is faster)."""
    from test_invariants import far_decoder

    if compiler_problem(torch.device("cpu")) is not None:
        pytest.skip(compiler_problem(torch.device("cpu")))
    eager = far_decoder()
    compiled = Decoder(eager.pair, engine=Engine(eager.pair.device, compile=True))
    prompt = [1, 2, 3, 0, 1]
    rejected = 0
    # sprinter with the confidence gate runs the fused draft step (the draft's forward, q and the gate in one graph,
    # CachedLM.append_fused): the same tokens as the eager loop, where the gate runs apart
    for options in (dict(mode="ar"), dict(mode="sd", k=2), dict(mode="sprinter", gate="confidence")):
        want = eager.generate(prompt, max_new_tokens=10, **options)
        got = compiled.generate(prompt, max_new_tokens=10, **options)
        assert got.token_ids == want.token_ids, options
        assert (got.stats.draft_flops, got.stats.target_flops) == (want.stats.draft_flops, want.stats.target_flops)
        rejected += got.stats.rejected
    assert rejected > 0  # the draft disagreed: rollbacks of the static caches ran between compiled steps
    assert compiled.engine.compile_seconds > 0 and set(compiled.engine.steps) == {id(eager.pair.target),
                                                                                 id(eager.pair.draft)}
    assert len(compiled.engine.fused_steps) == 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPRINTER_TEST_COMPILE") != "1",
                    reason="compiles graphs (minutes on a busy 2-core CPU): set SPRINTER_TEST_COMPILE=1")
@pytest.mark.parametrize("arch", ["gpt2_decoder", "llama_decoder"])
def test_compiled_steps_decode_as_the_eager_reference(request, arch):
    """Few, short modes: each graph costs seconds to compile on a CPU. They use buckets 1 and 2 only (the draft
    reads 1-2 tokens a step, the target 2 with k = 1), so each model compiles two graphs."""
    if compiler_problem(torch.device("cpu")) is not None:
        pytest.skip(compiler_problem(torch.device("cpu")))
    decoder = request.getfixturevalue(arch)
    torch.manual_seed(0)
    info = VerifierInfo(features=("hidden", "token_id", "draft_prob", "draft_entropy", "position"),
                        hidden_size=decoder.pair.draft.config.hidden_size,
                        arch=default_arch(width=16, token_dim=4, vocab_size=decoder.pair.vocab_size))
    learned = LearnedGate(Verifier(info).eval(), info.features, threshold=0.5)
    eager = Decoder(decoder.pair, gate=learned)
    compiled = Decoder(decoder.pair, gate=learned, engine=Engine(decoder.pair.device, compile=True))
    prompt = "def foo(x):"
    ar = decoder.generate(prompt, max_new_tokens=16, mode="ar").token_ids
    counters.clear()
    # the gated rows run the fused draft step (forward, q, the gate in one graph) and must decide as the eager gate
    for options in (dict(mode="ar"), dict(mode="sd", k=1), dict(mode="sprinter", gate="always", max_block=1),
                    dict(mode="draft"), dict(mode="sprinter", max_block=2),
                    dict(mode="sd-gated", gate="confidence", stop_threshold=0.5, max_block=2)):
        want = eager.generate(prompt, max_new_tokens=16, **options)
        got = compiled.generate(prompt, max_new_tokens=16, **options)
        assert got.token_ids == want.token_ids, options
        assert (got.stats.flagged, got.stats.verifier_calls) == (want.stats.flagged, want.stats.verifier_calls)
        if options["mode"] not in ("draft", "sprinter") or options.get("gate") == "always":
            assert got.token_ids == ar, options
    assert 0 < compiled.engine.compile_seconds and set(compiled.engine.steps) == {id(decoder.pair.target),
                                                                                  id(decoder.pair.draft)}
    assert len(compiled.engine.fused_steps) == 3  # the always, learned and confidence gates' draft steps
    assert not counters["graph_break"], dict(counters["graph_break"])  # each step is one graph, the gate inside
    again = compiled.generate(prompt, max_new_tokens=16, mode="sprinter", max_block=2, threshold=0.3)
    assert again.stats.compile_seconds == 0  # paid once per Decoder; a new threshold reuses the fused graph


def test_engine_bench_sections_split_a_generation(gpt2_decoder):
    """scripts/bench_engine.py's timers: the draft's, the target's and the gate's calls, restored afterwards."""
    from sprinter.bench.engine import EngineBenchConfig, Sections
    from sprinter.errors import SprinterError

    append = CachedLM.append
    sections = Sections(gpt2_decoder.pair.target, gpt2_decoder.pair.device)
    with sections.watching():
        out = gpt2_decoder.generate("def f(x):", max_new_tokens=8, mode="sprinter", gate="confidence")
    assert CachedLM.append is append
    assert all(sections.seconds[name] > 0 for name in ("draft", "target", "gate"))
    assert sum(sections.seconds.values()) <= out.stats.wall_seconds
    with pytest.raises(SprinterError, match="modes: got"):
        EngineBenchConfig(modes=["turbo"])
