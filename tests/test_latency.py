"""The cost profile and the latency model: formulas checked on hand-made profiles worked out by hand
(docs/latency.md), the by-position counts of real runs, and the profile measured on a tiny pair."""

import dataclasses
import json

import pytest
import torch

from sprinter.bench.latency import acceptance_by_position, add_predictions, load_verifier_rates, predict_row
from sprinter.bench.protocol import Method
from sprinter.bench.regime_map import (
    fastest,
    flat_shape,
    mode_times,
    pair_point,
    regime_grid,
    regime_table,
    synthetic_profile,
)
from sprinter.decode.costs import Budget, CostProfile, find_profile, measure_costs, read_profiles, save_profile
from sprinter.decode.latency import (
    AcceptanceStats,
    ar_ms,
    counted_ms,
    draft_ms,
    gated_block,
    generation_ms,
    ngram_ms,
    prefix_accept,
    sd_gated_ms,
    sd_ms,
    sprinter_ms,
    verifier_rates,
)
from sprinter.decode.sampling import Sampler
from sprinter.decode.stats import DecodeStats
from sprinter.errors import SprinterError
from sprinter.verifier import Verifier, VerifierInfo, default_arch, save_verifier


def clean_prefix(a, true_accept: float, max_block: int) -> float:
    """E[accepted prefix] of a gated block in closed form: sum_{j=1..M} P_j TA^(j-1) (what `gated_block` must give)."""
    return sum(prefix_accept(a, j) * true_accept ** (j - 1) for j in range(1, max_block + 1))


def profile(d=0.1, slope=0.1, gate=0.02, round_ms=0.0, max_n=21, d_hidden=None) -> CostProfile:
    """Target forward over n tokens: 1 + slope (n - 1) ms; draft step d; gate g; rest of a round r."""
    return CostProfile(pair="hand", device="cpu", dtype="float32", threads=1, context=8, draft_step_ms=d,
                       draft_hidden_step_ms=d if d_hidden is None else d_hidden,
                       target_ms=tuple(1 + slope * n for n in range(max_n)),
                       gate_ms={"learned": gate, "confidence": gate / 2}, round_ms=round_ms)


def test_the_target_cost_interpolates_and_extrapolates():
    p = CostProfile(pair="x", device="cpu", dtype="float32", threads=1, context=8, draft_step_ms=0.1,
                    draft_hidden_step_ms=0.1, target_ms=(1.0, 1.2, 1.6), gate_ms={"learned": 0.0}, round_ms=0.0)
    assert p.target(1) == 1.0 and p.target(3) == 1.6
    assert p.target(1.5) == pytest.approx(1.1)  # halfway between n = 1 and 2
    assert p.target(5) == pytest.approx(2.4)  # the last slope (0.4 per token) beyond n = 3
    assert p.cost_ratio == pytest.approx(0.1)
    with pytest.raises(SprinterError, match="n >= 1"):
        p.target(0)


def test_ar_draft_and_sd_by_hand():
    p = profile(d=0.1, slope=0.1, round_ms=0.05)
    assert ar_ms(p) == 1.0 and draft_ms(p) == 0.1  # a profile without the runs: a lone step of each model
    assert draft_ms(dataclasses.replace(p, draft_run_ms=0.07)) == 0.07  # the "draft" mode's own run
    assert ar_ms(dataclasses.replace(p, target_run_ms=0.85)) == 0.85  # the "ar" mode's own run
    for name in ("draft_run_ms", "target_run_ms"):
        with pytest.raises(SprinterError, match=name):
            dataclasses.replace(p, **{name: -1.0})
    # flat a = 0.5, k = 2: (2 x 0.1 + T(3) + r) / (1 + 0.5 + 0.25) = (0.2 + 1.2 + 0.05) / 1.75
    assert sd_ms(p, (0.5,), 2) == pytest.approx(1.45 / 1.75)
    # a = (0.8, 0.5, 0.5...), k = 3: P = 0.8, 0.4, 0.2 -> 2.4 tokens; cost 0.3 + T(4) + 0.05 = 1.65
    assert sd_ms(p, (0.8, 0.5), 3) == pytest.approx(1.65 / 2.4)
    # docs/references.md §1 (flat a, T constant): t (c k + 1)(1 - a) / (1 - a^(k + 1))
    flat = profile(d=0.15, slope=0.0)
    assert sd_ms(flat, (0.7,), 4) == pytest.approx((0.15 * 4 + 1) * 0.3 / (1 - 0.7 ** 5))


