"""The false-accept budget at decode time (sprinter.decode.budget): its interval, the threshold controller on a
hand-made stream, and the controller inside the sprinter loop on the tiny pair."""

from __future__ import annotations

import inspect
import json
import json.decoder
import math
import warnings

import pytest
import torch
from conftest import load_script
from transformers import AutoConfig

from sprinter.decode.budget import ThresholdController
from sprinter.decode.decoder import Decoder
from sprinter.decode.gates import ConfidenceGate, LearnedGate
from sprinter.decode.options import DecodeOptions
from sprinter.decode.stats import DecodeStats, wilson_interval
from sprinter.errors import SprinterError, SprinterWarning, run_cli
from sprinter.verifier import Verifier, VerifierInfo, default_arch, save_verifier

pytestmark = pytest.mark.usefixtures("single_thread")
F = 0.05


# ------------------------------------------------------------------------------------------------ the interval
@pytest.mark.parametrize("events, n", [(5, 100), (0, 40), (40, 40), (2.7, 31)])
def test_the_interval_is_wilsons(events, n):
    """Each end p solves (rate - p)^2 = z^2 p (1 - p) / n (the score test at the 90% level), the rate between."""
    low, high = wilson_interval(events, n)
    rate, z = events / n, 1.6448536269514722
    assert low <= rate <= high
    for end in (low, high):
        if 0 < end < 1:
            assert (rate - end) ** 2 == pytest.approx(z * z * end * (1 - end) / n, rel=1e-9)
    assert wilson_interval(0.0, 0) is None


def test_stats_report_the_interval():
    stats = DecodeStats(mode="sprinter", passed_unchecked=200, false_accepts=10.0)
    out = stats.to_dict()
    assert out["false_accept_rate"] == 0.05
    assert out["false_accept_lower90"] < 0.05 < out["false_accept_upper90"] < 0.09
    assert DecodeStats(mode="sd").to_dict()["false_accept_upper90"] is None


# ------------------------------------------------------------------------------------- the controller, on a stream
def stream(threshold: float, adapt: bool, rounds: int = 1500, seed: int = 0) -> tuple[float, int, float]:
    """A stub gate on a hand-made stream: each drafted token scores s ~ U(0, 1), and the target would reject it
    with probability (1 - s)^2 (a greedy target: drawn as a 0/1 event). Blocks end at the first flagged token or
    after 8 tokens, as sprinter's do. At the static threshold 0.5 the passed tokens' rate is E[(1 - s)^2 | s >= 0.5]
    = 1/12, above F = 0.05. Returns (realised rate, passed tokens, final threshold)."""
    gen = torch.Generator().manual_seed(seed)
    controller = ThresholdController(F, threshold)
    events = passed = 0.0
    for _ in range(rounds):
        t = controller.threshold if adapt else threshold
        round_events, round_passed = 0.0, 0
        for _ in range(8):
            s = float(torch.rand((), generator=gen))
            if s < t:
                break
            round_events += float(torch.rand((), generator=gen) < (1 - s) ** 2)
            round_passed += 1
        if round_passed:
            controller.observe(round_events, round_passed)
            events, passed = events + round_events, passed + round_passed
    return events / passed, int(passed), controller.threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_static_threshold_overshoots_and_the_adapted_one_holds(seed):
    static, _, _ = stream(0.5, adapt=False, seed=seed)
    adapted, passed, end = stream(0.5, adapt=True, seed=seed)
    assert static > F + 0.02  # ~0.083
    assert adapted <= F + 0.01 and passed > 300
    assert end > 0.5  # it raised the threshold (the rate F needs s >= 1 - sqrt(3 F) = 0.61)


def test_a_threshold_that_undershoots_relaxes():
    """Started too strict (0.9: rate 0.0033), the controller gives back speed until the rate nears F."""
    static, static_passed, _ = stream(0.9, adapt=False)
    adapted, passed, end = stream(0.9, adapt=True)
    assert static < F / 4 and adapted > 0.8 * F and adapted <= F + 0.01
    assert passed > 2 * static_passed and end < 0.9


def test_the_gate_stays_pure():
    """The adapted threshold lives in the controller (the loop's state): the gate object never changes."""
    gate = ConfidenceGate(0.4)
    controller = ThresholdController(F, gate.threshold)
    view = controller.gate(gate)
    controller.observe(3.0, 4)  # three false accepts among four passed tokens
    assert view.threshold > 0.4 and gate.threshold == 0.4
    step_q = torch.tensor([0.1, 0.9])
    from sprinter.decode.drafters import DraftStep

    step = DraftStep(token=torch.tensor(1), q=step_q, q_soft=step_q, hidden=None)
    assert view.accept_prob(step, 0) == gate.accept_prob(step, 0)


