"""Decode-time calibration: thresholds that hold the false-accept budget where it is spent (scripts/calibrate.py).

scripts/train.py calibrates each budget on collected rows as a false-positive rate: the share of the tokens the
target rejects that the verifier passes. What a user is promised at decode time (`max_false_accept=F`,
sprinter.decode.budget) is another share: of the tokens passed unchecked, at most F are tokens the target would
reject. The two differ by the base rate of rejections among the passed tokens, and the contexts differ too: at
decode time they are the verifier's own accepted prefixes. This stage recalibrates a trained verifier on rows of
its own decode loop (scripts/collect.py --source onpolicy --verifier V, collected over the prompt list the verifier
was trained on) and keeps only the rows of the verifier's `val` prompts, the ones it never trained on:

- the rows decoded at the collection's label temperature T (continuation 0; every continuation when all are
  decoded at T) are scored by the verifier;
- their label is the event the decode-time meter counts: at T = 0 the target's argmax (`accept_greedy`), at
  T > 0 the speculative-sampling acceptance min(1, p/q) (`accept_soft`, its complement the rejection weight);
- each budget's threshold is the lowest whose passed rows hold a rejection share within F, by default at the
  upper end of its 90% Wilson interval (`threshold_for_kept_budget`);
- the thresholds go into the checkpoint's metadata as `kept_thresholds[T]` (VerifierInfo.threshold_for prefers
  them at that temperature) with what made them in `kept_calibration[T]`, and `calibration.json` beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sprinter.config import ThreadsConfig, option, parse_config, to_dict
from sprinter.decode.stats import Z90, wilson_centre_half
from sprinter.errors import SprinterError
from sprinter.files import FolderLock, read_json, write_json
from sprinter.verifier import budget_key

BOUNDS = ("wilson90", "point")


@dataclass(frozen=True)
class CalibrateConfig(ThreadsConfig):
    """scripts/calibrate.py's options."""

    verifier: str = option("checkpoints/verifiers/demo", "the verifier folder to calibrate (scripts/train.py's "
                                                         "--out: its train_config.json names its splits)")
    data: tuple[str, ...] = option((), "on-policy collections (scripts/collect.py --source onpolicy --verifier V) "
                                       "over the prompts the verifier was trained on, one per temperature")
    budgets: tuple[float, ...] = option((0.02, 0.05, 0.1), "false-accept budgets: at most this share of passed "
                                                           "tokens rejected by the target")
    bound: str = option("wilson90", f"one of {BOUNDS}: hold the budget at the 90% upper bound of the measured "
                                    "share, or at the share itself")
    dry_run: bool = option(False, "print the thresholds and write nothing")

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "budgets", tuple(self.budgets))
        if not self.data:
            raise SprinterError("data: got no folder; expected one or more on-policy collections (scripts/collect.py "
                                "--source onpolicy --verifier V)")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
                raise SprinterError(f"budgets: got {b!r}; expected false-accept budgets in (0, 1)")
        if not self.budgets:
            raise SprinterError("budgets: got none; expected one or more budgets in (0, 1)")
        if self.bound not in BOUNDS:
            raise SprinterError(f"bound: got {self.bound!r}; expected one of {BOUNDS}")


def parse_calibrate_config(argv: Sequence[str] | None) -> CalibrateConfig:
    return parse_config(CalibrateConfig, argv, "Calibrate a verifier's budgets on its own decode-time contexts.")


def wilson_upper(events: torch.Tensor, n: torch.Tensor, z: float = Z90) -> torch.Tensor:
    """The upper end of the 90% Wilson interval of events / n, elementwise (n > 0): sprinter.decode.stats'
    wilson_interval over a whole curve of counts at once.  # (G,), (G,) -> (G,)"""
    centre, half = wilson_centre_half((events / n).clamp(0, 1), n, z)
    return (centre + half).clamp(max=1)


