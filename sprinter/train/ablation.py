"""The verifier ablation: one change at a time against the default, on the same splits, judged the same way.

Each row is a full `train()` run (sprinter.train.fit: train on `train`, best epoch and thresholds on `val`)
into RUNS/NAME; the row is then re-scored here on the greedy label (`accept_greedy`, what decoding at
temperature 0 accepts), so rows trained on other labels (sprinter, soft) are judged on the same label as
the rest. Thresholds are chosen on val, figures reported on test. The cost column is the decode-time gate:
the median time of one `LearnedGate.accept_prob` call on one thread, beside the draft's own step (a
one-token forward with its cache) timed the same way.

Writes OUT/ablation.json and OUT/ablation.md (scripts/ablate_verifier.py).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from sprinter.config import SeedConfig, ThreadsConfig, option
from sprinter.decode.drafters import DraftStep
from sprinter.decode.gates import LearnedGate
from sprinter.errors import SprinterError
from sprinter.features import HIDDEN_PREV
from sprinter.files import read_json, write_atomic, write_json
from sprinter.train.baselines import score_rows
from sprinter.train.calibrate import evaluate
from sprinter.train.data import TokenTable, first_prompts, split_prompts
from sprinter.train.fit import FEATURES, TrainConfig, train
from sprinter.verifier import budget_key, load_verifier

TOPK = ("draft_max_prob", "draft_top2_prob", "draft_top3_prob", "draft_top4_prob", "draft_margin")
BLOCK = ("prev_draft_prob", "block_cum_prob")
BUDGETS = (0.02, 0.05, 0.1)

# name -> (what changes, TrainConfig overrides). The first row is the default every other row changes once.
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("today's default: hidden, token_id, draft_prob, draft_entropy; MLP 256 x 2; greedy; balanced", {}),
    "data-400": ("the default trained on 320 train prompts (today's data size)", {"train_prompts": 320}),
    "data-800": ("the default trained on 640 train prompts", {"train_prompts": 640}),
    "+topk": ("+ top-4 probabilities and margin", {"features": (*FEATURES, *TOPK)}),
    "+prev-layer": ("+ the draft's earlier layer (hidden_states[-2])", {"features": (*FEATURES, HIDDEN_PREV)}),
    "+block": ("+ the block so far (prev_draft_prob, block_cum_prob)", {"features": (*FEATURES, *BLOCK)}),
    "+position": ("+ position in the block", {"features": (*FEATURES, "position")}),
    "-token_id": ("- the token embedding", {"features": tuple(f for f in FEATURES if f != "token_id")}),
    "width-64-depth-1": ("MLP 64 x 1", {"width": 64, "depth": 1}),
    "width-512-depth-3": ("MLP 512 x 3", {"width": 512, "depth": 3}),
    "label-sprinter": ("label q <= p (scored on the greedy label)", {"label_rule": "sprinter"}),
    "label-soft": ("soft label min(1, p/q) (scored on the greedy label)", {"label_rule": "soft"}),
    "neg-weight-1": ("unweighted loss (neg_weight 1)", {"neg_weight": 1.0}),
    "neg-weight-6": ("rejections weighted 6:1 (SpecDec++)", {"neg_weight": 6.0}),
    "all-features": ("+ topk, prev-layer, block, position", {"features": (*FEATURES, *TOPK, HIDDEN_PREV, *BLOCK,
                                                                          "position")}),
    "all-but-position": ("+ topk, prev-layer, block (configs/train/all-features.yaml)",
                {"features": (*FEATURES, *TOPK, HIDDEN_PREV, *BLOCK)}),
}


@dataclass(frozen=True)
class AblationConfig(ThreadsConfig, SeedConfig):
    data: tuple[str, ...] = option(("data/bench-v2",), "decode-context shard folder(s) with the optional columns")
    out: str = option("results/verifiers", "output folder of ablation.json and ablation.md")
    runs: str = option("data/ablation", "folder of the runs, one verifier per row in RUNS/NAME (git-ignored)")
    rows: tuple[str, ...] = option(tuple(ROWS), "rows to run (names of sprinter.train.ablation.ROWS)")
    draft: str | None = option("checkpoints/pairs/bench/draft", "draft whose one-token step the gate is timed "
                                                                  "against (none: skip)")
    timing_calls: int = option(2000, "accept_prob calls timed per row (the median is reported)")
    reuse: bool = option(False, "reuse the finished runs in RUNS (score and time them again, no training)")
    seed: int = option(0, "seed of the split and every run")
    threads: int = option(1, "CPU threads (the gate is timed on one)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))  # a list from YAML: the frozen config keeps a tuple
        object.__setattr__(self, "rows", tuple(self.rows))
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise SprinterError(f"rows: got {unknown}; expected names among {list(ROWS)}")
        if self.timing_calls < 10:
            raise SprinterError(f"timing_calls: got {self.timing_calls!r}; expected at least 10")


def time_gate(gate: LearnedGate, hidden_size: int, vocab_size: int, calls: int) -> float:
    """Median seconds of one accept_prob call (with the host sync the loop does), cycling block positions 0..3."""
    gen = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(vocab_size, generator=gen), -1)
    step = DraftStep(token=q.argmax(), q=q, q_soft=q, hidden=torch.randn(hidden_size, generator=gen),
                     hidden_prev=torch.randn(hidden_size, generator=gen))
    times = []
    with torch.inference_mode():
        for i in range(calls + 50):
            start = time.perf_counter()
            bool(gate.accept_prob(step, i % 4) >= gate.threshold)
            if i >= 50:  # warm-up calls are not counted
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_draft_step(draft: str, calls: int, context: int = 64) -> float:
    """Median seconds of the draft's one-token step (CachedLM.append with its last state), then a rollback."""
    from sprinter.decode.cache import CachedLM
    from sprinter.pairs.load import load_model

    model = load_model(draft, "draft", torch.device("cpu"), torch.float32).eval()
    vocab = model.config.vocab_size
    lm = CachedLM(model, vocab)
    ids = torch.randint(0, vocab, (1, context + 1), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        lm.append(ids[:, :context])
        for i in range(calls + 20):
            start = time.perf_counter()
            logits, _ = lm.append(ids[:, context:], hidden=1)
            int(torch.softmax(logits[0], -1).argmax())
            if i >= 20:
                times.append(time.perf_counter() - start)
            lm.rollback(1)
    return statistics.median(times)


def row_metrics(run: Path, table: TokenTable, splits: dict[str, torch.Tensor]) -> dict:
    """Re-score a run's verifier on the greedy label: thresholds on val, figures on test."""
    verifier, info = load_verifier(run)
    scored = {}
    for name in ("val", "test"):
        scores, _ = score_rows(verifier, table, info.features, "greedy", splits[name])
        scored[name] = (scores, (table.gather("accept_greedy", splits[name]) >= 0.5).float())
    report = evaluate(scored["val"], scored["test"], BUDGETS)
    return {"auroc": report["auroc"], "ap": report["ap"],
            **{f"true_accept@{budget_key(b)}": report["operating_points"][budget_key(b)]["true_accept"]
               for b in BUDGETS},
            **{f"false_accept@{budget_key(b)}": report["operating_points"][budget_key(b)]["false_accept"]
               for b in BUDGETS}}


def ablate(cfg: AblationConfig) -> dict:
    """Run every row; returns (and writes) the table."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    rows = {name: ROWS[name] for name in cfg.rows}
    base = TrainConfig(data=cfg.data, label_rule="greedy", seed=cfg.seed, threads=cfg.threads, progress=False,
                       baselines=False, budgets=(0.05, 0.02, 0.1))
    columns = ["prompt_index", "accept_greedy", *{f for _, o in rows.values() for f in o.get("features", FEATURES)},
               *FEATURES]
    table = TokenTable(cfg.data, list(dict.fromkeys(columns)))
    prompt_index = table.column("prompt_index")
    splits = split_prompts(prompt_index, base.val_fraction, base.test_fraction, cfg.seed)  # as train() splits
    results: dict[str, dict] = {}
    draft_times = []
    for name, (what, overrides) in rows.items():
        run_cfg = dataclasses.replace(base, out=str(Path(cfg.runs) / name), **overrides)
        if cfg.reuse and (Path(cfg.runs) / name / "metrics.json").is_file():
            metrics = read_json(Path(cfg.runs) / name / "metrics.json", f"run {name!r}")
            seconds = metrics["train_seconds"]
        else:
            started = time.perf_counter()
            metrics = train(run_cfg)
            seconds = time.perf_counter() - started
        row_splits = dict(splits)
        if run_cfg.train_prompts:
            row_splits["train"] = first_prompts(prompt_index, splits["train"], run_cfg.train_prompts)
        row = {"what": what, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
               "train_samples": len(row_splits["train"]), "train_seconds": round(seconds, 1),
               "best_epoch": metrics["best_epoch"], **row_metrics(Path(cfg.runs) / name, table, row_splits)}
        verifier, info = load_verifier(Path(cfg.runs) / name)
        gate = LearnedGate(verifier, info.features, info.default_threshold)
        row["gate_ms"] = 1e3 * time_gate(gate, info.hidden_size, int(info.arch["vocab_size"]) or 2048,
                                         cfg.timing_calls)
        if cfg.draft:  # timed right after the gate, so both see the same load on a shared machine
            draft_times.append(time_draft_step(cfg.draft, cfg.timing_calls))
            row["draft_step_ms"] = 1e3 * draft_times[-1]
            row["gate_over_draft_step"] = row["gate_ms"] / row["draft_step_ms"]
        results[name] = row
        print(f"{name:<20} AUROC {row['auroc']:.3f}  true-accept@0.05 {row['true_accept@0.05']:.3f}  "
              f"gate {row['gate_ms']:.3f} ms  ({seconds:.0f} s)", flush=True)
    table_out = {"data": list(cfg.data), "label": "accept_greedy", "budgets": list(BUDGETS), "seed": cfg.seed,
                 "splits": {k: {"samples": len(v), "prompts": int(prompt_index[v].unique().numel())}
                            for k, v in splits.items()},
                 "draft_step_ms": 1e3 * statistics.median(draft_times) if draft_times else None, "rows": results}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", table_out)
    write_atomic(out / "ablation.md", markdown(table_out))
    return table_out


def markdown(table: dict) -> str:
    """The ablation as a markdown table (docs/training.md holds a copy)."""
    draft = table.get("draft_step_ms")
    lines = [f"Test split: {table['splits']['test']['samples']} rows ({table['splits']['test']['prompts']} prompts); "
             f"label {table['label']}; thresholds chosen on val ({table['splits']['val']['samples']} rows). "
             f"Gate cost: median LearnedGate.accept_prob, one thread, over the draft's one-token step timed after it"
             + (f" (median over rows {draft:.3f} ms)." if draft else "."), "",
             "| row | change | train rows | AUROC | TA@2% | TA@5% | TA@10% | gate ms | gate / draft step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in table["rows"].items():
        ratio = f"{r['gate_over_draft_step']:.2f}" if "gate_over_draft_step" in r else "-"
        lines.append(f"| {name} | {r['what']} | {r['train_samples']} | {r['auroc']:.3f} | {r['true_accept@0.02']:.3f} "
                     f"| {r['true_accept@0.05']:.3f} | {r['true_accept@0.1']:.3f} | {r['gate_ms']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def run_rows(argv: Sequence[str] | None) -> dict:
    from sprinter.config import parse_config

    return ablate(parse_config(AblationConfig, argv, "Ablate the verifier: one change at a time (docs/training.md)."))


__all__ = ["ROWS", "AblationConfig", "ablate", "markdown", "run_rows"]
