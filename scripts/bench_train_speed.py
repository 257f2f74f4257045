"""How long one training epoch takes: python scripts/bench_train_speed.py [--rows 1000000] [--threads 2]

Writes a synthetic shard folder (once; fp16 hidden states, like a collect run), then times
(1) the batch loader alone (memory-mapped gather, whole batches),
(2) the same rows through a per-row Dataset + default collate (the usual PyTorch pattern), extrapolated,
(3) one Lightning epoch of the default 2 x 256 MLP over every row (the path scripts/train.py takes).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from sprinter.config import ArgumentParser
from sprinter.data.synthetic import write_shards
from sprinter.errors import SprinterError, run_cli
from sprinter.train.data import ShardDataModule, loader, open_folders
from sprinter.train.fit import FEATURES, TrainConfig
from sprinter.train.module import VerifierModule, feature_statistics
from sprinter.verifier import VerifierInfo, default_arch


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="samples in the synthetic set")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--folder", default="/tmp/sprinter-bench-shards", help="where the synthetic shards go (reused)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    for name in ("rows", "hidden_size", "batch_size"):
        if getattr(args, name) < 1:
            raise SprinterError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; expected an integer >= 1")
    if args.rows < 20:
        raise SprinterError(f"--rows: got {args.rows}; expected at least 20 (one prompt of 20 tokens)")
    if not 1 <= args.threads <= cores:
        raise SprinterError(f"--threads: got {args.threads}; expected an integer in [1, {cores}]")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    folder = Path(args.folder) / f"{args.rows}x{args.hidden_size}"
    if not (folder / "manifest.json").is_file():
        write_shards(folder, num_prompts=args.rows // 20, tokens_per_prompt=20, hidden_size=args.hidden_size,
                     vocab_size=2048, num_shards=max(1, args.rows // 250_000))
    _, table = open_folders([folder], FEATURES, "sprinter")
    rows = torch.arange(len(table))
    figures = {"rows": len(table), "hidden_size": args.hidden_size, "threads": args.threads,
               "batch_size": args.batch_size}

    start = time.perf_counter()
    for _ in loader(table, FEATURES, "sprinter", rows, args.batch_size, shuffle=True):
        pass
    figures["loader_epoch_s"] = round(time.perf_counter() - start, 2)

    sample = rows[torch.randperm(len(rows))[:20_000]]
    per_row = DataLoader(PerRow(table), batch_size=args.batch_size, sampler=sample.tolist())
    start = time.perf_counter()
    for _ in per_row:
        pass
    figures["per_row_loader_epoch_s_extrapolated"] = round((time.perf_counter() - start) * len(rows) / len(sample), 1)

    cfg = TrainConfig(data=(str(folder),), batch_size=args.batch_size)
    info = VerifierInfo(features=FEATURES, hidden_size=args.hidden_size,
                        arch=default_arch(width=cfg.width, depth=cfg.depth, vocab_size=2048))
    module = VerifierModule(dataclasses.asdict(info), dataclasses.asdict(cfg), 1.0, 1.0, "/tmp/unused.safetensors")
    module.verifier.set_normalisation(*feature_statistics(table, info, rows, seed=0))
    splits = {"train": rows, "val": rows[:0], "test": rows[:0]}
    data = ShardDataModule(cfg.data, FEATURES, "sprinter", splits, cfg.batch_size, cfg.seed)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    figures["lightning_epoch_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(figures, indent=1))


class PerRow(torch.utils.data.Dataset):
    """The usual pattern, for comparison: one row per __getitem__, batched by default_collate."""

    def __init__(self, table) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = torch.tensor([i])
        return {f: self.table.gather(f, row)[0] for f in (*FEATURES, "accept_sprinter")}


if __name__ == "__main__":
    sys.exit(run_cli(main))