def threshold_for_kept_budget(scores: torch.Tensor, labels: torch.Tensor, budget: float,
                              bound: str = "wilson90") -> float:
    """The lowest threshold at which the passed tokens (score >= threshold) hold a rejection share <= budget.

    scores (N,) in [0, 1]; labels (N,) in [0, 1]: a token weighs 1 - label as a rejection (0/1 labels: the
    label-0 tokens; soft labels min(1, p/q): its expected rejection), and the share is the passed weight over
    the passed count. `bound` "wilson90" holds the budget at the upper end of the share's 90% Wilson interval,
    "point" at the share itself. Ties pass or fail together. When no threshold holds it, the one just above the
    highest score (at most 1.0): nothing passes, or only scores of exactly 1.0.
    """
    if bound not in BOUNDS:
        raise SprinterError(f"bound: got {bound!r}; expected one of {BOUNDS}")
    scores = scores.double()
    weights = (1 - labels.double()).clamp(0, 1)
    order = scores.argsort(descending=True)
    values, counts = torch.unique_consecutive(scores[order], return_counts=True)  # tie groups, descending
    ends = counts.cumsum(0) - 1
    events = weights[order].cumsum(0)[ends]  # (G,) rejection weight passing down to each group
    passed = (ends + 1).double()
    share = wilson_upper(events, passed) if bound == "wilson90" else events / passed
    holds = (share <= budget + 1e-12).nonzero()
    if len(holds) == 0:
        return min(1.0, float(torch.nextafter(values[0].float(), torch.tensor(math.inf))))
    return float(values[holds[-1, 0]].float())  # the lowest group within the budget: the most tokens passed


