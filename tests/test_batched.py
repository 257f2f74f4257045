"""Batched decoding (sprinter.decode.batched): each row equals its prompt decoded alone, whatever the other rows do.

Scrambled random-weight pairs (tests/test_decode.py) so drafts are really rejected; prompts of ragged lengths
(3, 9, 17 tokens) that repeat themselves, so n-gram chains are proposed and sometimes kept.
"""

import pytest
import torch
from conftest import scrambled
from test_decode_distribution import CHI2_DF3_P001, VOCAB, chi_square, random_decoder

from sprinter.decode.batch_cache import BatchCachedLM
from sprinter.decode.decoder import Decoder
from sprinter.decode.roofline import measure_i_knee, speculation_length
from sprinter.errors import SprinterError

PROMPTS = [[5, 17, 33], [40, 41, 42, 43, 40, 41, 42, 44, 40], [7, 8, 9, 10, 11, 12, 7, 8, 9, 10, 11, 12, 7, 8, 9, 3, 7]]
NEW = 24


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder(request, tiny_pair, tiny_llama_pair):
    return scrambled(tiny_pair if request.param == "gpt2" else tiny_llama_pair)


def alone(decoder, prompts, **options):
    return [decoder.generate(p, max_new_tokens=NEW, mode="ar", **options) for p in prompts]


@pytest.mark.parametrize("mode,options", [("ar", {}), ("sd", {"k": 3}), ("ngram", {"ngram_k": 4}),
                                          ("ngram", {"i_knee": 6.0}), ("sd", {"k": 2, "max_batch": 2}),
                                          ("ngram", {"ngram_k": 2, "max_batch": 1})])
def test_each_row_equals_its_prompt_alone(decoder, mode, options):
    reference = alone(decoder, PROMPTS)
    outs = decoder.generate(PROMPTS, max_new_tokens=NEW, mode=mode, **options)
    assert isinstance(outs, list) and len(outs) == len(PROMPTS)
    for out, ref in zip(outs, reference):
        assert out.token_ids == ref.token_ids and out.text == ref.text and out.stop_reason == ref.stop_reason
        s = out.stats
        assert s.accepted + s.rejected == s.drafted and s.new_tokens == len(out.token_ids)
        assert s.new_tokens <= s.accepted + s.target_calls and s.batch_size == len(PROMPTS)
        if mode == "sd":
            # one forward a drafted token, one for the prompt
            assert s.draft_calls == s.drafted + 1 and s.draft_flops > 0
    assert len({o.stats.wall_seconds for o in outs}) == 1  # the batch's time, shared
    if mode != "ar":
        assert sum(o.stats.rejected for o in outs) > 0  # rollbacks were exercised
        assert sum(o.stats.accepted for o in outs) > 0


def test_single_prompt_ngram_keeps_the_single_result_type(decoder):
    ref = alone(decoder, PROMPTS[2:])[0]
    pieces: list[str] = []
    out = decoder.generate(PROMPTS[2], max_new_tokens=NEW, mode="ngram", ngram_k=3, on_text=pieces.append)
    assert out.token_ids == ref.token_ids and out.stats.batch_size == 1
    assert "".join(pieces) == out.text
    assert decoder.generate([PROMPTS[2]], max_new_tokens=NEW, mode="ngram", ngram_k=3)[0].token_ids == ref.token_ids


def test_rows_stop_at_eos_at_different_steps(tiny_llama_pair):
    dec = scrambled(tiny_llama_pair, seed=1)  # its own decoder: the EOS token is changed below
    free = [o.token_ids for o in alone(dec, PROMPTS)]
    # An EOS token that ends two rows at different steps (and not at their first token).
    firsts = [{t: row.index(t) for t in reversed(row)} for row in free]
    eos = next(t for t in sorted(set(free[0]) & set(free[1]) | set(free[1]) & set(free[2]))
               if len({f[t] for f in firsts if t in f}) >= 2 and min(f[t] for f in firsts if t in f) > 0)
    dec.tokenizer.eos_token = dec.tokenizer.convert_ids_to_tokens(eos)
    assert dec.tokenizer.eos_token_id == eos
    reference = alone(dec, PROMPTS)
    assert sum(r.stop_reason == "eos" for r in reference) >= 2
    for mode, options in (("ar", {}), ("sd", {"k": 4}), ("ngram", {"ngram_k": 4}),
                          ("ngram", {"ngram_k": 3, "max_batch": 2})):
        outs = dec.generate(PROMPTS, max_new_tokens=NEW, mode=mode, **options)
        assert [o.token_ids for o in outs] == [r.token_ids for r in reference], (mode, options)
        assert [o.stop_reason for o in outs] == [r.stop_reason for r in reference]
        calls = [o.stats.target_calls for o in outs]
        assert min(calls) < max(calls)  # a finished row stopped costing target calls


