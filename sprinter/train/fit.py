"""The training stage: shard folders -> a calibrated verifier.safetensors, metrics.json and a TensorBoard run.

1. Read and check the folders (train_data.open_folders); split by prompt into train/val/test.
2. Train the verifier with Lightning (DDP across devices and nodes when asked); each epoch logs
   AUROC, AP, accuracy, calibration error, the true-accept rate at the default budget, a score
   histogram and a PR curve on val; the best epoch (val AUROC) is kept, `.ckpt` files allow resuming.
3. Calibrate thresholds on val for each false-accept budget; report test figures for the verifier
   and the baselines (baselines.py) fitted on the same splits; write everything beside the verifier.
The test split is read only in step 3, after every choice has been made on val.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from sprinter import __version__
from sprinter.config import CONFIGS, SeedConfig, ThreadsConfig, check_integers, option, parse_config, save_config
from sprinter.data.shards import read_manifest
from sprinter.errors import SprinterError
from sprinter.features import KNOWN
from sprinter.files import FolderLock, read_json, write_json
from sprinter.train.baselines import (
    Scorer,
    draft_prob_scorer,
    fit_plain,
    logistic_regression,
    verifier_scorer,
)
from sprinter.train.calibrate import (
    budget_key,
    evaluate,
    summarize,
)
from sprinter.train.data import (
    EVAL_COLUMN,
    LABEL_COLUMN,
    ShardDataModule,
    TokenTable,
    auto_label_rule,
    check_splits,
    first_prompts,
    open_folders,
    split_prompts,
)
from sprinter.train.folder import FULL, AtomicCheckpointIO, check_out_folder, check_resume, full_disk
from sprinter.train.module import VerifierModule, epochs_left_bar, feature_statistics
from sprinter.verifier import (
    HIDDEN,
    NORMS,
    PROBE_ROWS,
    Verifier,
    VerifierInfo,
    calibrated_rates,
    default_arch,
    load_verifier,
    save_verifier,
)

CONFIG_DIR = CONFIGS / "train"
# `position` is left out by default: it counts within a continuation (corpus data), within a k-block
# (decode data) and within a SPRINTER block at decode time: three meanings a verifier cannot reconcile.
FEATURES = ("hidden", "token_id", "draft_prob", "draft_entropy")


@dataclass(frozen=True)
class TrainConfig(ThreadsConfig, SeedConfig):
    data: tuple[str, ...] = option(("data/demo",), "shard folder(s) from scripts/collect.py (one draft)")
    out: str = option("checkpoints/verifiers/demo", "output folder: verifier.safetensors, metrics.json, TensorBoard")
    features: tuple[str, ...] = option(FEATURES, "verifier inputs: hidden, token_id and scalar columns of the shards")
    label_rule: str = option("auto", "training label: greedy (target argmax = token), sprinter (q <= p), soft "
                                     "(min(1, p/q)), relaxed (p(x) >= 0.5 max p: nearly the target's choice), or "
                                     "auto: greedy for data collected at temperature 0, else sprinter")
    width: int = option(256, "MLP hidden width")
    depth: int = option(2, "MLP hidden layers (0: one linear layer, the paper's verifier)")
    norm: str = option("layer", "normalisation after each hidden layer: layer, rms or none")
    dropout: float = option(0.1, "dropout after each hidden layer")
    token_dim: int = option(16, "size of the learned token embedding (with the token_id feature)")
    neg_weight: float | None = option(None, "loss weight of rejected (label-0) tokens; none: n_accept / n_reject "
                                            "of the train split (balanced); SpecDec++ uses 6")
    pos_weight: float = option(1.0, "loss weight of accepted (label-1) tokens")
    optimizer: str = option("adamw", "adamw, adam or sgd")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.01, "weight decay (adamw, sgd)")
    schedule: str = option("cosine", "learning-rate schedule: cosine (with warmup) or constant")
    warmup_fraction: float = option(0.05, "share of steps with linear warmup (cosine)")
    batch_size: int = option(1024, "samples per optimizer step and device")
    epochs: int = option(40, "maximum epochs")
    patience: int = option(8, "early stopping: epochs without a better val AUROC (0: off)")
    val_fraction: float = option(0.1, "share of prompts in the validation split (model selection, thresholds)")
    test_fraction: float = option(0.1, "share of prompts in the test split (reported, never used to choose)")
    train_prompts: int = option(0, "train on only this many of the train split's prompts, the lowest prompt "
                                   "indices first (0: all): a data-size curve over the same val/test splits")
    budgets: tuple[float, ...] = option((0.05, 0.02, 0.1, 0.2),
                                        "false-accept budgets to calibrate; the first is the default")
    eval_data: tuple[str, ...] = option((), "extra shard folder(s) scored on the test split's prompts, "
                                            "e.g. decode-time contexts when --data holds corpus contexts")
    baselines: bool = option(True, "also fit and report the baselines (draft_prob, logistic regression, linear)")
    baseline_rows: int = option(200_000, "train rows sampled for the logistic-regression baseline")
    seed: int = option(0, "seed for the split, initialisation and shuffling")
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu, gpu")
    devices: int = option(1, "devices per node (DDP when > 1)")
    num_nodes: int = option(1, "nodes (DDP when > 1)")
    strategy: str = option("auto", "Lightning strategy; auto: ddp when devices * num_nodes > 1")
    precision: str = option("32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed")
    resume: str | None = option(None, "a Lightning .ckpt to resume from, or 'last' for OUT/lightning/last.ckpt")
    overwrite: bool = option(False, "replace a finished (or interrupted) training in --out")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        for name in ("data", "features", "budgets", "eval_data"):  # a list from YAML: the frozen config keeps a tuple
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.resume is not None and self.overwrite:
            raise SprinterError(f"resume and overwrite: got --resume {self.resume!r} and --overwrite; expected at "
                                "most one")
        if self.label_rule not in (*LABEL_COLUMN, "auto"):
            raise SprinterError(f"label_rule: got {self.label_rule!r}; expected one of {(*LABEL_COLUMN, 'auto')}")
        if HIDDEN not in self.features or len(set(self.features)) != len(self.features):
            raise SprinterError(f"features: got {list(self.features)}; expected distinct names including 'hidden'")
        unknown = [f for f in self.features if f not in KNOWN]
        if unknown:  # a column the gate cannot compute at decode time would make a verifier it cannot run
            raise SprinterError(f"features: got {unknown}; expected names the decode-time gate computes: "
                                f"{list(KNOWN)}")
        if self.norm not in NORMS:
            raise SprinterError(f"norm: got {self.norm!r}; expected one of {NORMS}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise SprinterError(f"optimizer: got {self.optimizer!r}; expected adamw, adam or sgd")
        if self.schedule not in ("cosine", "constant"):
            raise SprinterError(f"schedule: got {self.schedule!r}; expected cosine or constant")
        check_integers(self, ("width", "batch_size", "epochs", "devices", "num_nodes", "token_dim", "baseline_rows"))
        check_integers(self, ("depth", "patience", "threads", "train_prompts"), minimum=0)
        if not 0 <= self.dropout < 1:
            raise SprinterError(f"dropout: got {self.dropout!r}; expected 0 <= dropout < 1")
        if not (self.lr > 0 and self.pos_weight > 0 and (self.neg_weight is None or self.neg_weight > 0)):
            raise SprinterError(f"lr/pos_weight/neg_weight: got {self.lr}/{self.pos_weight}/{self.neg_weight}; "
                                "expected positive numbers")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise SprinterError(f"val_fraction/test_fraction: got {self.val_fraction}/{self.test_fraction}; expected "
                                "two shares in (0, 1) summing below 1")
        if not self.budgets or not all(0 < b < 1 for b in self.budgets):
            raise SprinterError(f"budgets: got {list(self.budgets)}; expected false-accept rates in (0, 1)")
        # Checked here, not by Lightning or torch, so a bad value is refused in one line before any data is read.
        if not 0 <= self.warmup_fraction < 1:
            raise SprinterError(f"warmup_fraction: got {self.warmup_fraction!r}; expected a share in [0, 1)")
        if not 0 <= self.weight_decay < math.inf:
            raise SprinterError(f"weight_decay: got {self.weight_decay!r}; expected a finite number >= 0")
        if not all(math.isfinite(w) for w in (self.lr, self.pos_weight, self.neg_weight or 1.0)):
            raise SprinterError(f"lr/pos_weight/neg_weight: got {self.lr}/{self.pos_weight}/{self.neg_weight}; "
                                "expected finite numbers")
        check_trainer_options(self.accelerator, self.strategy, self.precision, self.devices)


TRAINER_PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


def check_trainer_options(accelerator: str, strategy: str, precision: str, devices: int) -> None:
    """The Lightning options, against what Lightning offers and what this machine has."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    accelerators = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
    if accelerator not in accelerators:
        raise SprinterError(f"accelerator: got {accelerator!r}; expected one of {accelerators}")
    if accelerator in ("gpu", "cuda") and torch.cuda.device_count() < devices:
        raise SprinterError(f"accelerator: got {accelerator!r} with devices={devices}; this machine has "
                            f"{torch.cuda.device_count()} CUDA GPU(s): expected --accelerator cpu (or auto)")
    strategies = ("auto", *StrategyRegistry.available_strategies())
    if strategy not in strategies:
        raise SprinterError(f"strategy: got {strategy!r}; expected auto or one of Lightning's: "
                            f"{', '.join(strategies[1:8])}, ...")
    if precision not in TRAINER_PRECISIONS:
        raise SprinterError(f"precision: got {precision!r}; expected one of {TRAINER_PRECISIONS}")


