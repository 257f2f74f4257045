"""Decode-time calibration (sprinter.train.recalibrate, scripts/calibrate.py): the threshold that holds the share of
passed tokens the target rejects within a budget, on hand-made scores; and the stage end to end on the tiny pair:
a trained verifier, an on-policy collection over its prompts, thresholds written into the checkpoint and
preferred by `max_false_accept` at that temperature only."""

import inspect
import json
import json.decoder
import math

import pytest
import torch
from conftest import collect_argv as tiny_collect_argv
from conftest import train_argv, write_corpus

from sprinter.data.collect import collect, parse_collect_config
from sprinter.decode.decoder import Decoder
from sprinter.errors import SprinterError, run_cli
from sprinter.train.fit import parse_train_config, train
from sprinter.train.recalibrate import (
    calibrate_decode_time,
    kept_point,
    parse_calibrate_config,
    threshold_for_kept_budget,
    wilson_upper,
)
from sprinter.verifier import VerifierInfo, default_arch, read_info

pytestmark = pytest.mark.usefixtures("single_thread")

# Five tokens, best score first; the third and the fifth are rejected. Passing down to each score, the
# rejection share among the passed is 0/1, 0/2, 1/3, 1/4, 2/5.
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
LABELS = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("budget, threshold", [(0.25, 0.6), (0.3, 0.6), (0.2, 0.8), (0.4, 0.5), (0.0, 0.8)])
def test_the_lowest_threshold_whose_passed_tokens_hold_the_budget(budget, threshold):
    """The share is rejected-among-passed (not the share of rejected tokens that pass: at 0.25 that would stop at
    0.8, where one of the two rejected tokens is not yet passed but 0.6 passes it too)."""
    assert threshold_for_kept_budget(SCORES, LABELS, budget, bound="point") == pytest.approx(threshold)


def test_ties_pass_or_fail_together_and_nothing_passes_when_nothing_holds():
    scores, labels = torch.tensor([0.9, 0.9, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    threshold = threshold_for_kept_budget(scores, labels, 0.3, bound="point")  # 1/2, then 1/3: > 0.3
    assert threshold > 0.9 and not (scores >= threshold).any()
    assert threshold_for_kept_budget(torch.tensor([1.0, 0.2]), torch.tensor([0.0, 1.0]), 0.1, "point") == 1.0


def test_soft_labels_weigh_their_expected_rejection():
    """Labels min(1, p/q): a passed token counts 1 - label; 0.5 / 1 at 0.9, (0.5 + 0) / 2 at 0.8."""
    scores, labels = torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0.5, 1.0, 0.0])
    assert threshold_for_kept_budget(scores, labels, 0.3, bound="point") == pytest.approx(0.8)
    assert threshold_for_kept_budget(scores, labels, 0.2, bound="point") > 0.9


def test_the_upper_bound_is_the_wilson_interval_and_stricter_than_the_share():
    # 2 rejections in 100: Wilson's 90% upper end, by hand
    n, k, z = 100.0, 2.0, 1.6448536269514722
    rate = k / n
    by_hand = (rate + z * z / (2 * n) + z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert float(wilson_upper(torch.tensor([k]), torch.tensor([n]))) == pytest.approx(by_hand)
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(4000, generator=gen)
    labels = (torch.rand(4000, generator=gen) < scores).float()  # better scores, fewer rejections
    point = threshold_for_kept_budget(scores, labels, 0.05, "point")
    bounded = threshold_for_kept_budget(scores, labels, 0.05, "wilson90")
    assert bounded > point
    at = kept_point(scores, labels, bounded)
    assert at["kept_error_upper90"] <= 0.05 + 1e-9 and at["kept_error"] < 0.05
    with pytest.raises(SprinterError, match="bound: got 'tight'"):
        threshold_for_kept_budget(scores, labels, 0.05, "tight")


def test_threshold_for_prefers_the_decode_time_calibration_at_its_temperature():
    info = VerifierInfo(features=("hidden",), hidden_size=8, arch=default_arch(), thresholds={"0.05": 0.3},
                        kept_thresholds={"0.0": {"0.05": 0.6, "0.02": 0.8}})
    assert info.threshold_for(0.05, 0.0) == 0.6 and info.threshold_for(0.02, 0.0) == 0.8
    assert info.threshold_for(0.05, 0.8) == 0.3  # no decode-time calibration at 0.8: the collected rows' threshold
    assert info.budgets_at(0.0) == [0.02, 0.05] and info.budgets_at(0.8) == [0.05]
    assert info.thresholds_at(0.0) == {"0.02": 0.8, "0.05": 0.6} and info.thresholds_at(0.8) == {"0.05": 0.3}
    with pytest.raises(KeyError):
        info.threshold_for(0.02, 0.8)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("recal-text") / "docs.jsonl", inspect.getsource(json.decoder), 4)


