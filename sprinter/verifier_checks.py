"""The load-time checks of a verifier checkpoint (sprinter.verifier's read_info and load_verifier run them): the
metadata's fields have the types and ranges scripts/train.py writes, every tensor is finite and of plausible size,
every standardisation scale positive, and the probe rows still get the logits they got at save time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sprinter.errors import SprinterError, warn
from sprinter.verifier import NORMS, Verifier, VerifierInfo

LARGEST_WEIGHT = 1e6  # no trained (weight-decayed, standardised) verifier comes near: larger is a damaged file


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_share(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _is_threshold(value: object) -> bool:  # 0 would pass every token, 1 (or more) flag every one
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


# The metadata schema: field -> (check, what it should be). Checked before any module is built from it.
SCHEMA = {
    "features": (lambda v: isinstance(v, list) and v and all(isinstance(f, str) for f in v), "a list of feature names"),
    "hidden_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "arch": (lambda v: isinstance(v, dict) and all(_is_int(v.get(k), 0) for k in ("width", "depth", "token_dim",
                                                                                  "vocab_size"))
             and v.get("norm") in NORMS and isinstance(v.get("dropout"), (int, float)) and 0 <= v["dropout"] < 1,
             f"{{width, depth, token_dim, vocab_size: integers >= 0, norm: one of {NORMS}, dropout in [0, 1)}}"),
    "label_rule": (lambda v: v in ("greedy", "sprinter", "soft", "relaxed"), "greedy, sprinter, soft or relaxed"),
    "draft": (lambda v: isinstance(v, dict), "a mapping"),
    "target": (lambda v: isinstance(v, dict), "a mapping"),
    "thresholds": (lambda v: isinstance(v, dict) and all(_is_threshold(t) for t in v.values()),
                   "a mapping of budget -> threshold in (0, 1)"),
    "kept_thresholds": (lambda v: isinstance(v, dict) and all(
        isinstance(part, dict) and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1
                                       for t in part.values()) for part in v.values()),
        "a mapping of temperature -> budget -> threshold in (0, 1]"),
    "kept_calibration": (lambda v: isinstance(v, dict) and all(isinstance(part, dict) for part in v.values()),
                         "a mapping of temperature -> mapping"),
    "default_budget": (lambda v: v is None or _is_share(v), "a number in [0, 1] or null"),
    "default_threshold": (_is_threshold, "a number in (0, 1)"),
    "rates": (lambda v: isinstance(v, dict) and all(isinstance(r, dict) and _is_share(r.get("pass_rate"))
                                                    and _is_share(r.get("false_accept_share")) for r in v.values()),
              "a mapping of budget -> {pass_rate, false_accept_share} in [0, 1]"),
    "context_source": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "stop_threshold": (lambda v: v is None or _is_share(v), "a number in [0, 1] or null"),
    "sprinter_version": (lambda v: isinstance(v, str), "a string"),
}
REQUIRED = ("features", "hidden_size", "arch", "thresholds", "default_threshold")


def check_info(values: dict[str, Any], file: str | Path) -> None:
    """Refuse verifier metadata whose fields have the wrong types or ranges, naming the field."""
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise SprinterError(f"verifier {str(file)!r}: metadata lacks {missing}; expected a checkpoint written by "
                            "scripts/train.py")
    for key, value in values.items():
        check, what = SCHEMA[key]
        if not check(value):
            raise SprinterError(f"verifier {str(file)!r}: metadata {key} is {value!r}; expected {what}")
    budget = values.get("default_budget")
    if budget is not None and values["thresholds"] and str(float(budget)) not in values["thresholds"]:
        raise SprinterError(f"verifier {str(file)!r}: metadata default_budget {budget} has no threshold in "
                            f"thresholds {values['thresholds']}; expected the calibrated thresholds scripts/train.py "
                            "wrote")


def check_weights(state: dict[str, torch.Tensor], file: str | Path) -> None:
    """Every tensor finite and of plausible size, every standardisation scale positive: a NaN or an inf anywhere
    would make the gate flag (or pass) every token without a word."""
    for name, value in state.items():
        value = value.float()
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise SprinterError(f"verifier {str(file)!r}: tensor {name} holds {bad} NaN or infinite value(s); "
                                "expected finite weights (a damaged file, or a training that diverged)")
        if name.endswith("_std") and not bool((value > 0).all()):
            raise SprinterError(f"verifier {str(file)!r}: standardisation scale {name} holds "
                                f"{int((value <= 0).sum())} value(s) <= 0 (smallest {float(value.min()):g}); "
                                "expected positive scales")
        if value.numel() and float(value.abs().max()) > LARGEST_WEIGHT:
            raise SprinterError(f"verifier {str(file)!r}: tensor {name} holds a value of {float(value.abs().max()):g}; "
                                f"expected weights below {LARGEST_WEIGHT:g} in size (a damaged file, or a training "
                                "that diverged)")


def check_probe(verifier: Verifier, info: VerifierInfo, probe: dict[str, torch.Tensor], file: str | Path) -> None:
    """The verifier gives its probe rows the logits it gave them at save time (else its weights changed), and it
    neither passes nor flags all of them at its default threshold (else warn: it would gate nothing)."""
    missing = [f for f in (*info.features, "logits") if f not in probe]
    if missing:
        raise SprinterError(f"verifier {str(file)!r}: its probe lacks {missing}; expected the probe scripts/train.py "
                            "writes (or none)")
    with torch.no_grad():
        logits = verifier({f: probe[f] for f in info.features})  # (N,)
    saved = probe["logits"].float()
    if logits.shape != saved.shape or not torch.allclose(logits, saved, rtol=1e-3, atol=1e-3):
        gap = float((logits - saved).abs().max()) if logits.shape == saved.shape else float("nan")
        raise SprinterError(f"verifier {str(file)!r}: its scores on the {len(saved)} probe rows stored at save time "
                            f"differ from the ones it gave then (largest difference {gap:g}); expected the weights "
                            "it was saved with (a damaged or edited file)")
    passed = torch.sigmoid(logits) >= info.default_threshold
    if bool(passed.all()) or not bool(passed.any()):
        what = ("passes every one: it accepts every drafted token unchecked (the draft's output under a "
                "sprinter label)") if bool(passed.all()) else \
            "flags every one: every token is checked (slower than mode 'ar')"
        warn(f"verifier {str(file)!r}: of its {len(passed)} probe rows (validation rows stored at save time), it "
             f"{what} at threshold {info.default_threshold:g}; see docs/decoding.md (degenerate verifiers)")


__all__ = ["LARGEST_WEIGHT", "REQUIRED", "SCHEMA", "check_info", "check_probe", "check_weights"]