def test_a_perfect_gate_makes_sprinter_and_sd_gated_the_ideal_lossless_block():
    p = profile(d=0.1, slope=0.1, gate=0.02)
    # M = 2, a = 0.5, TA = 1, FA = 0: L = 1 (a label-0 first token, flagged) or 2, each with probability 0.5;
    # emitted 1.75 as SD with k = 2; cost 1.5 x (0.1 + 0.02) + (T(2) + T(3)) / 2 = 0.18 + 1.15.
    block = gated_block(p, (0.5,), 1.0, 0.0, 2)
    assert (block.length, block.flagged, block.flagged_label1) == pytest.approx((1.5, 0.75, 0.0))
    assert block.target_ms == pytest.approx(1.15) and block.accepted_prefix == pytest.approx(0.75)
    assert sprinter_ms(p, (0.5,), 1.0, 0.0, 2) == pytest.approx(1.33 / 1.75)
    assert sd_gated_ms(p, (0.5,), 1.0, 0.0, 2) == pytest.approx(1.33 / 1.75)


def test_the_gates_limits_by_hand():
    p = profile(d=0.1, slope=0.1, gate=0.02)
    # never flags: L = M = 3, nothing checked, 4 tokens for 3 x 0.12 + T(4) = 1.66
    assert sprinter_ms(p, (0.4,), 1.0, 1.0, 3) == pytest.approx(1.66 / 4)
    # always flags: L = 1, the token kept when it agrees: 1 + a tokens for 0.12 + T(2) = 1.22, lossless or not
    assert sprinter_ms(p, (0.4,), 0.0, 0.0, 3) == pytest.approx(1.22 / 1.4)
    assert sd_gated_ms(p, (0.4,), 0.0, 0.0, 3) == pytest.approx(1.22 / 1.4)


def test_sprinter_matches_the_closed_form_of_references_section_8():
    # a = 0.65, TA = 0.65, FA = 0.05: pi = 0.44, E[L] = 1 / 0.56, a_f = 0.65 x 0.35 / 0.56 = 0.40625;
    # d = 0.15 t, T(n) = t (1 + 0.06 (n - 1)), g = 0, max_block large enough to be unbounded.
    p = profile(d=0.15, slope=0.06, gate=0.0)
    length = 1 / 0.56
    cost = 0.15 * length + 1 + 0.06 * length
    assert sprinter_ms(p, (0.65,), 0.65, 0.05, 400) == pytest.approx(cost / (length + 0.40625))


def test_the_accepted_prefix_has_a_closed_form_for_any_shape():
    p = profile()
    a = (0.9, 0.7, 0.8, 0.6)
    assert gated_block(p, a, 0.8, 0.3, 6).accepted_prefix == pytest.approx(clean_prefix(a, 0.8, 6))


def test_ngram_and_counted_by_hand():
    p = profile(d=0.1, slope=0.1, gate=0.02, round_ms=0.05)
    # 3 drafted, 1.5 accepted per call, 0.2 ms lookups: (T(4) + 0.2 + 0.05) / 2.5
    assert ngram_ms(p, 3.0, 1.5, 0.2) == pytest.approx(1.55 / 2.5)
    with pytest.raises(SprinterError, match="accepted"):
        ngram_ms(p, 1.0, 2.0)
    # 40 draft steps, 10 gate calls, 10 calls reading 30 tokens (T(3) = 1.2), 25 tokens
    got = counted_ms(p, draft_calls=40, target_calls=10, target_tokens=30, gate_calls=10, new_tokens=25)
    assert got == pytest.approx((40 * 0.1 + 10 * 0.02 + 10 * (1.2 + 0.05)) / 25)


def test_rates_are_checked():
    with pytest.raises(SprinterError, match="probabilities"):
        AcceptanceStats((0.5, 1.2))
    with pytest.raises(SprinterError, match="at least"):
        AcceptanceStats(())
    with pytest.raises(SprinterError, match="probabilities"):
        sprinter_ms(profile(), (0.5,), 1.5, 0.0, 4)


def test_block_counts_give_acceptance_by_position():
    stats = DecodeStats(mode="sd")
    for _ in range(10):
        stats.count_block(4, 4)  # all four accepted
        stats.count_block(4, 1)  # position 1 rejected
        stats.count_block(2, 0)  # position 0 rejected
    assert stats.reached_by_position == [30, 20, 10, 10] and stats.accepted_by_position == [20, 10, 10, 10]
    assert acceptance_by_position([stats.to_dict()]) == pytest.approx((2 / 3, 0.5, 1.0, 1.0))
    assert acceptance_by_position([{"reached_by_position": [5], "accepted_by_position": [5]}]) == ()


