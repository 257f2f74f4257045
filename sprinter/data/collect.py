"""The data stage: run a draft/target pair over prompts and stream labelled rows out to shards.

Prompts are fixed-length token windows cut from a corpus split (`val` by default: text the pair never
trained on), numbered in a fixed order, and grouped into fixed batches: batch b holds prompts
b*B .. b*B+B-1 whatever the number of processes, so every run (one process, several, or resumed)
computes exactly the same rows. Rank r of W processes (torchrun) takes batches b with b % W == r and
writes its own shards; rank 0 writes the manifest once every rank is done. A shard holds whole
batches, so `--resume` skips the prompts already in finished shards and nothing is lost or repeated.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

import sprinter
from sprinter.config import (
    CONFIGS,
    ProgressConfig,
    RuntimeConfig,
    SeedConfig,
    check_integers,
    check_runs,
    option,
    parse_config,
    save_config,
    to_dict,
)
from sprinter.corpus import SPLITS
from sprinter.data.contexts import (
    OnPolicyOptions,
    check_onpolicy,
    corpus_rows,
    decode_rows,
    held_out_prompts,
    iter_batches,
    onpolicy_decoder,
    onpolicy_rows,
)
from sprinter.data.shards import (
    FORMAT,
    LABELS,
    MANIFEST,
    RELAXED_LAMBDA,
    ShardWriter,
    check_shard_pair,
    complete_shards,
    map_safetensors,
    read_header,
    settings_fingerprint,
    shard_entry,
    write_manifest,
)
from sprinter.errors import SprinterError
from sprinter.features import SCALARS, VECTORS
from sprinter.files import LOCK_NAME, FolderLock, read_json
from sprinter.pairs.load import Pair, fingerprint, load_pair

CONFIG_DIR = CONFIGS / "collect"
SOURCES = ("corpus", "decode", "onpolicy")
HIDDEN_DTYPES = {"float16": torch.float16, "float32": torch.float32}
COLUMNS = [*VECTORS, *SCALARS, "context_length"]  # draft-side columns a verifier may read (sprinter.features)
# Options that may change on --resume without changing a single row.
RUNTIME_OPTIONS = ("resume", "overwrite", "device", "threads", "progress", "out")  # "out": a moved folder resumes


@dataclass(frozen=True, kw_only=True)
class LabelledPromptsConfig:
    """What a collection labels, shared by the data stage and its throughput benchmark (sprinter.bench.collect):
    the models, the prompts (dataset, split, how many, how long) and the tokens labelled after each."""

    draft: str | None = option(None, "draft model: Hub name or local folder (default: the demo pair, built if missing)")
    target: str | None = option(None, "target model: Hub name or local folder (default: the demo pair)")
    dataset: str = option("stdlib", "prompt text: 'stdlib', a folder, a .jsonl/text file, or a Hub dataset name")
    split: str = option("val", "corpus split the prompts come from: train, val, test or all")
    num_prompts: int = option(512, "prompts to collect (fewer if the dataset runs out)")
    prompt_len: int = option(64, "prompt tokens before the first labelled token")
    max_new_tokens: int = option(32, "labelled (drafted) tokens per prompt")
    k: int = option(4, "tokens the draft drafts per target call (decode source)")
    batch_size: int = option(16, "prompts per forward pass")

    def labelled_prompts(self) -> dict:
        """These fields by name: what a `CollectConfig` for the same prompts takes."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LabelledPromptsConfig)}


