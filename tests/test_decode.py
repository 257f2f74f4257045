"""Decode invariants on tiny models (CPU, fp32): lossless SD equals AR, SPRINTER's limits, seeds, stats.

The tiny pairs' trained weights repeat one token, which would make equality tests vacuous; each
test pair gets random weights instead (the draft is the target's first block, the target's extra
block is weaker), so the draft and target disagree on some tokens and agree on others.
"""

import pytest
import torch
from conftest import scrambled

from sprinter import Decoder
from sprinter.decode.gates import AlwaysFlag
from sprinter.errors import SprinterError

PROMPTS = ["def foo(x):", "import os\nclass A:", [5, 17, 33, 2, 9]]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_sd_greedy_equals_ar(decoder):
    rejected = 0
    for prompt in PROMPTS:
        ar = decoder.generate(prompt, max_new_tokens=24, mode="ar")
        for k in (1, 3, 6):
            sd = decoder.generate(prompt, max_new_tokens=24, mode="sd", k=k)
            assert sd.token_ids == ar.token_ids, (prompt, k)
            assert sd.text == ar.text
            rejected += sd.stats.rejected
    assert rejected > 0  # the draft really disagreed, so the rollbacks were exercised


def test_sprinter_always_flag_equals_ar_and_never_flag_equals_draft(decoder):
    for prompt in PROMPTS[:2]:
        ar = decoder.generate(prompt, max_new_tokens=24, mode="ar")
        assert decoder.generate(prompt, max_new_tokens=24, mode="sprinter", gate="always").token_ids == ar.token_ids
        strict = decoder.generate(prompt, max_new_tokens=24, mode="sprinter", gate="confidence", strict=True)
        assert strict.token_ids == ar.token_ids  # strict checks every block token: lossless when greedy
        for temperature in (0.0, 0.9):  # the draft draws from the same generator in the same order
            draft = decoder.generate(prompt, max_new_tokens=24, mode="draft", temperature=temperature, seed=3)
            never = decoder.generate(prompt, max_new_tokens=24, mode="sprinter", gate="never", max_block=None,
                                     temperature=temperature, seed=3)
            assert never.token_ids == draft.token_ids
            assert never.stats.target_calls == 0


def test_same_seed_same_output(gpt2_decoder):
    for mode, extra in (("ar", {}), ("sd", {"k": 3}), ("sprinter", {"gate": "confidence", "threshold": 0.05})):
        runs = [gpt2_decoder.generate(PROMPTS[0], max_new_tokens=20, mode=mode, temperature=1.0, top_k=50,
                                      top_p=0.95, seed=seed, **extra).token_ids for seed in (7, 7, 8)]
        assert runs[0] == runs[1]
        assert runs[0] != runs[2]


@pytest.mark.parametrize("mode,extra", [("sd", {"k": 4}), ("sprinter", {"gate": "confidence", "threshold": 0.02}),
                                        ("sprinter", {"gate": "confidence", "threshold": 0.02, "max_block": 3})])
def test_stats_add_up(gpt2_decoder, mode, extra):
    for temperature in (0.0, 1.0):
        s = gpt2_decoder.generate(PROMPTS[1], max_new_tokens=30, mode=mode, temperature=temperature, **extra).stats
        assert s.accepted + s.rejected == s.drafted
        assert s.new_tokens <= s.accepted + s.target_calls
        assert s.mean_acceptance_length == 1 + s.accepted / s.target_calls
        assert s.draft_calls == s.drafted  # one draft forward per drafted token
        assert s.target_flops > 0 and s.draft_flops > 0 and s.wall_seconds > 0
        if mode == "sprinter":
            assert s.verifier_calls == s.drafted
            assert s.flagged <= s.target_calls
            assert s.rejected <= s.flagged  # only flagged tokens are checked
        d = s.to_dict()
        assert d["tokens_per_second"] > 0 and d["mode"] == mode


def test_ar_stats(gpt2_decoder):
    eos = gpt2_decoder.tokenizer.eos_token_id
    out = gpt2_decoder.generate(PROMPTS[0], max_new_tokens=10, mode="ar")
    assert out.stats.target_calls == out.stats.new_tokens == len(out.token_ids)
    assert out.stats.mean_acceptance_length == 1.0
    # Random weights decide whether EOS comes first; either way the reason must match the tokens.
    if out.stop_reason == "eos":
        assert out.token_ids[-1] == eos and eos not in out.token_ids[:-1]
    else:
        assert out.stop_reason == "max_new_tokens" and len(out.token_ids) == 10 and eos not in out.token_ids


def test_eos_stops_draft_and_never_flag_alike(tiny_pair):
    dec = scrambled(tiny_pair)
    free = dec.generate(PROMPTS[0], max_new_tokens=40, mode="draft").token_ids
    eos = free[5]  # make a token the draft emits the EOS token, so the stop is certain
    dec.tokenizer.eos_token = dec.tokenizer.convert_ids_to_tokens(eos)
    draft = dec.generate(PROMPTS[0], max_new_tokens=40, mode="draft")
    assert draft.stop_reason == "eos" and draft.token_ids == free[: free.index(eos) + 1]
    never = dec.generate(PROMPTS[0], max_new_tokens=40, mode="sprinter", gate="never", max_block=None)
    assert never.token_ids == draft.token_ids and never.stop_reason == "eos"