def test_sd_counts_every_checked_block(gpt2_decoder):
    out = gpt2_decoder.generate([5, 6, 7], mode="sd", k=3, max_new_tokens=24)
    s = out.stats
    assert sum(s.accepted_by_position) == s.accepted and s.reached_by_position[0] == s.target_calls
    none = gpt2_decoder.generate([5, 6, 7], mode="sprinter", gate="never", max_new_tokens=8)
    assert none.stats.reached_by_position == []  # unchecked blocks say nothing about acceptance


def test_verifier_rates_come_from_metrics_json():
    point = {"threshold": 0.6, "false_accept": 0.05, "true_accept": 0.7, "pass_rate": 0.5}
    metrics = {"verifier": {"operating_points": {"0.05": point}},
               "baselines": {"linear": {"operating_points": {"0.05": {**point, "true_accept": 0.4}}}}}
    assert verifier_rates(metrics) == {"0.05": (0.7, 0.05)}
    assert verifier_rates(metrics, "linear") == {"0.05": (0.4, 0.05)}
    assert verifier_rates({}, "linear") == {}


def test_a_verifier_calibrated_at_decode_time_is_priced_from_the_calibration_prompts(tmp_path):
    metrics = {"verifier": {"operating_points": {"0.05": {"true_accept": 0.7, "false_accept": 0.05}}}}
    for name, kept in (("collected", {}), ("kept", {"0.0": {"0.05": 0.9}})):
        info = VerifierInfo(features=("hidden",), hidden_size=8, arch=default_arch(), kept_thresholds=kept)
        save_verifier(tmp_path / name, Verifier(info), info)
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    both = {"mlp": str(tmp_path / "kept"), "compare": str(tmp_path / "collected")}
    # at its calibrated temperature the kept verifier's metrics.json points are not the thresholds it decodes at
    assert load_verifier_rates(both, 0.0) == {"compare": {"0.05": (0.7, 0.05)}}
    assert load_verifier_rates(both, 0.8) == {"mlp": {"0.05": (0.7, 0.05)}, "compare": {"0.05": (0.7, 0.05)}}
    assert load_verifier_rates(both) == load_verifier_rates(both, 0.8)


def test_predicted_speedups_cancel_a_machine_wide_change_of_load():
    p = profile(d=0.1, slope=0.1)
    counts = {"new_tokens": 8, "target_calls": 4, "target_tokens": 4 * 3 + 7, "draft_calls": 8, "verifier_calls": 0,
              "drafted": 8, "accepted": 4, "draft_seconds": 0.0}
    stats = counts | {"reached_by_position": [10, 10], "accepted_by_position": [5, 5]}
    methods = [Method("ar", "ar", True, None), Method("sd-k2", "sd", True, None, 2)]
    done = {0: [{"method": m.name, "stats": stats} for m in methods]}
    sd = sd_ms(p, (0.5, 0.5), 2)
    # the timed run measured everything twice as slow as the profile: every ms/token predicted 50% low, the speedup
    # exact
    results = {"methods": [{"name": "ar", "ms_per_token": 2.0}, {"name": "sd-k2", "ms_per_token": 2 * sd}],
               "pair": {}}
    add_predictions(results, p, {"prompt_len": 8, "max_block": 2, "temperature": 0.0}, {}, methods, done, {},
                    {m.name: [stats] for m in methods})
    ar, sd_row = results["methods"]
    assert ar["prediction_error"] == pytest.approx(-0.5) and sd_row["prediction_error"] == pytest.approx(-0.5)
    assert sd_row["predicted_speedup"] == pytest.approx(1.0 / sd)
    assert ar["speedup_prediction_error"] is None and sd_row["speedup_prediction_error"] == pytest.approx(0.0)


