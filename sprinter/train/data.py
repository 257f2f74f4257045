"""The verifier's training data: checked shard folders, prompt-level splits, fast batches.

Shard folders are the data stage's output, read through `sprinter.data.shards` (manifest checks and
memory-mapped columns: the set is never read whole into RAM). Batches are gathered a batch at a
time: a sampler yields index tensors and the dataset gathers every column for the whole batch at
once, which is ~100x faster than a per-row `__getitem__` + collate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sprinter.data.shards import iter_shards, read_manifest, unlisted_shards
from sprinter.errors import SprinterError, warn
from sprinter.verifier import HIDDEN, LEAKY, TOKEN

LABEL_COLUMN = {"greedy": "accept_greedy", "sprinter": "accept_sprinter", "soft": "accept_soft",
                "relaxed": "accept_relaxed"}
# Metrics and thresholds need a 0/1 label. A soft-label verifier is judged on the paper's label
# (accept_sprinter: q(x) <= p(x), accepted with probability 1), so it compares with the others.
# A relaxed-label verifier is judged on its own label: its false accepts are tokens the target finds much worse
# than its own choice (p(x) < lambda max p), what the relaxed "ratio" rule would reject.
EVAL_COLUMN = {"greedy": "accept_greedy", "sprinter": "accept_sprinter", "soft": "accept_sprinter",
               "relaxed": "accept_relaxed"}


class TokenTable:
    """Columns of one or more shard folders, indexable by global row without loading them whole."""

    def __init__(self, folders: Sequence[str | Path], columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.shards = [mapped for folder in folders for _, mapped in iter_shards(folder, self.columns)]
        sizes = torch.tensor([0] + [len(s[self.columns[0]]) for s in self.shards])
        self.starts = sizes.cumsum(0)  # (S + 1,)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """rows (B,) global row ids -> column values (B, ...), copied out of the maps."""
        if len(self.shards) == 1:
            return self.shards[0][name][rows]
        shard = torch.searchsorted(self.starts, rows, right=True) - 1  # (B,)
        first = self.shards[0][name]
        out = torch.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for s in shard.unique().tolist():
            mask = shard == s
            out[mask] = self.shards[s][name][rows[mask] - self.starts[s]]
        return out

    def column(self, name: str) -> torch.Tensor:
        """A whole 1-D column (for small per-row columns such as labels and prompt ids)."""
        return torch.cat([s[name] for s in self.shards])


def open_folders(paths: Sequence[str | Path], features: Sequence[str], label_rule: str,
                 like: str | Path | None = None) -> tuple[list[dict], TokenTable]:
    """Read and check the folders: manifests and row counts (shards.read_manifest), one draft and hidden
    size (also `like`'s, if given), finite features, both classes. Returns their manifests and a table
    that maps the features, draft_prob, prompt_index and labels."""
    if not paths:
        raise SprinterError("data: got no folder; expected one or more shard folders")
    manifests = [read_manifest(p) for p in paths]
    for path, manifest in zip(paths, manifests):
        extra = unlisted_shards(path, manifest)
        if extra:
            warn(f"data: {str(path)!r} holds shard file(s) {extra[:4]}{' ...' if len(extra) > 4 else ''} that its "
                 "manifest does not list; they are not read (copied in from another collection? move them out)")
    reference = str(like if like is not None else paths[0])
    first = read_manifest(like) if like is not None else manifests[0]
    for path, m in zip(paths, manifests):
        if m.get("hidden_size") != first.get("hidden_size"):
            raise SprinterError(f"data folders disagree on hidden size: {reference!r} has "
                                f"{first.get('hidden_size')}, {str(path)!r} has {m.get('hidden_size')}")
        if m.get("draft", {}).get("fingerprint") != first.get("draft", {}).get("fingerprint"):
            raise SprinterError(f"data folders come from different drafts: {reference!r} has "
                                f"{first.get('draft')}, {str(path)!r} has {m.get('draft')}")
    if label_rule == "relaxed":
        old = [str(p) for p, m in zip(paths, manifests) if "accept_relaxed" not in m.get("labels", ())]
        if old:
            raise SprinterError(f"label_rule relaxed: data folder(s) {old} were collected before the relaxed label "
                                "(their manifest lists no accept_relaxed column); expected folders collected since "
                                "(recollect with scripts/collect.py --overwrite), or --label-rule greedy, sprinter or "
                                "soft")
    leaky = sorted(set(features) & set(LEAKY))
    if leaky:
        raise SprinterError(f"features: got {leaky}; these carry the target's answer and cannot be features")
    columns = list(dict.fromkeys([*features, "draft_prob", "prompt_index", LABEL_COLUMN[label_rule],
                                  EVAL_COLUMN[label_rule]]))
    table = TokenTable(paths, columns)
    if len(table) == 0:
        raise SprinterError(f"data: {[str(p) for p in paths]} hold no samples")
    hidden_size = first.get("hidden_size")
    for shard in table.shards:
        if shard[HIDDEN].ndim != 2 or shard[HIDDEN].shape[1] != hidden_size:
            raise SprinterError(f"hidden column has shape {tuple(shard[HIDDEN].shape)}; the manifest says hidden "
                                f"size {hidden_size}")
    for name in columns:
        for shard in table.shards:
            values = shard[name]
            for start in range(0, len(values), 65536):  # chunked: the column stays on disk
                if values.is_floating_point() and not torch.isfinite(values[start:start + 65536]).all():
                    raise SprinterError(f"column {name!r} has NaN or infinite values; expected finite features "
                                        "and labels (re-collect the data)")
    if TOKEN in columns:
        vocab_size = first.get("vocab_size") or 0
        largest = max(int(shard[TOKEN].max()) for shard in table.shards if len(shard[TOKEN]))
        if not 0 <= largest < vocab_size:
            raise SprinterError(f"column 'token_id' holds id {largest}; the manifest's vocab_size is {vocab_size}")
    for name in dict.fromkeys([LABEL_COLUMN[label_rule], EVAL_COLUMN[label_rule]]):
        hard = table.column(name) >= 0.5
        if hard.all() or not hard.any():
            raise SprinterError(f"label {name!r} has a single class (all {int(hard[0])}) over {len(table)} samples; "
                                "expected both accepted and rejected tokens")
    return manifests, table


def split_prompts(prompt_index: torch.Tensor, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """Row ids of train/val/test, split by prompt so that no prompt's tokens fall in two splits.

    prompt_index (N,) -> {"train", "val", "test"}: sorted row ids. The same prompt index in several
    folders (e.g. two context sources over one prompt list) lands in one split.
    """
    prompts = prompt_index.unique()  # sorted
    if len(prompts) < 3:
        raise SprinterError(f"data: got {len(prompts)} prompt(s); expected at least 3 to split into train/val/test")
    order = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
    n_test = min(max(1, round(test_fraction * len(prompts))), len(prompts) - 2)
    n_val = min(max(1, round(val_fraction * len(prompts))), len(prompts) - n_test - 1)
    groups = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: torch.isin(prompt_index, ids).nonzero().squeeze(1) for name, ids in groups.items()}


class BatchSampler(Sampler):
    """Yields index tensors of whole batches; shards rows over DDP ranks itself, reshuffles per epoch."""

    def __init__(self, rows: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def _mine(self) -> torch.Tensor:
        rows = self.rows
        if self.shuffle:
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed + self.epoch))]
            per_rank = len(rows) // self.world_size  # equal counts: every rank takes the same number of steps
            return rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        return rows.tensor_split(self.world_size)[self.rank]  # evaluation: every row exactly once

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self._mine().split(self.batch_size):
            yield batch.sort().values  # sorted ids read the memory maps in order

    def __len__(self) -> int:
        mine = (len(self.rows) // self.world_size if self.shuffle
                else len(self.rows.tensor_split(self.world_size)[self.rank]))
        return math.ceil(mine / self.batch_size)


class Batches(Dataset):
    """dataset[row ids] -> a whole batch: the features (as stored), "label" and "eval_label" (float)."""

    def __init__(self, table: TokenTable, features: Sequence[str], label_rule: str) -> None:
        self.table, self.features, self.label_rule = table, tuple(features), label_rule

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {f: self.table.gather(f, rows) for f in self.features}
        batch["label"] = self.table.gather(LABEL_COLUMN[self.label_rule], rows).float()
        batch["eval_label"] = (self.table.gather(EVAL_COLUMN[self.label_rule], rows) >= 0.5).float()
        return batch


def loader(table: TokenTable, features: Sequence[str], label_rule: str, rows: torch.Tensor, batch_size: int,
           shuffle: bool, seed: int = 0, shard: tuple[int, int] = (0, 1)) -> DataLoader:
    """Batches of `rows`; `shard` = (rank, world size): this process's share of them under DDP."""
    sampler = BatchSampler(rows, batch_size, shuffle, seed, *shard)
    return DataLoader(Batches(table, features, label_rule), sampler=sampler, batch_size=None)


class ShardDataModule(L.LightningDataModule):
    """Opens the (already checked) folders in each process and serves the prompt-level splits."""

    def __init__(self, paths: Sequence[str], features: Sequence[str], label_rule: str,
                 splits: dict[str, torch.Tensor], batch_size: int, seed: int) -> None:
        super().__init__()
        self.paths, self.features, self.label_rule = [str(p) for p in paths], tuple(features), label_rule
        self.splits, self.batch_size, self.seed = splits, batch_size, seed
        self.table: TokenTable | None = None

    def setup(self, stage: str) -> None:
        # Opened here, not in __init__, so that spawned DDP workers map the files themselves.
        columns = list(dict.fromkeys([*self.features, LABEL_COLUMN[self.label_rule], EVAL_COLUMN[self.label_rule]]))
        self.table = TokenTable(self.paths, columns)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        shard = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return loader(self.table, self.features, self.label_rule, self.splits[split], self.batch_size, shuffle,
                      self.seed, shard)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def auto_label_rule(manifests: Sequence[dict]) -> str:
    """greedy for data decoded at temperature 0 (the target's argmax decides), else sprinter (q <= p)."""
    temperatures = {m.get("temperature") for m in manifests}
    if len(temperatures) != 1:
        raise SprinterError(f"label_rule auto: the data folders were collected at temperatures "
                            f"{sorted(map(str, temperatures))}; pass --label-rule greedy, sprinter, soft or relaxed")
    return "greedy" if temperatures.pop() == 0 else "sprinter"


def check_splits(table: TokenTable, splits: dict, label_rule: str) -> dict:
    """Every split needs both classes (AUROC and thresholds are undefined otherwise); returns split sizes."""
    labels = table.column(EVAL_COLUMN[label_rule]) >= 0.5
    prompts = table.column("prompt_index")
    sizes = {}
    for name, rows in splits.items():
        accepted = labels[rows]
        if len(rows) == 0 or accepted.all() or not accepted.any():
            raise SprinterError(f"{name} split: {len(rows)} samples, all of one class of {EVAL_COLUMN[label_rule]!r}; "
                                "expected both (collect more prompts or change val_fraction/test_fraction)")
        sizes[name] = {"samples": len(rows), "prompts": int(prompts[rows].unique().numel()),
                       "accept_rate": float(accepted.float().mean())}
    return sizes


def first_prompts(prompt_index: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of `rows` whose prompt is among its n lowest prompt indices.  # (N,), (R,) -> (R',)"""
    keep = prompt_index[rows].unique()[:n]  # sorted
    return rows[torch.isin(prompt_index[rows], keep)]