def collect_argv(pair, text, out, *extra):
    return tiny_collect_argv(pair, text, out, "--num-prompts", "12", *extra)


@pytest.fixture(scope="module")
def trained(tiny_pair, text_file, tmp_path_factory):
    """A tiny verifier trained on corpus rows of 12 prompts, and an on-policy collection of its own loop over the
    same 12 prompts (greedy, two continuations: the second sampled at 0.8)."""
    root = tmp_path_factory.mktemp("recal")
    assert run_cli(lambda a: collect(parse_collect_config(a)), collect_argv(tiny_pair, text_file, root / "d")) == 0
    train(parse_train_config(train_argv(root / "d", root / "v", "--val-fraction", "0.25", "--test-fraction", "0.25")))
    assert run_cli(lambda a: collect(parse_collect_config(a)), collect_argv(
        tiny_pair, text_file, root / "on", "--source", "onpolicy", "--verifier", str(root / "v"),
        "--continuations", "2", "--batch-size", "4")) == 0
    return root


def test_calibration_on_the_verifiers_own_rows_is_written_into_the_checkpoint(trained, tiny_pair):
    before = read_info(trained / "v")
    report = calibrate_decode_time(parse_calibrate_config(
        ["--verifier", str(trained / "v"), "--data", str(trained / "on"), "--budgets", "0.05", "0.15",
         "--bound", "point"]))
    part = report["temperatures"]["0.0"]
    assert part["prompts"] == 3 and 0 < part["rows"] <= 3 * 8  # the 3 val prompts, continuation 0 only
    info = read_info(trained / "v")
    assert info.thresholds == before.thresholds  # the collected rows' calibration is kept
    assert set(info.kept_thresholds) == {"0.0"} and set(info.kept_thresholds["0.0"]) == {"0.05", "0.15"}
    assert info.kept_calibration["0.0"]["data"] == str(trained / "on")
    for key, point in part["points"].items():
        assert point["threshold"] == info.kept_thresholds["0.0"][key]
        assert point["kept_error"] is None or point["kept_error"] <= float(key) + 1e-9
    assert json.loads((trained / "v" / "calibration.json").read_text())["temperatures"]["0.0"]["rows"] == part["rows"]
    # max_false_accept=0.15 at T=0 decodes at the decode-time threshold; 0.15 at T=0.8 was never calibrated
    decoder = Decoder.from_pretrained(tiny_pair / "draft", tiny_pair / "target", verifier=trained / "v", device="cpu")
    gate = decoder._check_request(decoder_options(mode="sprinter", max_false_accept=0.15), 4)
    assert gate.threshold == info.kept_thresholds["0.0"]["0.15"]
    with pytest.raises(SprinterError, match="max_false_accept: got 0.15.*calibrated budgets"):
        decoder._check_request(decoder_options(mode="sprinter", max_false_accept=0.15, temperature=0.8), 4)


def decoder_options(**kw):
    from sprinter.decode.options import DecodeOptions

    return DecodeOptions(max_new_tokens=4, **kw)


def test_calibration_refuses_rows_from_another_prompt_list(trained, tiny_pair, text_file):
    other = trained / "other"
    assert run_cli(lambda a: collect(parse_collect_config(a)), collect_argv(
        tiny_pair, text_file, other, "--prompt-len", "12")) == 0
    with pytest.raises(SprinterError, match="expected the same prompt list"):
        calibrate_decode_time(parse_calibrate_config(["--verifier", str(trained / "v"), "--data", str(other),
                                                      "--dry-run"]))