def test_benchmark_rows_are_predicted_from_the_statistics():
    p = profile(d=0.1, slope=0.1, gate=0.02)
    stats = AcceptanceStats((0.5,))
    counts = {"new_tokens": 100, "target_calls": 40, "target_tokens": 40 * 3 + 7, "draft_calls": 80,
              "verifier_calls": 0, "drafted": 80, "accepted": 20, "draft_seconds": 0.004}
    common = {"counts": counts, "prompts": 1, "prompt_len": 8, "max_block": 2,
              "rates": {"mlp": {"0.05": (1.0, 0.0)}}}
    assert predict_row(p, stats, ("ar", None), **common) == 1.0
    assert predict_row(p, stats, ("sd", 2), **common) == pytest.approx(sd_ms(p, (0.5,), 2))
    assert predict_row(p, stats, ("sprinter-mlp", 0.05), **common) == pytest.approx(1.33 / 1.75)
    assert predict_row(p, stats, ("async", 4), **common) is None
    # ngram: the prompt's own call left out: 39 calls, 80 / 39 drafted, 20 / 39 accepted, 4 ms of lookups
    assert predict_row(p, stats, ("ngram", None), **common) == \
        pytest.approx(ngram_ms(p, 80 / 39, 20 / 39, 4 / 39))
    # no metrics.json for the linear gate: the row's own counts (target reads less the prompt's 7 extra tokens)
    assert predict_row(p, stats, ("sprinter-linear", 0.05), **common) == \
        pytest.approx(counted_ms(p, draft_calls=80, target_calls=40, target_tokens=120, gate_calls=0, new_tokens=100))


def test_a_generations_fixed_cost_by_hand():
    # prefills of 6 ms (target) and 2 ms (draft) over 128 new tokens
    p = dataclasses.replace(profile(), target_prefill_ms=6.0, draft_prefill_ms=2.0, prompt=8)
    assert generation_ms(p, 128) == pytest.approx(8 / 128)
    assert generation_ms(p, 128, draft=False) == pytest.approx(6 / 128)
    assert generation_ms(profile(), 128) == 0.0  # a profile without prefills (an older file): nothing added
    with pytest.raises(SprinterError, match="new_tokens"):
        generation_ms(p, 0)


def test_every_row_adds_its_generations_fixed_cost():
    p = dataclasses.replace(profile(d=0.1, slope=0.1, gate=0.02), target_prefill_ms=6.0, draft_prefill_ms=2.0)
    stats = AcceptanceStats((0.5,))
    # 2 generations of 50 tokens: the fixed cost spreads over 50 tokens each
    counts = {"new_tokens": 100, "target_calls": 40, "target_tokens": 40 * 3 + 14, "draft_calls": 80,
              "verifier_calls": 0, "drafted": 80, "accepted": 20, "draft_seconds": 0.004}
    common = {"counts": counts, "prompts": 2, "prompt_len": 8, "max_block": 2, "rates": {}}
    assert predict_row(p, stats, ("ar", None), **common) == pytest.approx(1.0 + 6 / 50)  # no draft prefilled
    assert predict_row(p, stats, ("draft", None), **common) == pytest.approx(0.1 + 2 / 50)
    assert predict_row(p, stats, ("sd", 2), **common) == pytest.approx(sd_ms(p, (0.5,), 2) + 8 / 50)
    assert predict_row(p, stats, ("ngram-8", 8), **common) == pytest.approx(ngram_ms(p, 2, 0.5, 0.1) + 6 / 50)


def test_old_profiles_load_with_the_new_fields_at_what_they_measured(tmp_path):
    old = {k: v for k, v in profile().to_dict().items()
           if k not in ("target_prefill_ms", "draft_prefill_ms", "prompt", "temperature", "top_p")}
    path = tmp_path / "cost_profile.json"
    path.write_text(json.dumps({"format": "sprinter-costs/1", "profiles": {"k": old}}))
    (loaded,) = read_profiles(path).values()
    assert (loaded.target_prefill_ms, loaded.draft_prefill_ms, loaded.prompt) == (0.0, 0.0, 0)
    assert (loaded.temperature, loaded.top_p) == (0.0, 1.0)  # greedy, as every profile before them
    with pytest.raises(SprinterError, match="target_prefill_ms"):
        CostProfile(**{**old, "target_prefill_ms": -1.0})


def test_the_regime_map_functions():
    p = synthetic_profile(0.1, slope=0.0, gate_ratio=0.0)
    assert p.target(7) == 1.0 and p.cost_ratio == pytest.approx(0.1)
    times = mode_times(p, flat_shape(0.0))
    assert fastest(times) == ("ar", 1.0)  # nothing is ever accepted: drafting only costs
    times = mode_times(p, flat_shape(0.9))
    mode, speedup = fastest(times)
    assert mode != "ar" and speedup == pytest.approx(1 / times[mode][0])


