"""Building an n-gram datastore (scripts/build_datastore.py): tokenize a corpus, sort its suffixes, write the four
files. The format and the lookups are sprinter.decode.datastore's (what a decode reads); this is the build stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sprinter.config import check_integers, option, save_config, to_dict
from sprinter.decode.datastore import (
    FORMAT,
    HEAD_BYTES,
    MANIFEST,
    MAX_TOKENS,
    VERSION,
    manifest_checksum,
    sha256,
    tokenizer_fingerprint,
)
from sprinter.errors import SprinterError
from sprinter.files import FolderLock, read_json


@dataclass
class DatastoreConfig:
    pair: str = option("demo", "pair whose tokenizer tokenizes the corpus: a preset (built if missing) or a "
                               "pair folder")
    tokenizer: str | None = option(None, "tokenizer folder or Hub name (default: the pair's target)")
    corpus: str = option("stdlib", "text: 'stdlib', a folder, a .jsonl/text file, or a Hub dataset name")
    split: str = option("train", "which split of the corpus: train, val, test or all")
    max_tokens: int = option(20_000_000, "stop after this many tokens (building needs about 150 bytes per token)")
    out: str = option("checkpoints/datastores/demo", "output folder")
    overwrite: bool = option(False, "replace an existing datastore in --out")

    def __post_init__(self) -> None:
        from sprinter.corpus import SPLITS

        check_integers(self, ("max_tokens",), minimum=2)
        if self.split not in SPLITS + ("all",):  # checked here, before a preset pair could be built
            raise SprinterError(f"split: got {self.split!r}; expected one of {SPLITS + ('all',)}")
        if self.max_tokens > MAX_TOKENS:
            raise SprinterError(f"max_tokens: got {self.max_tokens}; expected at most {MAX_TOKENS} (int32 positions)")


# ------------------------------------------------------------------------------------------ suffix array
def suffix_array(tokens: np.ndarray, eos_id: int, progress: bool = False) -> np.ndarray:
    """Start positions of the suffixes of `tokens` (N,) in lexicographic order, as int32 (N,).

    Prefix doubling: after round r the suffixes are sorted by their first 2^r tokens, and only the
    groups still tied are sorted again, so late rounds are cheap. Every EOS counts as a distinct
    symbol (ordered by position), so ties end at document ends and the number of rounds is
    log2 of the longest repeat inside one document, not of a repeated document.
    """
    from tqdm.auto import tqdm

    N = len(tokens)
    positions = np.arange(N, dtype=np.int64)
    tok = tokens.astype(np.int64)
    sa = np.argsort(tok * (N + 1) + np.where(tok == eos_id, positions + 1, 0), kind="stable")
    key = tok[sa]
    fresh = np.ones(N, dtype=bool)
    fresh[1:] = (key[1:] != key[:-1]) | (key[1:] == eos_id)
    del key
    # rank[p]: the suffix-array index where p's group of tied suffixes starts (consistent with the order).
    rank = np.empty(N, dtype=np.int64)
    rank[sa] = np.maximum.accumulate(np.where(fresh, positions, 0))
    tied = _tied(fresh, np.arange(N))
    bar = tqdm(desc="sorting suffixes", unit="round", disable=not progress, leave=False)
    step = 1
    while tied.size:
        starts = sa[tied]
        first = rank[starts]
        after = starts + step
        second = np.where(after < N, rank[np.minimum(after, N - 1)], -1)
        order = np.argsort(first * (N + 1) + second + 1)  # first < N and second + 1 <= N: fits int64
        starts, first, second = starts[order], first[order], second[order]
        sa[tied] = starts  # groups are contiguous in `tied`, so sorting by `first` keeps each in place
        fresh = np.ones(tied.size, dtype=bool)
        fresh[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
        rank[starts] = np.maximum.accumulate(np.where(fresh, tied, 0))
        tied = tied[_tied(fresh, np.arange(tied.size))]
        step *= 2
        bar.update(1)
        bar.set_postfix(tied=tied.size)
    bar.close()
    return sa.astype(np.int32)


def _tied(fresh: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The entries of `index` in a group of two or more, given `fresh` (True where a group starts)."""
    tie = np.zeros(fresh.size, dtype=bool)
    tie[1:] |= ~fresh[1:]
    tie[:-1] |= ~fresh[1:]
    return index[tie]


