"""The verifier's LightningModule: wraps the plain `Verifier` (sprinter.verifier) for training. Each step is the
weighted BCE of baselines.py; each validation epoch logs AUROC, AP, accuracy, calibration error, the true-accept
rate at the default budget, a score histogram and a PR curve, and keeps the best epoch (val AUROC) as a
safetensors file. The training driver is sprinter.train.fit; the decode path never imports this file.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from torchmetrics.aggregation import CatMetric

from sprinter.errors import SprinterError
from sprinter.features import HIDDEN_PREV
from sprinter.files import write_json
from sprinter.schedule import warmup_cosine
from sprinter.train.baselines import weighted_bce
from sprinter.train.calibrate import operating_point, summarize, threshold_for_budget
from sprinter.train.data import TokenTable
from sprinter.verifier import HIDDEN, Verifier, VerifierInfo, budget_key, save_verifier

# A weighted BCE this large means logits in the thousands on the wrong side: the run has diverged (a poor but
# sane verifier stays near ln 2 times the class weights).
LOSS_LIMIT = 1e4


class VerifierModule(L.LightningModule):
    """Wraps the plain Verifier for training; keeps the best-AUROC epoch as a safetensors file."""

    def __init__(self, info: dict, cfg: dict, pos_weight: float, neg_weight: float, best_file: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.info = VerifierInfo(**info)
        self.verifier = Verifier(self.info)
        self.cfg, self.pos_weight, self.neg_weight, self.best_file = cfg, pos_weight, neg_weight, best_file
        # gathered over DDP ranks at compute(); NaN kept, for check_finite to see
        self.val_scores, self.val_labels = CatMetric(nan_strategy="disable"), CatMetric(nan_strategy="disable")
        self.best_auroc, self.best_epoch = -1.0, -1
        self.worst = torch.tensor(0.0)  # the epoch's largest train loss (NaN if any was): read once an epoch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = weighted_bce(self.verifier(batch), batch["label"], self.pos_weight, self.neg_weight)
        self.worst = torch.maximum(self.worst.to(loss.device), loss.detach())  # no host sync per step
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.verifier(batch)
        loss = weighted_bce(logits, batch["label"], self.pos_weight, self.neg_weight)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["label"]))
        self.val_scores.update(torch.sigmoid(logits))
        self.val_labels.update(batch["eval_label"])

    def on_validation_epoch_end(self) -> None:
        scores, labels = self.val_scores.compute().float().cpu(), self.val_labels.compute().float().cpu()
        self.val_scores.reset()
        self.val_labels.reset()
        if self.trainer.sanity_checking:
            return
        self.check_finite(scores)
        budget = self.cfg["budgets"][0]
        point = operating_point(scores, labels, threshold_for_budget(scores, labels, budget))
        metrics = summarize(scores, labels)
        # Every rank holds the same gathered scores, so the values agree; sync_dist only averages equals.
        self.log_dict({f"val/{k}": v for k, v in metrics.items() if k != "accept_rate"}, sync_dist=True)
        self.log(f"val/true_accept@{budget_key(budget)}", point["true_accept"], prog_bar=True, sync_dist=True)
        if metrics["auroc"] > self.best_auroc:
            self.best_auroc, self.best_epoch = metrics["auroc"], self.current_epoch
            if self.trainer.is_global_zero:
                save_verifier(self.best_file, self.verifier, self.info)
                write_json(Path(self.best_file).with_suffix(".json"),
                           {"epoch": self.best_epoch, "auroc": self.best_auroc})
        if self.trainer.is_global_zero and isinstance(self.logger, L.pytorch.loggers.TensorBoardLogger):
            board, step = self.logger.experiment, self.current_epoch
            board.add_histogram("val/score_accepted", scores[labels >= 0.5], step)
            board.add_histogram("val/score_rejected", scores[labels < 0.5], step)
            board.add_pr_curve("val/pr_curve", labels.int(), scores, step)

    def check_finite(self, scores: torch.Tensor) -> None:
        """Stop a diverging run with one line, before anything of this epoch is saved: the best epoch so far and
        the last checkpoint stay as they were."""
        worst = float(self.worst)
        self.worst = torch.tensor(0.0)
        if worst <= LOSS_LIMIT and bool(torch.isfinite(scores).all()) \
                and all(bool(torch.isfinite(p).all()) for p in self.verifier.parameters()):
            return
        lr = self.cfg["lr"]
        kept = (f"the best epoch so far ({self.best_epoch}) is kept in {self.best_file!r}" if self.best_epoch >= 0
                else "no epoch had finished")
        raise SprinterError(f"training diverged in epoch {self.current_epoch}: the train loss reached {worst:g} "
                            f"(or the verifier's scores became NaN) at lr {lr:g}; expected a finite loss below "
                            f"{LOSS_LIMIT:g}: rerun with a smaller "
                            f"--lr (e.g. {lr / 100:g}) and --overwrite; {kept}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best"] = {"auroc": self.best_auroc, "epoch": self.best_epoch}
        # Dropout draws its masks from torch's global generator (batches are shuffled by their own, seeded per
        # epoch): keeping its state makes a resumed run draw the masks the uninterrupted one would have.
        checkpoint["rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_auroc, self.best_epoch = checkpoint["best"]["auroc"], checkpoint["best"]["epoch"]
        if "rng" in checkpoint:  # checkpoints written before it was kept resume as before
            torch.set_rng_state(checkpoint["rng"])

    def configure_optimizers(self):
        cfg = self.cfg
        if cfg["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
        elif cfg["optimizer"] == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=cfg["lr"])
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        if cfg["schedule"] == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:  # linear warmup, then cosine decay to 0
            return warmup_cosine(step, total, cfg["warmup_fraction"])

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}



def feature_statistics(table: TokenTable, info: VerifierInfo, rows: torch.Tensor, seed: int, max_rows: int = 100_000):
    """Mean and std of the hidden state and each scalar feature over (a sample of) the train rows."""
    if len(rows) > max_rows:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_rows]].sort().values
    hidden = table.gather(HIDDEN, rows).float()  # (n, H)
    scalars = torch.stack([table.gather(f, rows).float() for f in info.scalar_features], dim=-1) \
        if info.scalar_features else torch.zeros(len(rows), 0)
    stats = [hidden.mean(0), hidden.std(0), scalars.mean(0), scalars.std(0)]
    if HIDDEN_PREV in info.features:
        prev = table.gather(HIDDEN_PREV, rows).float()  # (n, H)
        stats += [prev.mean(0), prev.std(0)]
    return stats



def epochs_left_bar():
    """Lightning's progress bar, whose description also says how long the remaining epochs take at most: each
    epoch so far (training and validation) took its mean time, and early stopping may end the run sooner.
    Lightning's own bar times only the epoch it is in."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from tqdm import tqdm

    class EpochsLeftBar(TQDMProgressBar):
        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            self.started, self.first_epoch = time.perf_counter(), trainer.current_epoch  # a resumed run: from there

        def on_train_epoch_start(self, trainer, *args) -> None:
            super().on_train_epoch_start(trainer, *args)
            epoch, done = trainer.current_epoch, trainer.current_epoch - self.first_epoch
            text = f"Epoch {epoch + 1}/{trainer.max_epochs}"
            if done:
                left = (time.perf_counter() - self.started) / done * (trainer.max_epochs - epoch)
                text += f" (at most {tqdm.format_interval(left)} left)"
            self.train_progress_bar.set_description(text)

    return EpochsLeftBar()


__all__ = ["VerifierModule", "epochs_left_bar", "feature_statistics", "LOSS_LIMIT"]
