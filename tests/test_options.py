"""DecodeOptions is the one home of a generation's defaults and checks; every loop takes its drafts through
one Drafter interface (a draft model or n-gram chains)."""

import dataclasses

import pytest
import torch
from test_decode import PROMPTS

from sprinter import DecodeOptions
from sprinter.decode.cache import CachedLM
from sprinter.decode.decoder import GenerateConfig, speculative
from sprinter.decode.emit import Emitter
from sprinter.decode.loops import LoopState
from sprinter.decode.ngram import NgramDrafter
from sprinter.decode.sampling import Sampler
from sprinter.decode.stats import DecodeStats
from sprinter.errors import SprinterError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_cli_config_inherits_every_default():
    cli, lib = GenerateConfig(), DecodeOptions()
    for f in dataclasses.fields(DecodeOptions):
        assert getattr(cli, f.name) == getattr(lib, f.name), f.name
    assert cli.options() == lib and type(cli.options()) is DecodeOptions


def test_stop_threshold_is_its_own_option():
    assert DecodeOptions(mode="sd-gated", stop_threshold=0.3).stop_threshold == 0.3
    with pytest.raises(SprinterError, match="threshold: got 0.3 with mode='sd-gated'"):  # the gate's, not the stop's
        DecodeOptions(mode="sd-gated", threshold=0.3)
    with pytest.raises(SprinterError, match="stop_threshold: got 0.5 with mode='sprinter'"):
        DecodeOptions(mode="sprinter", stop_threshold=0.5)
    with pytest.raises(SprinterError, match="stop_threshold: got 1.5"):
        DecodeOptions(mode="sd-gated", stop_threshold=1.5)
    assert GenerateConfig(mode="sd-gated", gate="confidence", stop_threshold=0.7).options().stop_threshold == 0.7


def test_options_are_frozen_and_replace_checks_again():
    opts = DecodeOptions(mode="sd", k=3, stop=["\n\n"])
    assert opts.stop == ("\n\n",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.k = 5
    assert opts.replace(k=5).k == 5
    with pytest.raises(SprinterError, match="k: got 0"):
        opts.replace(k=0)
    with pytest.raises(SprinterError, match=r"unknown option\(s\) \['kk'\]"):
        opts.replace(kk=5)


def test_generate_takes_an_options_object_and_keyword_overrides(gpt2_decoder):
    opts = DecodeOptions(mode="sd-gated", gate="confidence", max_new_tokens=12)
    by_object = gpt2_decoder.generate(PROMPTS[0], opts, stop_threshold=0.7)
    by_keywords = gpt2_decoder.generate(PROMPTS[0], mode="sd-gated", gate="confidence", max_new_tokens=12,
                                        stop_threshold=0.7)
    assert by_object.token_ids == by_keywords.token_ids
    assert dataclasses.asdict(by_object.stats) | {"wall_seconds": 0} == \
        dataclasses.asdict(by_keywords.stats) | {"wall_seconds": 0}
    with pytest.raises(SprinterError, match="unknown option"):
        gpt2_decoder.generate(PROMPTS[0], opts, max_tokens=4)
    with pytest.raises(SprinterError, match="expected a DecodeOptions"):
        gpt2_decoder.generate(PROMPTS[0], 12)


def test_ngram_chains_drive_the_single_prompt_loop_losslessly(decoder):
    """The single-prompt loop takes any Drafter: n-gram chains (no draft model) give ar's tokens."""
    for prompt in PROMPTS:
        ar = decoder.generate(prompt, max_new_tokens=24, mode="ar")
        ids = decoder._prompt_ids(prompt)
        out = Emitter(decoder.tokenizer, 24, decoder.tokenizer.eos_token_id, (), None)
        stats = DecodeStats(mode="sd")
        with torch.inference_mode():
            speculative(CachedLM(decoder.pair.target, decoder.pair.vocab_size), NgramDrafter(2), ids,
                        options=DecodeOptions(mode="sd", k=3), gate=None,
                        state=LoopState(Sampler(), torch.Generator(), out, stats))
        assert out.ids == ar.token_ids
        assert stats.accepted + stats.rejected == stats.drafted
