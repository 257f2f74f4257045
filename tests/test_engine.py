"""The decode engine: transformers compatibility (the cache keyword), the static KV cache, compiled steps.

The eager, dynamic-cache path is the reference: every other way of running the models must give the same
tokens at temperature 0 in float32.
"""

import warnings

import pytest
import torch

from sprinter.bench.benchmark import hf_assisted_runner
from sprinter.pairs.load import cache_keyword, run_with_cache

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
