"""mode="async" on tiny models (CPU, fp32): greedy output equals ar's for any window, including a draft that
is wrong on purpose; the draft's cache after each rollback holds exactly the verified tokens; sampling has
the target's distribution; errors on either side and KeyboardInterrupt reach the caller and leave no
thread behind; early stops shut down quickly.

The scrambled decoders of test_decode.py (random weights, so rejections really happen) and the hand-made
4-token models of test_decode_distribution.py are reused.
"""

import dataclasses
import threading
import time

import pytest
import torch
from conftest import scrambled
from test_decode import PROMPTS
from test_decode_distribution import VOCAB, chi_square, random_decoder

from sprinter.decode.asynchronous import asynchronous
from sprinter.decode.cache import CachedLM
from sprinter.decode.decoder import Decoder, Emitter, GenerateConfig
from sprinter.decode.drafters import ModelDrafter
from sprinter.decode.loops import LoopState
from sprinter.decode.options import DecodeOptions
from sprinter.decode.sampling import Sampler
from sprinter.decode.stats import DecodeStats
from sprinter.errors import SprinterError

WINDOWS = (1, 2, 4, 16)
SHUTDOWN_SECONDS = 5.0
CHI2_DF3_P1E5 = 25.90  # chi-square critical value, 3 degrees of freedom, p = 1e-5 (the run is timing-dependent)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def no_thread_left():
    """The test must leave no thread it started. (Threads that were already there may end meanwhile: a model
    load's thread pool, for one, can still be winding down when the test starts.)"""
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) - before == set()


def test_greedy_equals_ar_for_every_window(decoder, no_thread_left):
    rejected = 0
    for prompt in PROMPTS:
        ar = decoder.generate(prompt, max_new_tokens=24, mode="ar")
        for window in WINDOWS:
            out = decoder.generate(prompt, max_new_tokens=24, mode="async", window=window)
            assert out.token_ids == ar.token_ids, (prompt, window)
            assert out.text == ar.text and out.stop_reason == ar.stop_reason
            s = out.stats
            assert s.accepted + s.rejected == s.drafted and 0 <= s.discarded <= s.rejected
            assert s.draft_busy_seconds > 0 and s.target_busy_seconds > 0 and s.to_dict()["overlap"] is not None
            rejected += s.rejected
    assert rejected > 0


class CheckingDrafter:
    """A draft model that is wrong on purpose on every `every`-th token (it proposes the next token id, with
    a one-hot q on it) and checks its own cache on every call: before a forward the cache holds fewer tokens
    than the sequence, after it exactly the sequence (no duplicated or missing token), and its distribution
    equals a fresh forward over the whole sequence (the cache's content is right too)."""

    def __init__(self, lm: CachedLM, every: int):
        self.inner, self.lm, self.every = ModelDrafter(lm, Sampler()), lm, every
        self.calls = 0
        self.rollbacks: list[tuple[int, int, int]] = []  # (cache length before, asked length, after)

    def propose(self, seqs, limits, gen, *, stop=None):
        (seq,) = seqs
        assert self.lm.length < len(seq) and list(limits) == [1]
        steps = []  # the stop rule sees each drafted token's step (its q_soft: the draft's softmax)
        draft = self.inner.propose(seqs, limits, gen, stop=lambda step, position: steps.append(step) or False)
        assert self.lm.length == len(seq)
        fresh = self.lm.model(torch.tensor([seq])).logits[0, -1, : self.lm.vocab_size].float().softmax(-1)
        torch.testing.assert_close(steps[0].q_soft, fresh, atol=1e-5, rtol=1e-4)
        self.calls += 1
        if self.calls % self.every == 0:
            draft.x = (draft.x + 1) % self.lm.vocab_size
            draft.q = torch.nn.functional.one_hot(draft.x, self.lm.vocab_size).float()  # (1, 1, V)
            draft.host = None
        return draft

    def keep(self, rows, lengths):
        before = self.lm.length
        self.inner.keep(rows, lengths)
        self.rollbacks.append((before, lengths[0], self.lm.length))


def run_loop(decoder: Decoder, prompt, drafter_of, window: int, max_new_tokens: int = 24, stop=()):
    """sprinter.decode.asynchronous.asynchronous on the decoder's models with a drafter made by `drafter_of(lm)`."""
    ids = decoder._prompt_ids(prompt)
    target = CachedLM(decoder.pair.target, decoder.pair.vocab_size)
    drafter = drafter_of(CachedLM(decoder.pair.draft, decoder.pair.vocab_size))
    out = Emitter(decoder.tokenizer, max_new_tokens, decoder.tokenizer.eos_token_id, stop, None)
    stats = DecodeStats(mode="async")
    with torch.inference_mode():
        options = DecodeOptions(mode="async", window=window)
        state = LoopState(options.sampler, torch.Generator().manual_seed(0), out, stats)
        asynchronous(target, drafter, torch.tensor([ids]), options=options, state=state,
                     draft_device=torch.device("cpu"))
    return out, stats, drafter