def test_the_regime_table_and_pair_points():
    grid = regime_grid((0.0, 0.9), (0.6,), slope=0.0, gate_ratio=0.0, max_block=4)
    assert grid[0][0] == ("ar", 1.0) and grid[0][1][1] > 1
    table = regime_table((0.0, 0.9), (0.6,), grid).splitlines()
    assert len(table) == 3 and table[2].startswith("| 0.6 | ar | ") and table[2].endswith("x |")
    assert pair_point({"greedy_agreement": 0.6, "decode_step_ms": {"target": 4.0, "draft": 0.5}}) == (0.6, 0.125)
    with pytest.raises(SprinterError, match="greedy_agreement"):
        pair_point({"decode_step_ms": {"target": 4.0, "draft": 0.5}})


def test_profiles_are_saved_by_key_and_read_back(tmp_path):
    path = tmp_path / "cost_profile.json"
    one, two = profile(), CostProfile(**{**profile().to_dict(), "threads": 2})
    save_profile(path, one)
    save_profile(path, two)
    assert set(read_profiles(path)) == {one.key, two.key}
    assert find_profile(path, "hand", "cpu", "float32", 2) == two
    assert json.loads(path.read_text())["format"] == "sprinter-costs/1"
    with pytest.raises(SprinterError, match="target_ms"):
        CostProfile(**{**one.to_dict(), "target_ms": ()})


def test_measure_costs_on_a_tiny_pair(gpt2_decoder):
    pair = gpt2_decoder.pair
    p = measure_costs(pair, name="tiny", max_n=5, context=8, budget=Budget(0.3))
    assert len(p.target_ms) == 5 and p.repeats >= 3 and p.noise == round(p.noise, 4) and 0 <= p.noise < 10
    assert all(v > 0 for v in (p.draft_step_ms, p.draft_hidden_step_ms, p.draft_run_ms, p.target_run_ms, p.round_ms,
                               *p.gate_ms.values()))
    assert p.key == "tiny | cpu | float32 | %d thread(s)" % p.threads
    assert p.target_prefill_ms > 0 and p.draft_prefill_ms > 0 and p.prompt == 8
    assert (p.temperature, p.top_p) == (0.0, 1.0)


def test_measure_costs_times_the_runs_sampler_and_prompt(gpt2_decoder):
    p = measure_costs(gpt2_decoder.pair, name="tiny", max_n=3, context=12, prompt=6,
                      sampler=Sampler(temperature=0.8, top_p=0.95), budget=Budget(0.2))
    assert (p.temperature, p.top_p, p.context, p.prompt) == (0.8, 0.95, 12, 6)
    assert p.target_prefill_ms > 0 and p.draft_prefill_ms > 0
    assert measure_costs(gpt2_decoder.pair, name="tiny", max_n=2, context=4,
                         budget=Budget(60, max_repeats=5)).repeats == 5  # 5 rounds, not a minute
    with pytest.raises(SprinterError, match="prompt"):
        measure_costs(gpt2_decoder.pair, name="tiny", prompt=0)


def test_timing_noise_by_hand():
    from sprinter.decode.costs import timing_noise

    # [1, 2, 3, 4, 5]: quartiles 1.5 and 4.5 about a median of 3, spread 1.0; [2, 2, 2, 2]: spread 0; median 0.5
    assert timing_noise([[1, 2, 3, 4, 5], [2, 2, 2, 2]]) == 0.5
    assert timing_noise([[1, 2, 3, 4, 5]]) == 1.0 and timing_noise([[0, 0, 0]]) == 0.0 and timing_noise([]) == 0.0
    assert timing_noise([[10, 11, 12, 13, 14], [3, 3, 3, 3], [1, 1, 2, 3, 3]]) == 0.25  # 0.25, 0, 1.0


def test_profile_pair_script_writes_a_keyed_profile(tiny_pair, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "profile_pair.py"
    spec = importlib.util.spec_from_file_location("profile_pair", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    try:
        module.main(["--pair", str(tiny_pair), "--out", str(out), "--threads", "1", "--max-block", "3",
                     "--budget-s", "0.2"])
    finally:
        torch.set_num_threads(threads)
    (profile,) = read_profiles(out).values()
    assert profile.threads == 1 and len(profile.target_ms) == 4 and profile.pair == str(tiny_pair)
    assert json.loads(capsys.readouterr().out)["key"] == profile.key