def test_stop_strings_per_row(decoder):
    reference = alone(decoder, PROMPTS)
    text = reference[1].text
    stop = text[len(text) // 2:][:2]
    outs = decoder.generate(PROMPTS, max_new_tokens=NEW, mode="ngram", ngram_k=3, stop=[stop])
    for out, ref in zip(outs, alone(decoder, PROMPTS, stop=[stop])):
        assert out.token_ids == ref.token_ids and out.stop_reason == ref.stop_reason
    assert outs[1].stop_reason == "stop_string"


def test_sampling_same_seed_same_output(decoder):
    runs = [[o.token_ids for o in decoder.generate(PROMPTS, max_new_tokens=12, mode=mode, temperature=1.0, seed=seed)]
            for mode in ("sd", "ngram") for seed in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2] and runs[3] == runs[4] != runs[5]


def test_batched_sampling_follows_the_target_distribution():
    """Rows of two ragged prompts decoded together at temperature 1: each prompt's first two tokens are
    distributed as the target's (chi-square, as tests/test_decode_distribution.py)."""
    decoder, target, draft = random_decoder()
    prompts = [[1, 2, 1, 2, 1], [3, 0]]  # the first repeats itself, so n-gram chains are drafted
    exact = []
    with torch.inference_mode():
        for prompt in prompts:
            p1 = target(torch.tensor([prompt])).logits[0, -1].softmax(-1)
            p2 = torch.stack([target(torch.tensor([prompt + [x]])).logits[0, -1].softmax(-1) for x in range(VOCAB)])
            exact.append((p1, p1 @ p2))
    for mode, options in (("sd", {"k": 2}), ("ngram", {"ngram_k": 2})):
        counts = torch.zeros(len(prompts), 2, VOCAB)
        rejected = 0
        for seed in range(100):
            for row, out in enumerate(decoder.generate(prompts * 5, max_new_tokens=2, mode=mode, temperature=1.0,
                                                       seed=seed, **options)):
                counts[row % 2, 0, out.token_ids[0]] += 1
                counts[row % 2, 1, out.token_ids[1]] += 1
                rejected += out.stats.rejected
        assert rejected > 50, mode  # residual sampling was exercised
        for (p1, p2), (first, second) in zip(exact, counts):
            assert chi_square(first, p1) < CHI2_DF3_P001, (mode, first / first.sum(), p1)
            assert chi_square(second, p2) < CHI2_DF3_P001, (mode, second / second.sum(), p2)


def test_compaction_keeps_every_rows_logits(tiny_llama_pair):
    dec = scrambled(tiny_llama_pair)
    model = dec.pair.target
    plain, packed = (BatchCachedLM(model, dec.pair.vocab_size) for _ in range(2))
    for lm in (plain, packed):  # row 0 rejects 3 of its 4 new tokens while row 1 keeps its 4: 3 masked slots
        lm.admit([PROMPTS[1], PROMPTS[0]])
        lm.append([[1, 2, 3, 4], [5, 6, 7, 8]])
        lm.rollback_to([len(PROMPTS[1]) + 1, len(PROMPTS[0]) + 4])
    packed.compact()
    assert (plain.width, packed.width) == (13, 10) and packed.lengths == plain.lengths == [10, 7]
    with torch.inference_mode():
        a, b = plain.append([[9, 9], [8]]), packed.append([[9, 9], [8]])
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1, 0], b[1, 0], atol=1e-4)


