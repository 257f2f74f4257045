"""The decode paths on a CUDA device (marked `cuda`; skipped where there is none). CI has no GPU: these run
in scripts/gpu_run.py's first stage (`pytest -m cuda`) on a machine that has one.

float32 on the GPU keeps the greedy invariants exact (bfloat16 near-ties may flip a token); the bfloat16 test
checks only that every mode runs and counts consistently."""

import pytest
import torch
from conftest import scrambled

from sprinter.decode.decoder import Decoder

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["def parse(self, text):\n    ", "import os\nimport sys\n\n", "class Cache:\n    def __init__(self"]


@pytest.fixture(scope="module")
def scrambled_pair(tiny_pair, tmp_path_factory):
    """The scrambled tiny pair (draft and target disagree on some tokens) saved, so it loads onto the GPU."""
    cpu = scrambled(tiny_pair)
    out = tmp_path_factory.mktemp("scrambled")
    for role, model in (("draft", cpu.pair.draft), ("target", cpu.pair.target)):
        model.save_pretrained(out / role)
        cpu.tokenizer.save_pretrained(out / role)
    return out


def on_cuda(pair_dir, dtype: str) -> Decoder:
    return Decoder.from_pretrained(str(pair_dir / "draft"), str(pair_dir / "target"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("mode, options", [("sd", {"k": 4}), ("ngram", {}), ("async", {"window": 4}),
                                           ("sprinter", {"gate": "always"}), ("sd-gated", {"gate": "confidence"})])
def test_lossless_modes_equal_ar_on_cuda(scrambled_pair, mode, options):
    decoder = on_cuda(scrambled_pair, "float32")
    assert decoder.pair.device.type == "cuda"
    for prompt in PROMPTS:
        ar = decoder.generate(prompt, max_new_tokens=24, mode="ar")
        out = decoder.generate(prompt, max_new_tokens=24, mode=mode, **options)
        assert out.token_ids == ar.token_ids, (mode, prompt)


@pytest.mark.parametrize("mode", ["ar", "sd", "ngram"])
def test_batched_modes_equal_single_ar_on_cuda(scrambled_pair, mode):
    decoder = on_cuda(scrambled_pair, "float32")
    singles = [decoder.generate(p, max_new_tokens=16, mode="ar").token_ids for p in PROMPTS]
    batch = decoder.generate(PROMPTS, max_new_tokens=16, mode=mode)
    assert [o.token_ids for o in batch] == singles


def test_async_draft_on_cpu_target_on_cuda(scrambled_pair):
    decoder = on_cuda(scrambled_pair, "float32")
    ar = decoder.generate(PROMPTS[0], max_new_tokens=16, mode="ar")
    out = decoder.generate(PROMPTS[0], max_new_tokens=16, mode="async", draft_device="cpu")
    assert out.token_ids == ar.token_ids


@pytest.mark.parametrize("mode", ["ar", "draft", "sd", "ngram", "async", "sprinter"])
def test_every_mode_runs_in_bfloat16(scrambled_pair, mode):
    decoder = on_cuda(scrambled_pair, "bfloat16")
    assert decoder.pair.dtype == torch.bfloat16
    options = {"gate": "confidence"} if mode == "sprinter" else {}
    out = decoder.generate(PROMPTS[1], max_new_tokens=16, mode=mode, **options)
    assert out.stats.new_tokens == len(out.token_ids) and 0 < len(out.token_ids) <= 16


def test_compiled_steps_decode_as_the_eager_reference_on_cuda(scrambled_pair):
    """The deployed fast path (static caches, torch.compile with CUDA graphs) against the eager dynamic-cache
    reference on the same GPU: greedy, float32, token for token; sd with k = 2 pads its verify forward to bucket 4."""
    from sprinter.decode.engine import compiler_problem

    if compiler_problem(torch.device("cuda")) is not None:
        pytest.skip(compiler_problem(torch.device("cuda")))
    eager = on_cuda(scrambled_pair, "float32")
    compiled = Decoder.from_pretrained(str(scrambled_pair / "draft"), str(scrambled_pair / "target"), device="cuda",
                                       dtype="float32", compile=True)
    for options in (dict(mode="ar"), dict(mode="sd", k=2), dict(mode="sprinter", gate="confidence", max_block=2)):
        for prompt in PROMPTS[:2]:
            want = eager.generate(prompt, max_new_tokens=16, **options)
            got = compiled.generate(prompt, max_new_tokens=16, **options)
            assert got.token_ids == want.token_ids, (options, prompt)
    assert compiled.engine.compile_seconds > 0


def test_sampling_is_seeded_on_cuda(scrambled_pair):
    decoder = on_cuda(scrambled_pair, "float32")
    a = decoder.generate(PROMPTS[2], max_new_tokens=16, mode="sd", temperature=1.0, seed=3)
    b = decoder.generate(PROMPTS[2], max_new_tokens=16, mode="sd", temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids


def _syncs_while_drafting(decoder: Decoder, **options) -> tuple[int, object]:
    """Host syncs (torch's sync debug mode) inside the drafter's `propose` calls of one generation."""
    import warnings

    from sprinter.decode.drafters import ModelDrafter

    propose, counted = ModelDrafter.propose, []

    def watched(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return propose(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            counted.append(sum("synchroniz" in str(w.message) for w in caught))

    ModelDrafter.propose = watched
    try:
        out = decoder.generate(PROMPTS[0], max_new_tokens=24, **options)
    finally:
        ModelDrafter.propose = propose
    return sum(counted), out


def test_host_syncs_while_drafting_on_cuda(scrambled_pair):
    """sd drafts without waiting for the device (at most the one copy of the emitted tokens per block); a gated
    mode waits once per drafted token, for its pass/flag decision."""
    decoder = on_cuda(scrambled_pair, "float32")
    syncs, out = _syncs_while_drafting(decoder, mode="sd", k=4)
    assert syncs <= out.stats.target_calls, (syncs, out.stats)
    syncs, out = _syncs_while_drafting(decoder, mode="sprinter", gate="confidence")
    assert syncs <= out.stats.target_calls + out.stats.verifier_calls, (syncs, out.stats)