def test_stop_strings_and_streaming(gpt2_decoder):
    full = gpt2_decoder.generate(PROMPTS[1], max_new_tokens=24, mode="ar")
    stop = full.text[len(full.text) // 2:][:3]
    pieces: list[str] = []
    out = gpt2_decoder.generate(PROMPTS[1], max_new_tokens=24, mode="sd", stop=[stop], on_text=pieces.append)
    assert out.stop_reason == "stop_string" and stop in out.text
    assert stop not in gpt2_decoder.tokenizer.decode(out.token_ids[:-1])
    assert "".join(pieces) == out.text
    assert full.token_ids[: len(out.token_ids)] == out.token_ids


def test_learned_gate_limits_via_a_gate_object(gpt2_decoder):
    ar = gpt2_decoder.generate(PROMPTS[0], max_new_tokens=16, mode="ar")
    out = gpt2_decoder.generate(PROMPTS[0], max_new_tokens=16, mode="sprinter", gate=AlwaysFlag())
    assert out.token_ids == ar.token_ids


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [3, 4]]}, "batch"),
    ({"prompt": [1, 10**6]}, "token id"),
    ({"prompt": [1] * 250, "max_new_tokens": 10}, "context window"),
    ({"mode": "fast"}, "mode"),
    ({"mode": "sd", "k": 0}, "k"),
    ({"threshold": 1.5, "gate": "confidence"}, "threshold"),
    ({"threshold": -0.1, "gate": "confidence"}, "threshold"),
    ({"gate": "magic"}, "gate"),
    ({"gate": None}, "train one"),
    ({"mode": "ar", "gate": "confidence"}, "only with a mode of"),
    ({"mode": "sd", "strict": True}, "only with mode='sprinter'"),
    ({"max_block": 0, "gate": "confidence"}, "max_block"),
    ({"temperature": -1.0}, "temperature"),
    ({"stop": "abc"}, "stop"),
])
def test_bad_input_fails_before_any_model_work(gpt2_decoder, kwargs, message):
    def refuse(*args, **kw):
        raise AssertionError("a model ran before the input was checked")

    hooks = [m.register_forward_pre_hook(refuse) for m in (gpt2_decoder.pair.draft, gpt2_decoder.pair.target)]
    try:
        call = {"prompt": PROMPTS[0], "max_new_tokens": 8, "mode": "sprinter", **kwargs}
        with pytest.raises(SprinterError, match=message):
            gpt2_decoder.generate(call.pop("prompt"), **call)
    finally:
        for hook in hooks:
            hook.remove()


def test_cuda_requested_without_cuda(tiny_pair):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SprinterError, match="no CUDA"):
        Decoder.from_pretrained(draft=str(tiny_pair / "draft"), target=str(tiny_pair / "target"), device="cuda")


class RandomGate:
    """A gate whose P(accept) is noise: sd-gated's output must not depend on it."""

    threshold = 0.5
    hidden_layers = 0

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def accept_prob(self, step, position):
        return torch.rand((), generator=self.gen)


def test_sd_gated_equals_ar_for_any_gate(decoder):
    for prompt in PROMPTS:
        ar = decoder.generate(prompt, max_new_tokens=24, mode="ar").token_ids
        for seed, stop in ((0, 0.3), (1, 0.7), (2, 0.95)):
            out = decoder.generate(prompt, max_new_tokens=24, mode="sd-gated", gate=RandomGate(seed),
                                   stop_threshold=stop)
            assert out.token_ids == ar
            s = out.stats
            assert s.accepted + s.rejected == s.drafted and s.verifier_calls == s.drafted
        conf = decoder.generate(prompt, max_new_tokens=24, mode="sd-gated", gate="confidence")
        assert conf.token_ids == ar


def test_sd_gated_limits(gpt2_decoder):
    prompt = PROMPTS[0]
    stops = gpt2_decoder.generate(prompt, max_new_tokens=20, mode="sd-gated", gate="always")
    k1 = gpt2_decoder.generate(prompt, max_new_tokens=20, mode="sd", k=1)
    assert stops.token_ids == k1.token_ids
    assert (stops.stats.drafted, stops.stats.target_calls) == (k1.stats.drafted, k1.stats.target_calls)
    never = gpt2_decoder.generate(prompt, max_new_tokens=30, mode="sd-gated", gate="never", max_block=6)
    k6 = gpt2_decoder.generate(prompt, max_new_tokens=30, mode="sd", k=6)
    assert never.token_ids == k6.token_ids and never.stats.drafted == k6.stats.drafted


def test_sd_gated_refuses_strict():
    with pytest.raises(SprinterError, match="strict"):
        from sprinter.decode.options import DecodeOptions
        DecodeOptions(mode="sd-gated", max_new_tokens=8, stop_threshold=0.5, strict=True)