# ------------------------------------------------------------------------------------------ inside the loop
def test_the_sprinter_loop_adapts_its_threshold(gpt2_decoder):
    gate = ConfidenceGate(0.05)
    common = dict(mode="sprinter", gate=gate, max_new_tokens=48, max_block=8)
    static = gpt2_decoder.generate("def f(x):", **common).stats
    adapted = gpt2_decoder.generate("def f(x):", max_false_accept=F, adapt_threshold=True, **common).stats
    assert static.false_accept_rate > F and static.adapted_threshold is None  # the static threshold overshoots
    # the controller saw what the meter measured, and moved the threshold up by ETA / F per false accept, net
    expected = math.log(0.05 / 0.95) + (adapted.false_accepts - F * adapted.passed_unchecked)
    assert adapted.adapted_threshold > 0.05 and gate.threshold == 0.05
    assert math.log(adapted.adapted_threshold / (1 - adapted.adapted_threshold)) == pytest.approx(expected, abs=1e-4)
    assert adapted.passed_unchecked < static.passed_unchecked
    assert adapted.to_dict()["false_accept_upper90"] is not None


def test_the_options_of_a_budget():
    with pytest.raises(SprinterError, match="adapt_threshold: got True with max_false_accept=None"):
        DecodeOptions(mode="sprinter", adapt_threshold=True)
    with pytest.raises(SprinterError, match="adapt_threshold: got True with strict=True"):
        DecodeOptions(mode="sprinter", adapt_threshold=True, max_false_accept=F, strict=True)
    with pytest.raises(SprinterError, match="adapt_threshold: got True with mode='sd'"):
        DecodeOptions(mode="sd", adapt_threshold=True)
    with pytest.raises(SprinterError, match="max_false_accept: got 0.05 with gate='confidence'"):
        DecodeOptions(mode="sprinter", gate="confidence", max_false_accept=F)
    DecodeOptions(mode="sprinter", gate="confidence", max_false_accept=F, adapt_threshold=True)


def greedy_label_decoder(pair) -> Decoder:
    info = VerifierInfo(features=("hidden",), hidden_size=pair.draft.config.hidden_size, arch=default_arch(depth=0),
                        label_rule="greedy", thresholds={"0.05": 0.6, "0.1": 0.3}, default_budget=0.05,
                        default_threshold=0.6)
    return Decoder(pair, LearnedGate(Verifier(info).eval(), info.features, 0.6), info)


def test_a_budget_picks_its_calibrated_threshold(gpt2_decoder):
    dec = greedy_label_decoder(gpt2_decoder.pair)
    at_01 = dec.generate("def f():", mode="sprinter", max_new_tokens=24, max_false_accept=0.1)
    by_hand = dec.generate("def f():", mode="sprinter", max_new_tokens=24, threshold=0.3)
    assert at_01.token_ids == by_hand.token_ids and at_01.stats.flagged == by_hand.stats.flagged
    with pytest.raises(SprinterError, match="expected one of the verifier's calibrated budgets"):
        dec.generate("def f():", mode="sprinter", max_new_tokens=24, max_false_accept=0.2)


def test_a_greedy_label_verifier_warns_at_temperature_above_0(gpt2_decoder):
    dec = greedy_label_decoder(gpt2_decoder.pair)
    with pytest.warns(SprinterWarning, match="trained on greedy .argmax. labels and is used at temperature 0.8"):
        dec.generate("def f():", mode="sprinter", max_new_tokens=8, temperature=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SprinterWarning)
        dec.generate("def f():", mode="sprinter", max_new_tokens=8)  # greedy: the labels fit


# ------------------------------------------------------------------------------------------ scripts/budget.py
def test_pooled_rows_say_whether_the_budget_holds():
    from sprinter.bench.budget import pooled_row

    stats = [{"passed_unchecked": 500, "false_accepts": 10.0, "verifier_calls": 700, "flagged": 200,
              "new_tokens": 600, "wall_seconds": 1.2, "adapted_threshold": 0.7}] * 2
    row = pooled_row(0.05, 0.0, "adapted", stats, tolerance=0.01)
    assert row["false_accept_rate"] == 0.02 and row["false_accept_upper90"] < 0.03 and row["holds"]
    assert row["flag_rate"] == pytest.approx(2 / 7) and row["ms_per_token"] == pytest.approx(2.0)
    assert not pooled_row(0.02, 0.0, "static", stats, tolerance=0.0)["holds"]  # 0.02 measured, upper end above


def test_the_budget_script_writes_its_table(tiny_pair, tmp_path):
    width = AutoConfig.from_pretrained(tiny_pair / "draft").hidden_size
    info = VerifierInfo(features=("hidden",), hidden_size=width, arch=default_arch(depth=0),
                        thresholds={"0.05": 0.5}, default_budget=0.05, default_threshold=0.5)
    save_verifier(tmp_path / "v", Verifier(info), info)
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": inspect.getsource(json.decoder)}) + "\n")
    main = load_script("budget").main
    common = ["--pair", str(tiny_pair), "--verifier", str(tmp_path / "v"), "--dataset", str(data), "--split", "all",
              "--num-prompts", "2", "--prompt-len", "16", "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]
    assert run_cli(main, [*common, "--budgets", "0.05", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["temperature"], r["variant"]) for r in results["rows"]] == [
        (0.0, "static"), (0.0, "adapted"), (0.8, "static"), (0.8, "adapted")]
    assert all(isinstance(r["holds"], bool) and r["prompts"] == 2 for r in results["rows"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.count("\n| 0.") == 4 and "90% interval" in table
    assert run_cli(main, [*common, "--budgets", "0.1", "--out", str(tmp_path / "bad")]) == 2  # not calibrated