def test_recompute_rereads_like_a_forward_without_a_cache(tiny_llama_pair):
    """recompute (the data stage's models): after a rollback the next append is, bit for bit, one cache-less
    forward over every row's whole sequence, left-padded; ragged new tokens come back left-aligned."""
    dec = scrambled(tiny_llama_pair)
    lm = BatchCachedLM(dec.pair.target, dec.pair.vocab_size, recompute=True)
    lm.admit([PROMPTS[1], PROMPTS[0]])
    with torch.inference_mode():
        lm.append([[1, 2, 3, 4], [5, 6, 7, 8]])
        lm.rollback_to([len(PROMPTS[1]) + 1, len(PROMPTS[0]) + 4])
        logits = lm.append([[9, 9], [8]])  # (2, 2, V); row 1's one token is its column 0
        seqs = [PROMPTS[1] + [1, 9, 9], PROMPTS[0] + [5, 6, 7, 8, 8]]
        width = max(map(len, seqs))
        ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
        mask = (torch.arange(width) >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
        out = dec.pair.target(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                              logits_to_keep=2, output_hidden_states=True)
        expected = out.logits[..., : dec.pair.vocab_size]
        assert lm.lengths == [len(s) for s in seqs] and lm.tokens == seqs
        assert torch.equal(logits[0], expected[0]) and torch.equal(logits[1, 0], expected[1, -1])
        lm.rollback_to([len(s) for s in seqs])
        last, hidden = lm.append_last([[], []], hidden=True)  # the re-read alone: each row's last token
    assert torch.allclose(last, expected[:, -1], atol=1e-5)
    # the states of the last layer and the one before it (the data stage's hidden and hidden_prev_layer)
    assert torch.allclose(hidden[:, 0], out.hidden_states[-1][:, -1], atol=1e-5)
    assert torch.allclose(hidden[:, 1], out.hidden_states[-2][:, -1], atol=1e-5)


def test_speculation_length_rule():
    assert speculation_length(206, 1) == 8  # clamped to k_max
    assert speculation_length(206, 32) == 6  # round(6.4)
    assert speculation_length(206, 128) == 2  # round(1.6)
    assert speculation_length(206, 150) == 1  # round(1.37)
    assert speculation_length(206, 207) == 0  # compute-bound already: plain decoding
    assert speculation_length(4.2, 4) == 1 and speculation_length(4.2, 8) == 0
    assert speculation_length(50, 2, k_max=4) == 4
    with pytest.raises(SprinterError, match="i_knee"):
        speculation_length(0, 1)


def test_measured_knee_is_plausible_and_memoised():
    from sprinter.decode.roofline import knee as knee_of

    # 2 TFLOP/s over 100 GB/s with 2-byte weights: 20 FLOPs per byte, 2 bytes per weight, 2 FLOPs per weight-token
    assert knee_of(2e12, 1e11, 2) == pytest.approx(20.0)
    assert knee_of(1e11, 2e10, 4) == pytest.approx(10.0)
    knee = measure_i_knee(torch.device("cpu"), torch.float32)
    # a CPU core's fp32 matmul rate over its copy bandwidth: tokens per forward between 0.1 and 10,000
    assert 0.1 < knee < 1e4, knee
    assert measure_i_knee(torch.device("cpu"), torch.float32) == knee


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "sprinter", "gate": "confidence"}, "mode='sprinter'"),
    ({"mode": "draft"}, "mode='draft'"),
    ({"mode": "sd", "ngram_k": 2}, "only with mode='ngram'"),
    ({"mode": "ar", "i_knee": 10.0}, "only with mode='ngram'"),
    ({"mode": "ngram", "ngram_k": 2, "i_knee": 10.0}, "at most one"),
    ({"mode": "ngram", "ngram_k": -1}, "ngram_k: got -1"),
    ({"mode": "ngram", "ngram_n": 0}, "ngram_n"),
    ({"mode": "ngram", "max_batch": 0}, "max_batch"),
    ({"mode": "ngram", "on_text": print}, "on_text"),
    ({"mode": "ar", "prompt": [[1, 2], [1, 10**6]]}, "token id"),
    ({"mode": "ar", "prompt": [[1] * 250, [1]], "max_new_tokens": 10}, "context window"),
])
def test_bad_batch_requests_fail_before_any_model_work(tiny_pair, kwargs, message):
    dec = Decoder.from_pretrained(draft=str(tiny_pair / "draft"), target=str(tiny_pair / "target"), device="cpu")

    def refuse(*args, **kw):
        raise AssertionError("a model ran before the input was checked")

    for model in (dec.pair.draft, dec.pair.target):
        model.register_forward_pre_hook(refuse)
    call = {"prompt": ["def f(x):", "import os"], "max_new_tokens": 8, **kwargs}
    with pytest.raises(SprinterError, match=message):
        dec.generate(call.pop("prompt"), **call)


def test_batched_stats_count_the_prompt_read(decoder):
    """A batch of one reads the same positions as the single-prompt loop (the prompt included); its prompt
    read is a forward of its own, so it makes one call more to each model."""
    prompt = list(range(40, 70))
    single = decoder.generate(prompt, max_new_tokens=8, mode="sd", k=3).stats
    batched = decoder.generate([prompt], max_new_tokens=8, mode="sd", k=3)[0].stats
    assert (batched.target_tokens, batched.draft_tokens) == (single.target_tokens, single.draft_tokens)
    assert (batched.target_calls, batched.draft_calls) == (single.target_calls + 1, single.draft_calls + 1)
    ar = decoder.generate([prompt, prompt[:5]], max_new_tokens=4, mode="ar")
    assert [o.stats.target_tokens for o in ar] == [len(prompt) + 3, 5 + 3]


def test_a_batch_of_one_in_a_single_prompt_mode_and_a_list_of_scalar_tensors(decoder):
    prompt = [5, 17, 33, 2]
    ar = decoder.generate(prompt, max_new_tokens=6, mode="ar")
    assert decoder.generate([prompt], max_new_tokens=6, mode="draft").token_ids == \
        decoder.generate(prompt, max_new_tokens=6, mode="draft").token_ids  # one result, as before batches
    assert decoder.generate([prompt], max_new_tokens=6, mode="ar")[0].token_ids == ar.token_ids  # a batch mode: a list
    assert decoder.generate(list(torch.tensor(prompt)), max_new_tokens=6, mode="ar").token_ids == ar.token_ids
    with pytest.raises(SprinterError, match="a batch of 2 prompts with mode='draft'"):
        decoder.generate([prompt, prompt], max_new_tokens=6, mode="draft")
