"""The benchmark's issue-24 figures on hand-made inputs: loop shares, speedup intervals and ties, the sampled
runs' distribution check, the grounded workload's function cuts, and the compare row's pricing."""

import random

import pytest

from sprinter.bench.compare import loop_share
from sprinter.bench.degeneracy import degeneracy, periodic_tail, pooled, repeat_shares
from sprinter.bench.distribution import distribution_check, nll_p_value, token_distance, tokens_p_value
from sprinter.bench.latency import predictions
from sprinter.bench.spread import bootstrap_interval, mark_ties, overlaps
from sprinter.bench.workloads import WORKLOADS, resolve, split_functions
from sprinter.decode.costs import CostProfile
from sprinter.decode.latency import AcceptanceStats, sprinter_ms
from sprinter.errors import SprinterError


# ------------------------------------------------------------------------------------------- degeneracy
def test_repeats_split_by_where_the_4gram_was_seen():
    # output 1 2 3 4 1 2 3 4: the last 4-gram ending at 4 repeats the output's first; tokens 5-7 complete
    # 4-grams 2 3 4 1 / 3 4 1 2 / 4 1 2 3 (new) and 1 2 3 4 (seen in the output): 1 of 8
    assert repeat_shares([], [1, 2, 3, 4, 1, 2, 3, 4]) == (0.0, 1 / 8)
    # the prompt holds 9 8 7 6 5: an output copying it completes 4-grams seen in the prompt only
    assert repeat_shares([9, 8, 7, 6, 5], [9, 8, 7, 6, 5]) == (2 / 5, 0.0)  # 9 8 7 6 and 8 7 6 5
    # grams straddling the prompt's end count: prompt 1 2 3, output 4 | 1 2 3 4 -> the last one seen in the output
    assert repeat_shares([1, 2, 3], [4, 1, 2, 3, 4]) == (0.0, 1 / 5)
    prompt_only, output = repeat_shares([1, 2, 3, 4], [1, 2, 3, 4])
    assert (prompt_only, output) == (1 / 4, 0.0)  # only 1 2 3 4 (ending at the last token) was in the prompt
    assert repeat_shares([1, 2], []) == (0.0, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_with_no_prompt_the_output_share_is_loop_share(seed):
    rng = random.Random(seed)
    out = [rng.randrange(4) for _ in range(60)]
    assert repeat_shares([], out)[1] == pytest.approx(loop_share(out))


def test_periodic_tail():
    assert periodic_tail([7] * 40) == 40
    assert periodic_tail([1, 2] * 20) == 40
    assert periodic_tail(list(range(10)) + [1, 2, 3] * 11) == 33  # 3 x 11 tokens of period 3
    assert periodic_tail([1, 2] * 15) == 0  # 30 tokens: shorter than the 32 a tail needs
    assert periodic_tail(list(range(9)) * 5) == 0  # period 9: longer than 8
    assert periodic_tail([9, 9, 9, 0] + [1, 2, 3, 4, 5, 6, 7, 8] * 5) == 40  # period 8
    assert periodic_tail(list(range(40))) == 0 and periodic_tail([]) == 0


def test_degeneracy_pools_over_tokens():
    loop, fresh = [3] * 40, list(range(100, 140))
    assert degeneracy([], loop) == {"repeat_prompt": 0.0, "repeat_output": 36 / 40, "periodic_tail": 1.0}
    assert degeneracy([], fresh) == {"repeat_prompt": 0.0, "repeat_output": 0.0, "periodic_tail": 0.0}
    both = pooled([([], loop), ([], fresh)])
    assert both == {"repeat_prompt": 0.0, "repeat_output": 36 / 80, "periodic_tail": 0.5}
    assert pooled([]) == {"repeat_prompt": None, "repeat_output": None, "periodic_tail": None}


# ------------------------------------------------------------------------------------------- spreads
def test_bootstrap_interval_holds_the_median_and_narrows_with_agreement():
    assert bootstrap_interval([]) is None and bootstrap_interval([1.5]) == (1.5, 1.5)
    assert bootstrap_interval([2.0] * 9) == (2.0, 2.0)
    rng = random.Random(0)
    wide = [1 + rng.random() for _ in range(30)]
    lo, hi = bootstrap_interval(wide)
    assert lo <= sorted(wide)[15] <= hi and hi - lo < 0.6
    assert bootstrap_interval(wide) == (lo, hi)  # a fixed seed: the same records give the same interval


def test_ties_are_overlapping_intervals_within_a_class():
    assert overlaps((1, 2), (1.5, 3)) and not overlaps((1, 1.4), (1.5, 3)) and not overlaps(None, (1, 2))
    entries = [{"name": "ar", "lossless": True, "speedup_vs_ar": 1.0, "speedup_interval": (1.0, 1.0)},
               {"name": "auto", "lossless": True, "speedup_vs_ar": 1.9, "speedup_interval": (1.8, 2.0)},
               {"name": "ngram-8", "lossless": True, "speedup_vs_ar": 1.85, "speedup_interval": (1.7, 1.95)},
               {"name": "sd-k4", "lossless": True, "speedup_vs_ar": 1.5, "speedup_interval": (1.45, 1.55)},
               {"name": "draft", "lossless": False, "speedup_vs_ar": 6.0, "speedup_interval": (5.0, 7.0)},
               {"name": "sprinter", "lossless": False, "speedup_vs_ar": 2.0, "speedup_interval": (1.9, 2.1)}]
    mark_ties(entries)
    got = {e["name"]: (e["tie"], e["ties_with"]) for e in entries}
    assert got == {"ar": (False, None), "auto": (False, None), "ngram-8": (True, "auto"),
                   "sd-k4": (False, "auto"), "draft": (False, None), "sprinter": (False, "draft")}


# ------------------------------------------------------------------------------------------- distribution check
def test_swap_test_is_exact_for_few_pairs():
    assert nll_p_value([(1.0, 1.0)] * 4) == 1.0
    apart = [(0.0, 1.0)] * 5  # every swap but the identity and its mirror lowers the gap: p = 2 / 32
    assert nll_p_value(apart) == pytest.approx(2 / 32)
    assert tokens_p_value([([1, 1], [2, 2])] * 5) == pytest.approx(2 / 32)
    assert tokens_p_value([([1, 2], [2, 1])] * 5) == 1.0
    assert token_distance([[1, 1]], [[2, 2]]) == 1.0 and token_distance([[1, 2]], [[2, 1]]) == 0.0


def _record(tokens, nll):
    return {"tokens": tokens, "fidelity": {"nll_sum": nll * len(tokens), "tokens": len(tokens)}}


def test_a_row_sampling_another_distribution_fails_and_one_sampling_the_same_passes():
    rng = random.Random(1)
    rows = {"same": [], "other": []}
    for _ in range(20):
        ar = _record([rng.randrange(6) for _ in range(30)], 3.0 + rng.gauss(0, 0.2))
        rows["same"].append((ar, _record([rng.randrange(6) for _ in range(30)], 3.0 + rng.gauss(0, 0.2))))
        rows["other"].append((ar, _record([rng.randrange(3) for _ in range(30)], 2.0 + rng.gauss(0, 0.2))))
    check = distribution_check(rows, alpha=0.001)
    assert check["same"]["passed"] and not check["other"]["passed"]
    assert check["other"]["threshold"] == pytest.approx(0.001 / 4)  # Bonferroni: 2 rows x 2 tests
    assert check["other"]["p_nll"] < 0.001 and check["other"]["p_tokens"] < 0.001


# ------------------------------------------------------------------------------------------- workloads
def test_workloads_and_function_cuts():
    assert resolve("sampled").temperature == 0.8 and resolve("sampled").top_p == 0.95
    assert resolve("greedy").temperature == 0.0 and WORKLOADS["grounded"].prompts == "functions"
    with pytest.raises(SprinterError, match="workload: got 'chat'"):
        resolve("chat")
    text = "import os\n\n\ndef f(a, b):\n    x = a + b\n    y = x * 2\n    z = y - a\n    w = z + b\n    return w\n"
    ((name, start, middle, end),) = split_functions(text)
    assert name == "f" and text[start:].startswith("def f") and end == len(text)
    assert text[start:middle] == "def f(a, b):\n    x = a + b\n    y = x * 2\n"  # 6 lines: the first 3
    assert split_functions("def broken(:\n") == [] and split_functions("def g():\n    return 1\n") == []


# ------------------------------------------------------------------------------------------- predictions
def test_the_compare_row_is_priced_with_the_compare_verifiers_rates():
    p = CostProfile(pair="t", device="cpu", dtype="float32", threads=1, context=8, draft_step_ms=0.1,
                    draft_hidden_step_ms=0.1, target_ms=tuple(1 + 0.1 * n for n in range(8)),
                    gate_ms={"learned": 0.02, "confidence": 0.02}, round_ms=0.0)
    sd = {"new_tokens": 10, "target_calls": 5, "target_tokens": 20, "reached_by_position": [20],
          "accepted_by_position": [10]}
    learned = {"new_tokens": 10, "target_calls": 4, "target_tokens": 16, "draft_calls": 10, "verifier_calls": 10}
    runs = {"sd-k2": [sd], "sprinter-mlp@0.05": [learned], "sprinter-mlp-compare@0.05": [learned]}
    rows = {"sd-k2": ("sd", 2), "sprinter-mlp@0.05": ("sprinter-mlp", 0.05),
            "sprinter-mlp-compare@0.05": ("sprinter-mlp", 0.05)}
    rates = {"mlp": {"0.05": (0.9, 0.05)}, "compare": {"0.05": (0.3, 0.05)}}
    out, stats = predictions(p, runs, rows, prompt_len=8, max_block=4, rates=rates)
    assert stats.by_position == (0.5,)
    assert out["sprinter-mlp@0.05"] == pytest.approx(sprinter_ms(p, (0.5,), 0.9, 0.05, 4, "learned"))
    assert out["sprinter-mlp-compare@0.05"] == pytest.approx(sprinter_ms(p, (0.5,), 0.3, 0.05, 4, "learned"))
    assert out["sprinter-mlp@0.05"] != out["sprinter-mlp-compare@0.05"]
    assert AcceptanceStats((0.5,)).by_position == (0.5,)


def test_the_regime_map_reads_the_marked_pairs_measured_verifier_rates(tmp_path):
    import json

    from sprinter.bench.regime_map import measured_rates

    point = {"threshold": 0.6, "false_accept": 0.06, "true_accept": 0.45, "pass_rate": 0.3}
    (tmp_path / "metrics.json").write_text(json.dumps({"verifier": {"operating_points": {"0.05": point}}}))
    assert measured_rates(tmp_path) == (0.45, 0.06)
    with pytest.raises(SprinterError, match="no operating point at budget 0.1"):
        measured_rates(tmp_path, 0.1)
    with pytest.raises(SprinterError, match="holds no metrics.json"):
        measured_rates(tmp_path / "none")


def test_the_ngram8_row_is_priced_as_ngram_on_a_single_prompt_loop():
    from sprinter.bench.latency import predict_row
    from sprinter.decode.latency import ngram_ms

    p = CostProfile(pair="t", device="cpu", dtype="float32", threads=1, context=8, draft_step_ms=0.1,
                    draft_hidden_step_ms=0.1, target_ms=tuple(1 + 0.1 * n for n in range(10)),
                    gate_ms={"learned": 0.02, "confidence": 0.02}, round_ms=0.0)
    counts = {"new_tokens": 100, "target_calls": 40, "target_tokens": 200, "draft_calls": 0, "verifier_calls": 0,
              "drafted": 80, "accepted": 60, "draft_seconds": 0.004}
    common = {"counts": counts, "prompts": 1, "prompt_len": 8, "max_block": 8, "rates": {}}
    # auto's loop reads the prompt with its first block: every call counts (the batched ngram row's first does not)
    assert predict_row(p, None, ("ngram-8", 8), **common) == pytest.approx(ngram_ms(p, 80 / 40, 60 / 40, 4 / 40))
    assert predict_row(p, None, ("ngram", None), **common) == pytest.approx(ngram_ms(p, 80 / 39, 60 / 39, 4 / 39))


def test_regime_map_script_takes_pairs_by_flag_or_by_position(tmp_path, capsys):
    """`--pairs FILE.json` and a bare FILE.json both mark the pair (the flag form once lost its values)."""
    import json

    from conftest import load_script

    meta = tmp_path / "p" / "pair.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"greedy_agreement": 0.6, "decode_step_ms": {"target": 10.0, "draft": 1.0}}))
    main = load_script("regime_map").main
    for argv in (["--pairs", str(meta)], [str(meta)]):
        table = tmp_path / f"table{len(argv)}.md"
        main([*argv, "--out", str(tmp_path / "map.png"), "--table", str(table)])
        assert table.read_text().startswith("| cost ratio (rows)")
    with pytest.raises(SprinterError, match="does not exist"):
        main(["--pairs", str(tmp_path / "none.json"), "--out", str(tmp_path / "map.png")])