def test_forced_rollbacks_keep_output_and_cache_exact(decoder, no_thread_left):
    rolled = 0
    for prompt in PROMPTS:
        ar = decoder.generate(prompt, max_new_tokens=24, mode="ar").token_ids
        for window in WINDOWS:
            out, stats, drafter = run_loop(decoder, prompt, lambda lm: CheckingDrafter(lm, every=3), window)
            assert out.ids == ar, (prompt, window)
            assert stats.rejected >= drafter.calls // 3 - 1  # every corrupted token was rejected or discarded
            # After a rollback the cache holds exactly the verified tokens but the target's own (read next).
            assert all(after == min(before, length) for before, length, after in drafter.rollbacks)
            rolled += sum(before > length for before, length, _ in drafter.rollbacks)
    assert rolled > 0  # the run-ahead really was cut (window >= 2; with window 1 the cache never holds it)


def test_sampling_has_the_target_distribution(no_thread_left):
    """First, second and third tokens at temperature 1 against their exact marginals under the target.
    window=1 is deterministic; window=3 lets the target take 1-3 entries and the draft run ahead of a bonus
    token (its run-ahead kept when the bonus equals its own token)."""
    decoder, target, draft = random_decoder()
    prompt = [1, 2]
    with torch.inference_mode():
        def p_next(prefixes):  # (N, V): the target's next-token distribution after each prefix
            return target(torch.tensor(prefixes)).logits[:, -1].softmax(-1)

        p1 = p_next([prompt])[0]
        p12 = p1[:, None] * p_next([prompt + [a] for a in range(VOCAB)])  # (V, V) joint of tokens 1, 2
        pairs = [(a, b) for a in range(VOCAB) for b in range(VOCAB)]
        p3_given = p_next([prompt + [a, b] for a, b in pairs]).view(VOCAB, VOCAB, VOCAB)
        p3 = (p12[:, :, None] * p3_given).sum((0, 1))
        q1 = draft(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    marginals = (p1, p12.sum(0), p3)
    n = 400
    for window in (1, 3):
        counts = torch.zeros(3, VOCAB)
        rejected = 0
        for seed in range(n):
            out = decoder.generate(prompt, max_new_tokens=3, mode="async", window=window, temperature=1.0, seed=seed)
            for i, token in enumerate(out.token_ids):
                counts[i, token] += 1
            rejected += out.stats.rejected
        assert rejected > n // 10
        for i, p in enumerate(marginals):
            assert chi_square(counts[i], p) < CHI2_DF3_P1E5, (window, i, counts[i] / n, p)
        assert chi_square(counts[0], q1) > CHI2_DF3_P1E5  # the draft's own distribution is told apart


def test_window_one_is_seed_deterministic_when_sampling(gpt2_decoder):
    runs = [gpt2_decoder.generate(PROMPTS[0], max_new_tokens=16, mode="async", window=1, temperature=1.0,
                                  seed=seed).token_ids for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


class Boom(Exception):
    pass


def fail_on_call(n: int):
    calls = []

    def boom_hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Boom(f"injected on forward {n}")

    return boom_hook


@pytest.mark.parametrize("side", ["draft", "target"])
def test_an_error_on_either_side_reaches_the_caller(gpt2_decoder, side, no_thread_left):
    model = getattr(gpt2_decoder.pair, side)
    handle = model.register_forward_pre_hook(fail_on_call(4), with_kwargs=True)
    try:
        start = time.perf_counter()
        with pytest.raises(Boom, match="injected on forward 4") as info:
            gpt2_decoder.generate(PROMPTS[1], max_new_tokens=24, mode="async", window=4)
        assert time.perf_counter() - start < SHUTDOWN_SECONDS
    finally:
        handle.remove()
    assert any(entry.name == "boom_hook" for entry in info.traceback)  # the original traceback is kept
    # The decoder still works afterwards.
    assert gpt2_decoder.generate(PROMPTS[1], max_new_tokens=8, mode="async").token_ids == \
        gpt2_decoder.generate(PROMPTS[1], max_new_tokens=8, mode="ar").token_ids


def test_keyboard_interrupt_in_the_caller_stops_the_draft(gpt2_decoder, no_thread_left):
    def interrupt(text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gpt2_decoder.generate(PROMPTS[0], max_new_tokens=40, mode="async", window=16, on_text=interrupt)


def test_early_stops_shut_down_quickly(tiny_pair, no_thread_left):
    dec = scrambled(tiny_pair)
    full = dec.generate(PROMPTS[1], max_new_tokens=40, mode="ar")
    stop = full.text[len(full.text) // 3:][:3]
    eos = full.token_ids[6]
    for kwargs, reason in (({"max_new_tokens": 1}, "max_new_tokens"),
                           ({"max_new_tokens": 40, "stop": [stop]}, "stop_string"),
                           ({"max_new_tokens": 40}, "eos")):
        if reason == "eos":  # a token ar emits becomes EOS, so the stop is certain
            dec.tokenizer.eos_token = dec.tokenizer.convert_ids_to_tokens(eos)
        ar = dec.generate(PROMPTS[1], mode="ar", **kwargs)
        start = time.perf_counter()
        out = dec.generate(PROMPTS[1], mode="async", window=16, **kwargs)
        assert time.perf_counter() - start < SHUTDOWN_SECONDS
        assert out.stop_reason == ar.stop_reason == reason and out.token_ids == ar.token_ids


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "sd", "window": 2}, "only with mode='async'"),
    ({"mode": "ar", "draft_device": "cpu"}, "only with mode='async'"),
    ({"mode": "async", "window": 0}, "window"),
    ({"mode": "async", "window": True}, "window"),
    ({"mode": "async", "draft_device": "tpu"}, "device"),
    ({"mode": "async", "target_device": "cuda:7"}, "device"),
])
def test_bad_async_options_fail_before_any_model_work(gpt2_decoder, kwargs, message):
    def refuse(*args, **kw):
        raise AssertionError("a model ran before the input was checked")

    hooks = [m.register_forward_pre_hook(refuse) for m in (gpt2_decoder.pair.draft, gpt2_decoder.pair.target)]
    try:
        with pytest.raises(SprinterError, match=message):
            gpt2_decoder.generate(PROMPTS[0], max_new_tokens=8, **kwargs)
        with pytest.raises(SprinterError, match=message):
            GenerateConfig(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()


def test_the_draft_stays_in_place_on_the_decoders_device(gpt2_decoder):
    assert gpt2_decoder.model_on("draft", torch.device("cpu")) is gpt2_decoder.pair.draft
    assert gpt2_decoder.model_on("target", torch.device("cpu:0")) is gpt2_decoder.pair.target
    assert not gpt2_decoder.copies


def test_benchmark_rows(gpt2_decoder):
    from sprinter.bench.benchmark import BenchConfig
    from sprinter.bench.methods import build_methods

    rows = build_methods(BenchConfig(methods=("ar", "async"), windows=(4, 1), workload="greedy"), gpt2_decoder, {})
    assert [m.name for m in rows] == ["ar", "async-w1", "async-w4"] and all(m.lossless for m in rows)
    reference, _ = rows[0].run(PROMPTS[2], 0, 12)
    tokens, stats = rows[2].run(PROMPTS[2], 0, 12)
    assert tokens == reference and stats["overlap"] is not None and stats["mode"] == "async"


def test_bench_async_script(tiny_pair, tmp_path):
    import json

    from sprinter.bench.asynchronous import AsyncBenchConfig, run
    from sprinter.config import parse_config

    cfg = parse_config(AsyncBenchConfig, ["--pairs", str(tiny_pair), "--num-prompts", "2", "--prompt-len", "16",
                                          "--max-new-tokens", "8", "--ks", "2", "--windows", "2", "--sd-threads", "1",
                                          "--warmup", "0", "--no-progress", "--out", str(tmp_path)], "test")
    (results,) = run(cfg)
    on_disk = json.loads((tmp_path / tiny_pair.name / "results.json").read_text())
    assert on_disk["methods"] == results["methods"]
    assert [m["name"] for m in results["methods"]] == ["ar", "sd-k2-t1", "async-w2"]
    assert results["methods"][2]["overlap"] is not None and results["hardware"]["cpu"]
    assert "| async-w2 | 1 |" in (tmp_path / tiny_pair.name / "results.md").read_text()
    with pytest.raises(SprinterError, match="sd_threads"):
        AsyncBenchConfig(sd_threads=(0,))
    # Killed mid-append on the last prompt: --resume drops the torn line and reruns that prompt only.
    records = tmp_path / tiny_pair.name / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    (again,) = run(dataclasses.replace(cfg, resume=True))
    assert [m["prompts"] for m in again["methods"]] == [2, 2, 2]
    assert [json.loads(line)["prompt"] for line in records.read_text().splitlines()] == [0, 0, 0, 1, 1, 1]