def kept_point(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """At `threshold`: the passed share of rows, the rejection share among them and its 90% interval."""
    from sprinter.decode.stats import wilson_interval

    passed = scores >= threshold
    n, events = int(passed.sum()), float((1 - labels.double()).clamp(0, 1)[passed].sum())
    interval = wilson_interval(events, n)
    return {"threshold": threshold, "pass_rate": float(passed.double().mean()), "passed": n,
            "kept_error": events / n if n else None, "kept_error_upper90": interval[1] if interval else None}


def val_prompts(verifier_dir: Path, split: str = "val") -> tuple[torch.Tensor, dict]:
    """The prompt ids of the verifier's own `val` split (or another of its splits), as scripts/train.py drew it
    (its train_config.json), and that config."""
    from sprinter.train.data import TokenTable, split_prompts

    config_file = verifier_dir / "train_config.json"
    if not config_file.is_file():
        raise SprinterError(f"verifier: got {str(verifier_dir)!r}, which has no train_config.json; expected the "
                            "folder scripts/train.py wrote (its splits tell which prompts it never trained on)")
    train_cfg = read_json(config_file, "train_config.json")
    missing = [p for p in train_cfg["data"] if not Path(p).is_dir()]
    if missing:
        raise SprinterError(f"verifier {str(verifier_dir)!r} was trained on {missing}, not found here; expected its "
                            "training data (the val split is drawn from its prompt list)")
    prompts = TokenTable(train_cfg["data"], ["prompt_index"]).column("prompt_index")
    splits = split_prompts(prompts, train_cfg["val_fraction"], train_cfg["test_fraction"], train_cfg["seed"])
    return prompts[splits[split]].unique(), train_cfg


def folder_rows(folder: str, verifier, info, val: torch.Tensor, train_cfg: dict) -> tuple[float, dict]:
    """(temperature, {scores, labels, rows, prompts}) of one collection: its rows decoded and labelled at its
    temperature, on the verifier's val prompts."""
    from sprinter.data.contexts import PROMPT_LIST
    from sprinter.data.shards import read_manifest
    from sprinter.train.baselines import score_rows
    from sprinter.train.data import TokenTable, open_folders

    manifest = read_manifest(folder)
    collected = manifest.get("config", {})
    trained_on = read_manifest(train_cfg["data"][0]).get("config", {})
    same = PROMPT_LIST
    if any(collected.get(k) != trained_on.get(k) for k in same):
        raise SprinterError(f"data {folder!r}: prompts from {[collected.get(k) for k in same]} ({same}); the verifier "
                            f"was trained on {[trained_on.get(k) for k in same]}; expected the same prompt list, so "
                            "that its val prompts can be told apart")
    temperature = float(manifest.get("temperature", 0.0))
    _, table = open_folders([folder], info.features, "greedy", like=train_cfg["data"][0])
    extra = ["accept_greedy", "accept_soft", "prompt_index"]
    if manifest.get("context_source") == "onpolicy" and int(collected.get("continuations", 1)) > 1 \
            and float(collected.get("continuation_temperature", temperature)) != temperature:
        extra.append("continuation")
    columns = TokenTable([folder], extra)
    keep = torch.isin(columns.column("prompt_index"), val)
    if "continuation" in extra:
        keep &= columns.column("continuation") == 0  # the continuations after the first are decoded at another T
    rows = keep.nonzero().squeeze(1)
    if len(rows) == 0:
        raise SprinterError(f"data {folder!r}: no rows on the verifier's {len(val)} val prompts at temperature "
                            f"{temperature}; expected a collection over the prompt list it was trained on")
    scores = score_rows(verifier, table, info.features, "greedy", rows)[0].float()
    labels = columns.column("accept_soft" if temperature > 0 else "accept_greedy")[rows].float()
    return temperature, {"scores": scores, "labels": labels, "rows": len(rows),
                         "prompts": int(columns.column("prompt_index")[rows].unique().numel()),
                         "context_source": manifest.get("context_source")}


def calibrate_decode_time(cfg: CalibrateConfig) -> dict:
    """Thresholds per (temperature, budget) on the verifier's own decode-time rows; written into the checkpoint
    and to calibration.json unless `dry_run`. Returns the report."""
    from sprinter.verifier import load_verifier, update_info

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    verifier_dir = Path(cfg.verifier)
    verifier, info = load_verifier(verifier_dir)
    val, train_cfg = val_prompts(verifier_dir)
    report = {"verifier": str(verifier_dir), "config": to_dict(cfg), "val_prompts": len(val),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "temperatures": {}}
    kept, made = dict(info.kept_thresholds), dict(info.kept_calibration)
    for folder in cfg.data:
        temperature, part = folder_rows(folder, verifier, info, val, train_cfg)
        t_key = budget_key(temperature)
        if t_key in report["temperatures"]:
            raise SprinterError(f"data: two folders at temperature {temperature}; expected one per temperature")
        points = {}
        for budget in cfg.budgets:
            threshold = threshold_for_kept_budget(part["scores"], part["labels"], budget, cfg.bound)
            collected = info.thresholds.get(budget_key(budget))  # scripts/train.py's, on collected rows
            points[budget_key(budget)] = {
                **kept_point(part["scores"], part["labels"], threshold),
                "collected": None if collected is None else kept_point(part["scores"], part["labels"], collected)}
        rejected = float((1 - part["labels"].double()).clamp(0, 1).mean())
        report["temperatures"][t_key] = {"data": folder, "rows": part["rows"], "prompts": part["prompts"],
                                         "context_source": part["context_source"], "rejection_rate": rejected,
                                         "points": points}
        kept[t_key] = {k: p["threshold"] for k, p in points.items()}
        made[t_key] = {"data": folder, "rows": part["rows"], "prompts": part["prompts"], "bound": cfg.bound}
    if not cfg.dry_run:
        with FolderLock(verifier_dir, "calibrate"):
            update_info(verifier_dir, kept_thresholds=kept, kept_calibration=made)
            write_json(verifier_dir / "calibration.json", report)
    return report


def summary(report: dict) -> str:
    """One line per (temperature, budget): the decode-time threshold and what it passes, and the collected one's."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{report['verifier']}: decode-time calibration on {report['val_prompts']} val prompts "
             f"(bound {report['config']['bound']})"]
    for t, part in report["temperatures"].items():
        lines.append(f"T={t}: {part['rows']} rows ({part['prompts']} prompts) from {part['data']}, "
                     f"rejection rate {part['rejection_rate']:.3f}")
        for b, p in part["points"].items():
            c = p["collected"] or {}
            lines.append(f"  F={b}: threshold {p['threshold']:.4f} passes {num(p['pass_rate'])}, kept error "
                         f"{num(p['kept_error'])} (upper90 {num(p['kept_error_upper90'])}); the collected-row "
                         f"threshold {num(c.get('threshold'))}: passes {num(c.get('pass_rate'))}, kept error "
                         f"{num(c.get('kept_error'))}")
    return "\n".join(lines)


__all__ = ["BOUNDS", "CalibrateConfig", "calibrate_decode_time", "kept_point", "parse_calibrate_config", "summary",
           "threshold_for_kept_budget", "val_prompts", "wilson_upper"]