def write_datastore(out: Path, tokens: np.ndarray, suffixes: np.ndarray, meta: dict, cfg=None) -> dict:
    """Write the four files into a temporary folder beside `out`, then rename it into place."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": VERSION, "tokens": int(tokens.size), **meta, "files": {}}
    for name, array in (("tokens", tokens), ("suffixes", suffixes)):
        file = tmp / f"{name}.npy"
        with file.open("wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.int32), allow_pickle=False)
        manifest["files"][name] = {"file": file.name, "dtype": "int32", "shape": [int(array.size)],
                                   "bytes": file.stat().st_size, "headsha256": sha256(file, HEAD_BYTES),
                                   "sha256": sha256(file)}
    manifest["checksum"] = manifest_checksum(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if cfg is not None:
        save_config(cfg, tmp / "config.json")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return manifest


# ---------------------------------------------------------------------------------------------- build
def tokenize(docs, tokenizer, max_tokens: int) -> np.ndarray:
    """The documents as one int32 stream (N,), EOS after each, at most `max_tokens` long."""
    from tqdm.auto import tqdm

    eos, parts, total = tokenizer.eos_token_id, [], 0
    bar = tqdm(total=len(docs), desc="tokenizing", unit="doc")
    for i in range(0, len(docs), 64):
        for ids in tokenizer([d.text for d in docs[i : i + 64]], add_special_tokens=False)["input_ids"]:
            ids = ids[: max_tokens - total - 1] + [eos]
            parts.append(np.asarray(ids, dtype=np.int32))
            total += len(ids)
            if total >= max_tokens - 1:
                break
        bar.update(min(64, len(docs) - i))
        if total >= max_tokens - 1:
            break
    bar.close()
    return np.concatenate(parts)


def _built_by(out: Path, cfg: DatastoreConfig) -> bool:
    """Whether `out` holds a finished datastore built with these options."""
    if not (out / MANIFEST).is_file() or not (out / "config.json").is_file():
        return False
    old = read_json(out / "config.json", "datastore config")
    return isinstance(old, dict) and all(old.get(k) == v for k, v in to_dict(cfg).items() if k != "overwrite")


def build_datastore(cfg: DatastoreConfig) -> dict:
    """Tokenize the corpus, sort its suffixes and write the datastore; returns its manifest. The lock sits beside
    OUT (OUT itself is replaced whole): a second build into OUT is refused while this one runs."""
    out = Path(cfg.out)
    with FolderLock(out, "build_datastore", lock_file=out.parent / f".{out.name}.lock"):
        return _build_datastore(cfg)


def _build_datastore(cfg: DatastoreConfig) -> dict:
    from sprinter.corpus import load_documents
    from sprinter.pairs.build import resolve_pair
    from sprinter.pairs.load import load_tokenizer

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SprinterError(f"out: {str(out)!r} is not empty and holds no {MANIFEST}; expected an empty or new folder, "
                            "or a datastore folder (--overwrite replaces only a datastore)")
    occupied = out.exists() and any(out.iterdir()) and not cfg.overwrite
    if occupied and _built_by(out, cfg):
        print(f"{out} already holds this datastore; nothing to do (--overwrite rebuilds it)")
        return read_json(out / MANIFEST, "datastore manifest")
    tokenizer = load_tokenizer(cfg.tokenizer or resolve_pair(cfg.pair)[1], "tokenizer")
    if tokenizer.eos_token_id is None:
        raise SprinterError(f"tokenizer {cfg.tokenizer or cfg.pair!r} has no EOS token; expected one to separate "
                            "documents")
    docs = load_documents(cfg.corpus, cfg.split)
    if occupied:  # refused only once the inputs are known to be good, so a typo is named as such
        raise SprinterError(f"out: {str(out)!r} already exists and is not empty; pass --overwrite to rebuild it, "
                            "or choose another --out")
    started = time.perf_counter()
    tokens = tokenize(docs, tokenizer, cfg.max_tokens)
    tokenized = time.perf_counter()
    suffixes = suffix_array(tokens, tokenizer.eos_token_id, progress=True)
    sorted_at = time.perf_counter()
    meta = {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "documents": int(np.count_nonzero(tokens == tokenizer.eos_token_id)),
            "seconds": {"tokenize": round(tokenized - started, 2), "suffix_array": round(sorted_at - tokenized, 2)}}
    return write_datastore(out, tokens, suffixes, meta, cfg)


__all__ = ["DatastoreConfig", "build_datastore", "suffix_array", "tokenize", "write_datastore"]