@dataclass(frozen=True)
class CollectConfig(LabelledPromptsConfig, OnPolicyOptions, ProgressConfig, RuntimeConfig, SeedConfig):
    text_field: str = option("text", "text field of .jsonl rows and Hub datasets")
    hub_split: str = option("train", "split of a Hub dataset to read (before our own train/val/test split)")
    out: str = option("data/demo", "output folder for manifest.json and shard-NNNNN.safetensors")
    source: str = option("corpus", "context source: corpus (teacher forcing, fast), decode (speculative decoding) or "
                                   "onpolicy (the paths of --verifier's own sprinter loop)")
    windows_per_document: int = option(32, "most prompts cut from one document (spreads prompts over documents)")
    temperature: float = option(0.0, "collection temperature: 0 drafts greedily, > 0 samples from q")
    rows_per_shard: int = option(50_000, "rows per shard file (a shard holds whole batches)")
    hidden_dtype: str = option("float32", "dtype of the stored hidden states: float32 or float16")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (each torchrun rank takes cuda:LOCAL_RANK)")
    dtype: str = option("auto", "model dtype: float32, bfloat16, float16 or auto (bf16 on CUDA, fp32 on CPU)")
    seed: int = option(0, "seed of the draft's sampling (temperature > 0) and of the decode path")
    threads: int = option(0, "CPU threads per process (0: the cores divided among the processes)")
    resume: bool = option(False, "continue an interrupted collection in --out")
    overwrite: bool = option(False, "replace the collection in --out")
    trust_remote_code: bool = option(False, "allow models with custom code from the Hub")

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise SprinterError(f"source: got {self.source!r}; expected one of {SOURCES}")
        if self.split not in (*SPLITS, "all"):
            raise SprinterError(f"split: got {self.split!r}; expected one of {(*SPLITS, 'all')}")
        check_integers(self, ("num_prompts", "prompt_len", "max_new_tokens", "k", "windows_per_document",
                              "batch_size", "rows_per_shard"))
        if not 0 <= self.temperature < float("inf"):  # at inf q is uniform and every label would read 1
            raise SprinterError(f"temperature: got {self.temperature!r}; expected a finite number >= 0")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise SprinterError(f"hidden_dtype: got {self.hidden_dtype!r}; expected one of {sorted(HIDDEN_DTYPES)}")
        check_runs(self, neither="the demo pair")
        check_onpolicy(self)


def parse_collect_config(argv: Sequence[str] | None) -> CollectConfig:
    return parse_config(CollectConfig, argv, "Collect draft features and accept labels into safetensors shards.",
                        CONFIG_DIR / "demo.yaml")


