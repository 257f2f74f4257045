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

    scores (N,) in any range, labels (N,) 0/1. Passing every token is allowed when the budget covers
    every label-0 token; with no label-0 token at all nothing can be calibrated (ValueError).
    """
    negatives = scores[labels < 0.5].double().sort(descending=True).values  # (N0,)
    if len(negatives) == 0:
        raise ValueError("threshold_for_budget: no label-0 tokens; a false-accept rate is undefined")
    allowed = math.floor(budget * len(negatives) + 1e-9)  # label-0 tokens that may pass
    if allowed >= len(negatives):
        return float(scores.min())
    # Just above the (allowed + 1)-th highest label-0 score: it and every tie with it are refused.
    above = torch.nextafter(negatives[allowed].float(), torch.tensor(math.inf))
    return float(above)


def operating_point(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """false_accept (label-0 share passing), true_accept (label-1 share passing), pass_rate (all tokens)."""
    passed = scores >= threshold
    positive = labels >= 0.5
    return {"threshold": threshold,
            "false_accept": float(passed[~positive].float().mean()) if (~positive).any() else float("nan"),
            "true_accept": float(passed[positive].float().mean()) if positive.any() else float("nan"),
            "pass_rate": float(passed.float().mean())}


def summarize(scores: torch.Tensor, labels: torch.Tensor, probabilities: bool = True) -> dict[str, float]:
    """AUROC, average precision; accuracy at 0.5 and calibration error when the scores are probabilities."""
    target = (labels >= 0.5).long()
    out = {"auroc": float(binary_auroc(scores, target)), "ap": float(binary_average_precision(scores, target)),
           "accept_rate": float(target.float().mean())}
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
