"""Threshold calibration for false-accept budgets, and the metrics every scorer is reported with.

SPRINTER's output distribution is (1 - FP) p + FP q (docs/references.md §1), so its distance from the
target is the false-accept rate times TV(p, q): quality is bought with the false-accept rate (the
share of label-0 tokens the verifier passes), speed with the true-accept rate. A threshold is
therefore chosen on the validation split as the lowest one whose false-accept rate stays within a
budget; the test split only reports how that threshold fares on unseen prompts.
A token passes iff score >= threshold.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
)

from sprinter.verifier import budget_key


def threshold_for_budget(scores: torch.Tensor, labels: torch.Tensor, budget: float) -> float:
    """The lowest threshold whose false-accept rate on (scores, labels) is <= budget.

    scores (N,) in any range; labels (N,) in [0, 1]: 0/1 accept labels, or soft ones (the probability
    min(1, p/q) that speculative sampling keeps the token). Each token weighs 1 - label as a false accept (a
    label-0 token 1; a soft label its expected rejection), and the false-accept rate is the passing share of
    that weight. Passing every token is allowed when the budget covers all of it; with no weight at all
    nothing can be calibrated (ValueError).
    """
    weights = rejection_weights(labels)
    total = float(weights.sum())
    if total <= 0:
        raise ValueError("threshold_for_budget: no label-0 tokens; a false-accept rate is undefined")
    order = scores.double().argsort(descending=True)
    values, counts = torch.unique_consecutive(scores.double()[order], return_counts=True)  # tie groups, descending
    passed_weight = weights[order].cumsum(0)[counts.cumsum(0) - 1]  # (G,) the weight passing down to each group
    over = (passed_weight > budget * total + 1e-9).nonzero()
    if len(over) == 0:
        return float(scores.min())
    # Just above the first group that would spend more than the budget: it and every tie with it are refused.
    return float(torch.nextafter(values[over[0, 0]].float(), torch.tensor(math.inf)))


def rejection_weights(labels: torch.Tensor) -> torch.Tensor:
    """How much each token counts as a false accept when passed: 1 - label (0/1 or soft labels).  # (N,) -> (N,)"""
    return (1 - labels.double()).clamp(0, 1)


def operating_point(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """false_accept (the passing share of the false-accept weight 1 - label: of label-0 tokens, for 0/1 labels),
    true_accept (the passing share of the accept weight, label), pass_rate (all tokens)."""
    passed = scores >= threshold
    rejects, accepts = rejection_weights(labels), 1 - rejection_weights(labels)
    share = lambda w: float(w[passed].sum() / w.sum()) if w.sum() > 0 else float("nan")  # noqa: E731
    return {"threshold": threshold, "false_accept": share(rejects), "true_accept": share(accepts),
            "pass_rate": float(passed.float().mean())}


def summarize(scores: torch.Tensor, labels: torch.Tensor, probabilities: bool = True) -> dict[str, float]:
    """AUROC, average precision (against labels >= 0.5); accept_rate, the mean label (soft labels: the expected
    acceptance); accuracy at 0.5 and calibration error when the scores are probabilities."""
    target = (labels >= 0.5).long()
    out = {"auroc": float(binary_auroc(scores, target)), "ap": float(binary_average_precision(scores, target)),
           "accept_rate": float(labels.double().clamp(0, 1).mean())}
    if probabilities:
        out["accuracy"] = float(binary_accuracy(scores, target))
        with warnings.catch_warnings():  # torchmetrics' own bucketize call warns about a non-contiguous view
            warnings.filterwarnings("ignore", message=".*non-contiguous.*")
            out["calibration_error"] = float(binary_calibration_error(scores, target, n_bins=15))
    return out


def calibrate(scores: torch.Tensor, labels: torch.Tensor, budgets: Sequence[float]) -> dict[str, float]:
    """budget key -> threshold, chosen on these (validation) scores."""
    return {budget_key(b): threshold_for_budget(scores, labels, b) for b in budgets}


# The training-free draft-side gates' scores, from the columns every collection holds (sprinter.decode.gates):
# the score a gate compares with its threshold, computed from a row as the gate computes it from a draft step.
DRAFT_GATE_SCORES = {"confidence": ("draft_prob", lambda v: v), "entropy": ("draft_entropy", lambda v: torch.exp(-v)),
                     "margin": ("draft_margin", lambda v: v)}


def draft_gate_thresholds(folder: str, gate: str, budgets: Sequence[float], label: str) -> dict[float, float]:
    """budget -> the threshold of a draft-side gate ("confidence", "entropy" or "margin") at that false-accept
    budget on a collected folder's rows (`label`: the shard column that says which tokens are acceptable)."""
    from sprinter.data.shards import load_columns

    column, score = DRAFT_GATE_SCORES[gate]
    rows = load_columns(folder, (column, label))
    scores = score(rows[column].float())
    # A threshold above 1 passes nothing; 1.0 is the closest a gate's threshold may be (check_threshold).
    return {float(b): min(1.0, threshold_for_budget(scores, rows[label].float(), b)) for b in budgets}


def evaluate(val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             budgets: Sequence[float], probabilities: bool = True) -> dict:
    """Calibrate on val, report on test: summary metrics + per-budget threshold / false / true accept."""
    thresholds = calibrate(*val, budgets)
    points = {}
    for key, threshold in thresholds.items():
        on_test, on_val = operating_point(*test, threshold), operating_point(*val, threshold)
        points[key] = {**on_test, "val_false_accept": on_val["false_accept"], "val_true_accept": on_val["true_accept"]}
    return {**summarize(*test, probabilities=probabilities), "operating_points": points}
