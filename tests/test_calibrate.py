"""Threshold calibration meets its false-accept budget, and is the most permissive threshold that does."""

import pytest
import torch

from sprinter.train.calibrate import evaluate, operating_point, threshold_for_budget


def known_scores(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.7).float()
    scores = torch.where(labels > 0, torch.rand(n, generator=g) * 0.6 + 0.4, torch.rand(n, generator=g) * 0.7)
    return scores, labels


@pytest.mark.parametrize("budget", [0.001, 0.01, 0.05, 0.1, 0.3])
def test_threshold_meets_budget_and_is_the_lowest_that_does(budget):
    scores, labels = known_scores()
    t = threshold_for_budget(scores, labels, budget)
    point = operating_point(scores, labels, t)
    assert point["false_accept"] <= budget
    # The next label-0 score below t would push the rate over the budget.
    below = scores[(labels == 0) & (scores < t)].max()
    assert operating_point(scores, labels, float(below))["false_accept"] > budget
    # Known shape: label-0 scores are uniform on [0, 0.7), so the threshold sits near 0.7 (1 - budget).
    assert abs(t - 0.7 * (1 - budget)) < 0.03


def test_ties_are_refused_together():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1, 0.8, 0.7])
    labels = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    t = threshold_for_budget(scores, labels, 0.4)  # two of five label-0 may pass; the three tied ones cannot
    assert operating_point(scores, labels, t)["false_accept"] == pytest.approx(0.2)
    assert 0.5 < t <= 0.7


def test_generous_budget_passes_everything_and_no_negatives_is_an_error():
    scores, labels = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.0, 1.0, 1.0])
    assert threshold_for_budget(scores, labels, 0.99) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        threshold_for_budget(scores, torch.ones(3), 0.05)


def test_evaluate_calibrates_on_val_and_reports_on_test():
    val, test = known_scores(seed=1), known_scores(seed=2)
    report = evaluate(val, test, [0.05, 0.1])
    assert set(report["operating_points"]) == {"0.05", "0.1"}
    point = report["operating_points"]["0.05"]
    assert point["val_false_accept"] <= 0.05 and abs(point["false_accept"] - 0.05) < 0.02
    assert point["threshold"] == threshold_for_budget(*val, 0.05)
    assert report["auroc"] > 0.85
    assert report["calibration_error"] == pytest.approx(expected_calibration_error(*test), abs=1e-5)


def expected_calibration_error(scores: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """By its definition: over 15 equal-width bins of the score, the share of scores in the bin times
    |mean score - fraction of positives| there."""
    total = 0.0
    for i in range(bins):
        inside = (scores > i / bins) & (scores <= (i + 1) / bins)
        if inside.any():
            total += float(inside.float().mean()) * abs(float(scores[inside].mean()) - float(labels[inside].mean()))
    return total


def test_calibration_error_by_hand():
    from sprinter.train.calibrate import summarize

    # every score 0.9, one label in four positive: |0.9 - 0.25| = 0.65
    assert summarize(torch.full((4,), 0.9), torch.tensor([1.0, 0, 0, 0]))["calibration_error"] == pytest.approx(0.65)
    # two bins, each as often right as it says (0.25: one in four; 0.75: three in four): 0
    scores = torch.tensor([0.25] * 4 + [0.75] * 4)
    labels = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    assert summarize(scores, labels)["calibration_error"] == pytest.approx(0.0, abs=1e-6)


def test_soft_labels_are_calibrated_on_the_expected_rejection():
    """label rule soft: each token weighs its speculative-sampling rejection 1 - min(1, p/q) (hand-made: four
    tokens, expected rejections 0.4, 0.4, 0.9 and 0.0, total 1.7). Binarised at 0.5 only the third would count,
    and a budget of 0.3 would pass the first two, whose expected rejection is 0.4 each."""
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0.6, 0.6, 0.1, 1.0])
    t = threshold_for_budget(scores, labels, 0.3)  # 0.51 of 1.7 may pass: the first token (0.4), not the second
    assert 0.9 >= t > 0.8
    point = operating_point(scores, labels, t)
    assert point["false_accept"] == pytest.approx(0.4 / 1.7) and point["pass_rate"] == 0.25
    assert point["true_accept"] == pytest.approx(0.6 / 2.3)


def test_calibrated_rates_of_soft_labels_are_the_expected_rejection_of_passed_tokens():
    from sprinter.verifier import calibrated_rates

    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.75, 0.5, 0.1, 1.0])
    report = evaluate((scores, labels), (scores, labels), [0.5])  # 0.825 of 1.65 may pass: the first two (0.75)
    share = calibrated_rates(report)["0.5"]["false_accept_share"]
    assert share == pytest.approx((0.25 + 0.5) / 2)  # what the decode-time meter measures over those passed tokens