# ------------------------------------------------------------------------------------------- the run
@dataclass
class Dist:
    """This process's place among torchrun ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def prepare_out(cfg: CollectConfig) -> None:
    """Refuse a non-empty folder unless resuming (same config) or overwriting; then write config.json."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if cfg.overwrite:
            for path in out.iterdir():
                if path.name in (MANIFEST, "config.json") or path in complete_shards(out) or \
                        path.name.startswith(".shard-"):
                    path.unlink()
        elif cfg.resume:
            if not saved.is_file():
                raise SprinterError(f"out: {cfg.out!r} holds no config.json from an earlier collection; expected "
                                    "the folder of an interrupted run for --resume")
            old = read_json(saved, "--resume: the collection's config")
            if not isinstance(old, dict):
                raise SprinterError(f"--resume: {str(saved)!r} holds a {type(old).__name__}; expected the options "
                                    "of the interrupted collection (rerun with --overwrite to start again)")
            new = to_dict(cfg)
            changed = sorted(k for k in new if k not in RUNTIME_OPTIONS and old.get(k) != new[k])
            if changed:
                raise SprinterError(f"--resume: options {changed} differ from the run in {cfg.out!r} "
                                    f"({ {k: old.get(k) for k in changed} }); expected the same options, or "
                                    "--overwrite to start again")
        else:
            what = f"{len(complete_shards(out))} shard(s)" + (", a finished collection" if (out / MANIFEST).is_file()
                                                              else "")
            raise SprinterError(f"out: {cfg.out!r} is not empty ({what}); pass --resume to continue it, --overwrite "
                                "to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)


def done_prompts(out: Path, draft_fingerprint: str, target_fingerprint: str) -> set[int]:
    """Prompt indices already in finished shards (any rank); a shard made by another pair is refused."""
    done: set[int] = set()
    for path in complete_shards(out):
        check_shard_pair(path, draft_fingerprint, target_fingerprint)
        columns = map_safetensors(path)
        if "accept_relaxed" not in columns:
            raise SprinterError(f"--resume: shard {str(path)!r} was collected before the relaxed label (it has no "
                                "accept_relaxed column); expected shards of this version: rerun with --overwrite")
        done.update(columns["prompt_index"].tolist())
    return done


def batch_rows(cfg: CollectConfig, pair: Pair, windows: torch.Tensor, first: int, decoder=None) -> dict:
    """The rows of one batch of prompts, with global `prompt_index`, ready for a shard (`decoder`: onpolicy's)."""
    # One generator per batch, seeded by its first prompt: the rows never depend on who computes them.
    gen = torch.Generator(device=pair.device).manual_seed(cfg.seed * 1_000_003 + first)
    windows = windows.to(pair.device)
    if cfg.source == "onpolicy":
        rows = onpolicy_rows(decoder, windows[:, : cfg.prompt_len],
                             max_new_tokens=cfg.onpolicy_tokens or cfg.max_new_tokens,
                             temperatures=[cfg.temperature] + [cfg.continuation_temperature] * (cfg.continuations - 1),
                             label_temperature=cfg.temperature, seed=(cfg.seed * 1_000_003 + first) * cfg.continuations,
                             gen=gen)
    elif cfg.source == "corpus":
        rows = corpus_rows(pair.draft, pair.target, windows, cfg.prompt_len, pair.vocab_size, cfg.temperature, gen)
    else:
        tok = pair.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        rows, _ = decode_rows(pair, windows[:, : cfg.prompt_len], max_new_tokens=cfg.max_new_tokens,
                              k=cfg.k, temperature=cfg.temperature, gen=gen, pad_id=pad, eos_id=tok.eos_token_id)
    rows["prompt_index"] = rows.pop("row_prompt") + first
    for name in VECTORS:
        rows[name] = rows[name].to(HIDDEN_DTYPES[cfg.hidden_dtype])
    return {name: (t.float() if t.is_floating_point() and name not in VECTORS else t).cpu() for name, t in rows.items()}


def check_pair(cfg: CollectConfig, pair: Pair) -> None:
    need = cfg.prompt_len + cfg.max_new_tokens + (cfg.k if cfg.source == "decode" else 0)
    if need > pair.max_length:
        raise SprinterError(f"prompt_len + max_new_tokens{' + k' if cfg.source == 'decode' else ''} = "
                            f"{need} tokens; the models' context window is {pair.max_length}: expected at most that")


def resolve_pair_paths(cfg: CollectConfig) -> tuple[str, str]:
    """--draft/--target, else the demo pair (built first if missing)."""
    from sprinter.pairs.build import resolve_pair

    return resolve_pair("demo", cfg.draft, cfg.target)


def collect(cfg: CollectConfig) -> dict | None:
    """Run the collection described by `cfg`; rank 0 returns the manifest (other ranks None).

    Rank 0 holds OUT's lock throughout (a second collect into OUT, fresh or resumed, is refused), and a run
    that fails before its first shard leaves no config.json behind to block the corrected rerun."""
    dist = Dist.from_env()
    try:
        with FolderLock(cfg.out, "collect"):
            saved = Path(cfg.out) / "config.json"
            before = _stat(saved)
            try:
                return _collect(cfg, dist)
            except BaseException:
                if dist.rank == 0 and _stat(saved) not in (None, before) and not complete_shards(cfg.out):
                    saved.unlink()  # this run wrote it and nothing else: there is nothing to resume
                raise
    finally:
        dist.close()


def _stat(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of a file, None if absent: tells whether this run replaced it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _collect(cfg: CollectConfig, dist: Dist) -> dict | None:
    if dist.rank == 0:
        resolve_pair_paths(cfg)  # builds the demo pair once, before the other ranks look for it
        prepare_out(cfg)
    dist.barrier()  # the folder is ready before any rank writes
    draft_path, target_path = resolve_pair_paths(cfg)
    device = cfg.device
    if dist.world > 1 and cfg.device.startswith("cuda") and ":" not in cfg.device:
        device = f"cuda:{dist.local_rank}"
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    pair = load_pair(draft_path, target_path, device, cfg.dtype, cfg.trust_remote_code)
    check_pair(cfg, pair)
    out = Path(cfg.out)
    if dist.rank == 0:
        (out / MANIFEST).unlink(missing_ok=True)  # a resumed folder is unfinished until every rank is done
    draft_fp, target_fp = fingerprint(draft_path), fingerprint(target_path)
    done = done_prompts(out, draft_fp, target_fp)
    decoder = onpolicy_decoder(cfg.verifier, pair, draft_fp) if cfg.source == "onpolicy" else None
    writer = ShardWriter(out, cfg.rows_per_shard, dist.rank,
                         metadata={"source": cfg.source, "draft": draft_fp, "target": target_fp,
                                   "settings": settings_fingerprint(to_dict(cfg))})
    started = time.perf_counter()
    new_rows = new_tokens = seen = 0
    with tqdm(total=cfg.num_prompts, unit="prompt", desc=f"collect ({cfg.source})",
              disable=not cfg.progress or dist.rank != 0) as bar:  # closed before an error prints
        for b, (first, windows) in enumerate(iter_batches(cfg, pair.tokenizer, held_out_prompts(cfg))):
            seen = first + len(windows)
            todo = set(range(first, seen)) - done
            if b % dist.world != dist.rank or not todo:
                bar.update(len(windows) if not todo or dist.world == 1 else 0)
                continue
            if len(todo) != len(windows):
                raise SprinterError(f"out: {cfg.out!r} holds part of the batch starting at prompt {first}; expected "
                                    "whole batches (was --batch-size changed?): rerun with --overwrite")
            rows = batch_rows(cfg, pair, windows, first, decoder)
            writer.add(rows)
            new_rows += len(rows["token_id"])
            new_tokens += windows.numel()
            seconds = time.perf_counter() - started
            bar.update(len(windows) * dist.world)  # the other ranks advance at about the same pace
            bar.set_postfix({"tokens/s": f"{new_tokens * dist.world / seconds:.0f}",
                             "labelled/s": f"{new_rows * dist.world / seconds:.0f}"})
    writer.close()
    seconds = time.perf_counter() - started
    dist.barrier()  # every rank's shards are on disk
    if dist.rank != 0:
        return None
    if seen < cfg.num_prompts and not cfg.held_out:
        print(f"note: dataset {cfg.dataset!r} ({cfg.split!r} split) holds {seen} prompts of "
              f"{cfg.prompt_len + cfg.max_new_tokens} tokens, fewer than num_prompts={cfg.num_prompts}; "
              "raise --windows-per-document or use a larger dataset for more")
    manifest = build_manifest(cfg, pair, draft_path, target_path, seconds)
    write_manifest(out, manifest)
    manifest["run"] = {"new_rows_rank0": new_rows, "seconds": seconds, "world_size": dist.world}
    return manifest


def build_manifest(cfg: CollectConfig, pair: Pair, draft_path: str, target_path: str, seconds: float) -> dict:
    """The manifest of everything in `cfg.out`, read back from the shard files of every rank."""
    out = Path(cfg.out)
    entries, prompts, sums, columns = [], set(), dict.fromkeys(LABELS, 0.0), {}
    for path in complete_shards(out):
        entries.append(shard_entry(path))
        tensors = map_safetensors(path)
        prompts.update(tensors["prompt_index"].tolist())
        for label in LABELS:
            sums[label] += float(tensors[label].double().sum())
        header, _ = read_header(path)
        for name, spec in header.items():
            if name != "__metadata__":
                columns[name] = {"dtype": spec["dtype"], "shape": ["N", *spec["shape"][1:]]}
    total = sum(e["rows"] for e in entries)
    return {
        "format": FORMAT,
        "sprinter_version": sprinter.__version__,
        "draft": {"name": draft_path, "fingerprint": fingerprint(draft_path)},
        "target": {"name": target_path, "fingerprint": fingerprint(target_path)},
        "tokenizer": target_path,
        "hidden_size": int(pair.draft.config.hidden_size),
        "vocab_size": pair.vocab_size,
        "context_source": cfg.source,
        "temperature": cfg.temperature,
        "features": COLUMNS,
        "labels": list(LABELS),
        "relaxed_lambda": RELAXED_LAMBDA,
        "dtype": cfg.hidden_dtype,
        "columns": columns,
        "num_samples": total,
        "num_prompts": len(prompts),
        "label_means": {k: (v / total if total else None) for k, v in sums.items()},
        "shards": entries,
        "config": to_dict(cfg),
        "last_run_seconds": round(seconds, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def summary(manifest: dict) -> str:
    """A one-screen summary of a finished collection."""
    run = manifest.get("run", {})
    rate = run.get("new_rows_rank0", 0) * run.get("world_size", 1) / max(run.get("seconds", 0), 1e-9)
    lines = [f"collected {manifest['num_samples']} samples from {manifest['num_prompts']} prompts "
             f"({manifest['context_source']} contexts, temperature {manifest['temperature']}) "
             f"into {manifest['config']['out']}",
             f"draft  {manifest['draft']['name']} ({manifest['draft']['fingerprint']})",
             f"target {manifest['target']['name']} ({manifest['target']['fingerprint']})",
             "acceptance: " + ", ".join(f"{k} {v:.3f}" for k, v in manifest["label_means"].items() if v is not None),
             f"this run: {run.get('seconds', 0):.1f} s, {rate:.0f} labelled tokens/s "
             f"over {run.get('world_size', 1)} process(es); {len(manifest['shards'])} shard(s)"]
    return "\n".join(lines)


__all__ = ["CollectConfig", "collect", "parse_collect_config", "summary"]