def parse_train_config(argv: Sequence[str] | None) -> TrainConfig:
    return parse_config(TrainConfig, argv, "Train a verifier on collected shards (presets: configs/train/*.yaml).")


# ------------------------------------------------------------------------------------------ pipeline
def make_trainer(cfg: TrainConfig, out: Path) -> L.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    callbacks = [epochs_left_bar()] if cfg.progress else []
    callbacks += [ModelCheckpoint(dirpath=out / "lightning", filename="best", monitor="val/auroc", mode="max",
                                 save_last=True, enable_version_counter=False)]
    if cfg.patience:
        callbacks.append(EarlyStopping(monitor="val/auroc", mode="max", patience=cfg.patience))
    strategy = cfg.strategy
    if strategy == "auto" and cfg.devices * cfg.num_nodes > 1:
        strategy = "ddp"
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
                         precision=cfg.precision, max_epochs=cfg.epochs, callbacks=callbacks,
                         logger=TensorBoardLogger(save_dir=str(out), name="tensorboard"),
                         use_distributed_sampler=False,  # the BatchSampler shards rows over ranks itself
                         num_sanity_val_steps=0, log_every_n_steps=50, enable_progress_bar=cfg.progress,
                         enable_model_summary=cfg.progress, plugins=[AtomicCheckpointIO()])
    except (MisconfigurationException, ValueError, RuntimeError) as err:  # a combination Lightning refuses
        raise SprinterError(f"trainer options (accelerator={cfg.accelerator!r}, devices={cfg.devices}, "
                            f"strategy={strategy!r}, precision={cfg.precision!r}): "
                            f"{str(err).strip().splitlines()[0]}") from None