@pytest.mark.parametrize("args, message", [
    ([], "data: got no folder"),
    (["--data", "x", "--budgets", "1.5"], "budgets: got 1.5"),
    (["--data", "x", "--bound", "tight"], "bound: got 'tight'"),
])
def test_bad_options_get_one_line(args, message, capsys):
    from conftest import load_script

    assert run_cli(load_script("calibrate").main, args) == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_with_an_impossible_decode_time_threshold_is_refused(trained, tmp_path):
    import shutil

    from sprinter.verifier import update_info

    copy = tmp_path / "v"
    shutil.copytree(trained / "v", copy)
    update_info(copy, kept_thresholds={"0.0": {"0.05": 1.5}})
    with pytest.raises(SprinterError, match="metadata kept_thresholds is"):
        read_info(copy)


def test_the_scaling_curve_reads_each_verifier_on_the_rows_of_its_test_prompts(trained, tmp_path):
    from conftest import load_script

    out = tmp_path / "curve"
    import shutil

    # The tiny pair agrees too often for a verifier on fewer prompts to see both classes, and its own loop's rows on
    # 3 test prompts may hold no rejection: the same verifier twice, read on the training rows of its test prompts
    # (a bench run reads an on-policy collection; folder_rows serves both).
    shutil.copytree(trained / "v", tmp_path / "v-again")
    args = ["--verifiers", str(trained / "v"), str(tmp_path / "v-again"), "--data", str(trained / "d"),
            "--out", str(out)]
    assert run_cli(load_script("scaling_curve").main, args) == 0
    results = json.loads((out / "results.json").read_text())
    first, second = results["points"]
    assert first["decode_time"]["prompts"] == second["decode_time"]["prompts"] == 3  # the same 3 test prompts
    assert first["decode_time"]["rows"] == second["decode_time"]["rows"]
    assert second["train_rows"] == first["train_rows"] > 0 and second["decode_time"] == first["decode_time"]
    metrics = json.loads((trained / "v" / "metrics.json").read_text())["verifier"]
    assert first["decode_time"]["auroc"] == pytest.approx(metrics["auroc"], abs=1e-6)  # the same rows as its test
    assert first["decode_time"]["false_accept"] <= 0.05 and (out / "scaling.png").stat().st_size > 0
    assert "| decode-time AUROC |" in (out / "results.md").read_text()
    assert run_cli(load_script("scaling_curve").main, ["--data", str(trained / "on")]) == 2


def test_a_held_out_collection_decodes_only_the_prompts_the_verifier_never_trained_on(trained, tiny_pair, text_file,
                                                                                      tmp_path):
    from sprinter.data.shards import load_columns
    from sprinter.train.recalibrate import val_prompts

    out = tmp_path / "held"
    assert run_cli(lambda a: collect(parse_collect_config(a)), collect_argv(
        tiny_pair, text_file, out, "--source", "onpolicy", "--verifier", str(trained / "v"), "--held-out",
        "--onpolicy-tokens", "12")) == 0
    rows = load_columns(out, ["prompt_index", "context_length"])
    val, _ = val_prompts(trained / "v", "val")
    test, _ = val_prompts(trained / "v", "test")
    assert set(rows["prompt_index"].tolist()) == set(val.tolist()) | set(test.tolist())  # 3 + 3 of the 12
    per_prompt = torch.bincount(rows["prompt_index"])
    assert int(per_prompt.max()) > 8  # --onpolicy-tokens 12 decodes past tiny.yaml's 8 new tokens
    # the prompt list must be the verifier's: a longer window (--max-new-tokens) cuts another one
    with pytest.raises(SprinterError, match="held_out: this collection cuts its prompts"):
        collect(parse_collect_config(collect_argv(tiny_pair, text_file, tmp_path / "x", "--source", "onpolicy",
                                                  "--verifier", str(trained / "v"), "--held-out",
                                                  "--max-new-tokens", "12")))
