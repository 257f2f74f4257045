"""The data-scaling curve, read on decode-time contexts (scripts/scaling_curve.py).

Each verifier was trained (scripts/train.py) on more or fewer rows of the same prompt list, so they share their
`test` prompts. The curve scores every verifier on one on-policy collection's rows of those test prompts (the
contexts a verifier's own decode loop reaches; sprinter.train.recalibrate.folder_rows: decoded and labelled at the
collection's temperature) and reports, against the training rows:

- AUROC and the true-accept rate at a false-accept rate of `budget` (the share of rejected tokens passed, the
  classifier's operating point as scripts/train.py reports it), at the threshold that gives exactly that rate on
  these rows: what the verifier can separate, apart from calibration;
- the same two figures on the training collection's own test rows (metrics.json), and what the threshold
  calibrated there passes on the decode-time rows: the shift between collected and decode-time rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sprinter.config import ThreadsConfig, option, parse_config, to_dict
from sprinter.errors import SprinterError
from sprinter.files import FolderLock, read_json, write_atomic, write_json
from sprinter.verifier import budget_key


@dataclass(frozen=True)
class ScalingConfig(ThreadsConfig):
    """scripts/scaling_curve.py's options."""

    verifiers: tuple[str, ...] = option((), "verifier folders trained on different amounts of rows of one prompt list")
    data: str = option("", "an on-policy collection over that prompt list (scripts/collect.py --source onpolicy): "
                           "its rows on the verifiers' test prompts are the decode-time contexts")
    budget: float = option(0.05, "the false-accept rate the true-accept rate is read at")
    out: str = option("results/scaling", "output folder for results.json, results.md and scaling.png")

    def __post_init__(self) -> None:
        object.__setattr__(self, "verifiers", tuple(self.verifiers))
        if not self.verifiers:
            raise SprinterError("verifiers: got none; expected one or more verifier folders (scripts/train.py --out)")
        if not self.data:
            raise SprinterError("data: got nothing; expected an on-policy collection (scripts/collect.py --source "
                                "onpolicy --verifier V)")
        if isinstance(self.budget, bool) or not 0 < self.budget < 1:
            raise SprinterError(f"budget: got {self.budget!r}; expected a false-accept rate in (0, 1)")


def parse_scaling_config(argv: Sequence[str] | None) -> ScalingConfig:
    return parse_config(ScalingConfig, argv, "True-accept rate against training rows, on decode-time contexts.")


def curve_point(verifier_dir: str, data: str, budget: float) -> dict:
    """One verifier's row of the curve."""
    from sprinter.train.calibrate import operating_point, summarize, threshold_for_budget
    from sprinter.train.recalibrate import folder_rows, val_prompts
    from sprinter.verifier import load_verifier

    verifier, info = load_verifier(verifier_dir)
    test, train_cfg = val_prompts(Path(verifier_dir), "test")
    temperature, part = folder_rows(data, verifier, info, test, train_cfg)
    scores, labels = part["scores"], (part["labels"] >= 0.5).float()  # soft labels (T > 0): judged at >= 0.5
    metrics = read_json(Path(verifier_dir) / "metrics.json", "metrics.json")
    collected = metrics["verifier"]["operating_points"].get(budget_key(budget), {})
    threshold = info.thresholds.get(budget_key(budget))
    if labels.min() == labels.max():  # one class: no AUROC, no false-accept rate
        raise SprinterError(f"data {data!r}: its {part['rows']} rows on the test prompts of {verifier_dir!r} hold one "
                            "class; expected accepted and rejected tokens (collect more prompts or tokens)")
    return {"verifier": verifier_dir, "data": train_cfg["data"], "train_rows": metrics["splits"]["train"]["samples"],
            "train_prompts": metrics["splits"]["train"]["prompts"], "temperature": temperature,
            "decode_time": {"rows": part["rows"], "prompts": part["prompts"],
                            "auroc": summarize(scores, labels, probabilities=False)["auroc"],
                            **operating_point(scores, labels, threshold_for_budget(scores, labels, budget)),
                            "at_collected_threshold": None if threshold is None
                            else operating_point(scores, labels, threshold)},
            "collected": {"auroc": metrics["verifier"].get("auroc"), "true_accept": collected.get("true_accept"),
                          "false_accept": collected.get("false_accept")}}


def markdown(results: dict) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    b = results["config"]["budget"]
    lines = [f"# True-accept at {b} false-accept against training rows, on decode-time contexts", "",
             f"Decode-time rows: {results['config']['data']} on the verifiers' test prompts; {results['cpu']}.", "",
             "| verifier | training data | train rows | decode-time AUROC | decode-time TA @ exact FA | collected-test "
             "AUROC | collected-test TA (FA) | collected threshold on decode-time rows: TA (FA) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["points"]:
        d, c = r["decode_time"], r["collected"]
        at = d["at_collected_threshold"] or {}
        lines.append(f"| {r['verifier']} | {', '.join(r['data'])} | {r['train_rows']} | {num(d['auroc'])} | "
                     f"{num(d['true_accept'])} | {num(c['auroc'])} | {num(c['true_accept'])} "
                     f"({num(c['false_accept'])}) | {num(at.get('true_accept'))} ({num(at.get('false_accept'))}) |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}  # one line per training source: more rows of the same kind of data
    for r in sorted(results["points"], key=lambda r: r["train_rows"]):
        groups.setdefault(" + ".join(r["data"]), []).append(r)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (source, points) in enumerate(groups.items()):
        rows, color = [r["train_rows"] for r in points], f"C{i}"
        ax.plot(rows, [r["decode_time"]["true_accept"] for r in points], "o-", color=color,
                label=f"{source}: decode-time rows")
        ax.plot(rows, [r["collected"]["true_accept"] for r in points], "s--", color=color, mfc="none",
                label=f"{source}: its own test rows")
    ax.set_xscale("log")
    ax.set_xlabel("training rows (the verifier's train split)")
    ax.set_ylabel(f"true-accept at {results['config']['budget']} false-accept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: ScalingConfig) -> dict:
    from sprinter.bench.protocol import hardware

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    with FolderLock(out, "scaling"):
        results = {"config": to_dict(cfg), "cpu": hardware(torch.device("cpu"), torch.float32)["cpu"],
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "points": [curve_point(v, cfg.data, cfg.budget) for v in cfg.verifiers]}
        write_json(out / "results.json", results)
        write_atomic(out / "results.md", markdown(results))
        plot(results, out / "scaling.png")
    return results


__all__ = ["ScalingConfig", "curve_point", "markdown", "parse_scaling_config", "run"]