def train(cfg: TrainConfig) -> dict:
    """Run the stage; returns the metrics written to OUT/metrics.json ({} on DDP ranks other than 0). OUT is
    locked for the run: a second train into it is refused. A write that finds no space is one line with advice
    that works (folder.full_disk); Ctrl-C is a KeyboardInterrupt (the CLI: one line, exit 130)."""
    with FolderLock(cfg.out, "train"):
        try:
            return _train(cfg)
        except OSError as err:
            if err.errno in FULL:
                raise full_disk(err, Path(cfg.out)) from None
            raise


def _train(cfg: TrainConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_out_folder(Path(cfg.out), cfg.resume, cfg.overwrite)
    # 1. Check the data and split it by prompt: every refusal happens here, before training.
    if cfg.label_rule == "auto":
        cfg = dataclasses.replace(cfg, label_rule=auto_label_rule([read_manifest(p) for p in cfg.data]))
    manifests, table = open_folders(cfg.data, cfg.features, cfg.label_rule)
    for path in cfg.eval_data:  # read only after training, but checked now: a typo should not cost a training run
        read_manifest(path)
    manifest = manifests[0]
    splits = split_prompts(table.column("prompt_index"), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if cfg.train_prompts:
        splits["train"] = first_prompts(table.column("prompt_index"), splits["train"], cfg.train_prompts)
    sizes = check_splits(table, splits, cfg.label_rule)
    out = Path(cfg.out)
    resume = str(out / "lightning" / "last.ckpt") if cfg.resume == "last" else cfg.resume
    if resume is not None and not Path(resume).is_file():
        raise SprinterError(f"resume: got {cfg.resume!r}; expected a Lightning .ckpt file (or 'last' with one in "
                            f"{str(out / 'lightning')!r})")
    train_labels = table.column(LABEL_COLUMN[cfg.label_rule])[splits["train"]].double()
    neg_weight = cfg.neg_weight or float(train_labels.sum() / (1 - train_labels).sum())  # balanced by default
    info = VerifierInfo(features=cfg.features, hidden_size=int(manifest["hidden_size"]),
                        arch=default_arch(width=cfg.width, depth=cfg.depth, norm=cfg.norm, dropout=cfg.dropout,
                                          token_dim=cfg.token_dim, vocab_size=int(manifest.get("vocab_size", 0))),
                        label_rule=cfg.label_rule, draft=dict(manifest.get("draft", {})),
                        target=dict(manifest.get("target", {})), context_source=manifest.get("context_source"),
                        default_budget=cfg.budgets[0], sprinter_version=__version__)
    out.mkdir(parents=True, exist_ok=True)
    best_file = out / "lightning" / "best-epoch.safetensors"
    L.seed_everything(cfg.seed, verbose=False)
    module = VerifierModule(dataclasses.asdict(info), dataclasses.asdict(cfg), cfg.pos_weight, neg_weight,
                            str(best_file))
    stats = feature_statistics(table, info, splits["train"], cfg.seed)
    module.verifier.set_normalisation(*stats)
    if resume is not None:
        check_resume(Path(resume), module)
    datamodule = ShardDataModule(cfg.data, cfg.features, cfg.label_rule, splits, cfg.batch_size, cfg.seed)
    # 2. Train; the best epoch by val AUROC is written to best_file as it happens.
    trainer = make_trainer(cfg, out)
    start = time.perf_counter()
    with warnings.catch_warnings(), quiet_interrupt():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # batches are gathered whole
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        except SystemExit:  # Lightning turns Ctrl-C into exit(1): say it as the interruption it is
            if trainer.interrupted:
                raise KeyboardInterrupt(
                    "training stopped; rerun the same command with --resume last to continue from the last finished "
                    f"epoch ({str(out / 'lightning' / 'last.ckpt')!r}; with none yet, rerun it as it was)") from None
            raise
    seconds = time.perf_counter() - start
    if trainer.global_rank != 0:
        return {}

    # 3. Calibrate on val, report on test (the first and only read of the test split's scores).
    verifier, _ = load_verifier(best_file)
    scorers: dict[str, Scorer] = {"verifier": verifier_scorer(verifier, cfg.features, cfg.label_rule)}
    if cfg.baselines:
        linear, linear_info = fit_linear(cfg, table, splits, info, verifier, neg_weight)
        scorers.update(draft_prob=draft_prob_scorer,
                       logistic_regression=logistic_regression(verifier, table, EVAL_COLUMN[cfg.label_rule],
                                                               splits["train"], max_rows=cfg.baseline_rows,
                                                               pos_weight=cfg.pos_weight, neg_weight=neg_weight,
                                                               seed=cfg.seed),
                       linear=verifier_scorer(linear, (HIDDEN,), cfg.label_rule))
    label = lambda t, rows: eval_labels(t, rows, cfg.label_rule)  # noqa: E731
    val = {name: (score(table, splits["val"]), label(table, splits["val"])) for name, score in scorers.items()}
    reports = {name: evaluate(val[name], (score(table, splits["test"]), label(table, splits["test"])), cfg.budgets)
               for name, score in scorers.items()}
    probe = probe_rows(table, splits["val"], cfg.features, cfg.seed)
    save_verifier(out, verifier, calibrated(info, reports["verifier"], cfg.budgets), probe)
    if cfg.baselines:
        save_verifier(out / "baselines" / "linear", linear, calibrated(linear_info, reports["linear"], cfg.budgets),
                      probe)
    save_config(cfg, out / "train_config.json")
    eval_label = LABEL_COLUMN["soft"] if cfg.label_rule == "soft" else EVAL_COLUMN[cfg.label_rule]  # eval_labels'
    metrics = {"label_rule": cfg.label_rule, "eval_label": eval_label,
               "default_budget": cfg.budgets[0], "data": [str(p) for p in cfg.data], "draft": info.draft,
               "context_source": info.context_source, "splits": sizes, "pos_weight": cfg.pos_weight,
               "neg_weight": neg_weight, "epochs_run": trainer.current_epoch,
               "best_epoch": read_json(best_file.with_suffix(".json"), "best epoch")["epoch"],
               "train_seconds": round(seconds, 2), "verifier": reports.pop("verifier"), "baselines": reports,
               "eval_data": {}}
    test_prompts = table.column("prompt_index")[splits["test"]].unique()
    for path in cfg.eval_data:  # other context sources, scored on the test prompts only
        other_manifests, other = open_folders([path], cfg.features, cfg.label_rule, like=cfg.data[0])
        rows = torch.isin(other.column("prompt_index"), test_prompts).nonzero().squeeze(1)
        if len(rows) == 0 or label(other, rows).min() == label(other, rows).max():
            raise SprinterError(f"eval_data {path!r}: its rows on the test split's prompts hold one class or none; "
                                "expected both (it must share the prompt list of --data)")
        metrics["eval_data"][str(path)] = {
            "samples": len(rows), "context_source": other_manifests[0].get("context_source"),
            **{name: evaluate(val[name], (score(other, rows), label(other, rows)), cfg.budgets)
               for name, score in scorers.items()}}
    write_json(out / "metrics.json", metrics)
    return metrics


def probe_rows(table: TokenTable, rows: torch.Tensor, features: Sequence[str], seed: int) -> dict[str, torch.Tensor]:
    """A few validation rows, stored in the checkpoint: a load checks that the verifier still scores them as it
    did (sprinter.verifier_checks.check_probe)."""
    generator = torch.Generator().manual_seed(seed)
    rows = rows[torch.randperm(len(rows), generator=generator)[:PROBE_ROWS]].sort().values
    return {f: table.gather(f, rows) for f in features}


@contextlib.contextmanager
def quiet_interrupt():
    """Ctrl-C during fit: no "Detected KeyboardInterrupt" line from Lightning (the CLI prints its own one line),
    and SIGINT handled again afterwards (Lightning leaves it ignored)."""
    import logging
    import signal

    handler = signal.getsignal(signal.SIGINT)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    drop = logging.Filter()
    drop.filter = lambda record: "KeyboardInterrupt" not in record.getMessage()  # type: ignore[method-assign]
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
        if signal.getsignal(signal.SIGINT) != handler:
            signal.signal(signal.SIGINT, handler)


def eval_labels(table, rows: torch.Tensor, label_rule: str) -> torch.Tensor:
    """The labels thresholds are calibrated and reported on: 0/1 (EVAL_COLUMN, >= 0.5), and for label rule soft
    the soft label itself, min(1, p/q): at temperature > 0 the event a pass risks is the speculative-sampling
    rejection, and calibrate.py weighs each token by its probability, 1 - min(1, p/q)."""
    if label_rule == "soft":
        return table.gather(LABEL_COLUMN["soft"], rows).float().clamp(0, 1)
    return (table.gather(EVAL_COLUMN[label_rule], rows) >= 0.5).float()


def calibrated(info: VerifierInfo, report: dict, budgets: Sequence[float]) -> VerifierInfo:
    """info with the thresholds chosen on val (the first budget's is the default)."""
    thresholds = {k: p["threshold"] for k, p in report["operating_points"].items()}
    return dataclasses.replace(info, thresholds=thresholds, default_threshold=thresholds[budget_key(budgets[0])],
                               rates=calibrated_rates(report))


def fit_linear(cfg: TrainConfig, table: TokenTable, splits: dict, info: VerifierInfo, verifier: Verifier,
               neg_weight: float) -> tuple[Verifier, VerifierInfo]:
    """The paper's Linear(H, 1), trained with the MLP's loss, weights, lr and best-epoch rule."""
    linear_info = dataclasses.replace(info, features=(HIDDEN,), arch=default_arch(depth=0), thresholds={})
    linear = Verifier(linear_info)
    linear.set_normalisation(verifier.hidden_mean, verifier.hidden_std, torch.zeros(0), torch.ones(0))
    fit_plain(linear, table, (HIDDEN,), splits, cfg, neg_weight=neg_weight,
              auroc=lambda scores, labels: summarize(scores, labels)["auroc"])
    return linear, linear_info


def summary_lines(metrics: dict) -> list[str]:
    """A small table of the test figures: each scorer's AUROC, AP and its default operating point."""
    key = budget_key(metrics["default_budget"])
    rows = [("verifier", metrics["verifier"]), *metrics["baselines"].items()]
    lines = [f"test split ({metrics['splits']['test']['samples']} samples, label {metrics['eval_label']}); "
             f"thresholds calibrated on val for a false-accept budget of {key}",
             f"{'scorer':<20} {'AUROC':>6} {'AP':>6} {'threshold':>9} {'false-acc':>9} {'true-acc':>8}"]
    for name, m in rows:
        p = m["operating_points"][key]
        lines.append(f"{name:<20} {m['auroc']:6.3f} {m['ap']:6.3f} {p['threshold']:9.4f} {p['false_accept']:9.3f} "
                     f"{p['true_accept']:8.3f}")
    return lines
