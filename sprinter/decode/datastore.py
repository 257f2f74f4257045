"""The n-gram datastore (SSSD, docs/references.md §4): a suffix array over a tokenized corpus, memory-mapped.

On disk a datastore is a folder of four files, written by `build_datastore` (scripts/build_datastore.py):
- `tokens.npy`: the corpus as one int32 stream of token ids, every document followed by the
  tokenizer's EOS id (so the stream ends with EOS);
- `suffixes.npy`: int32 start positions of the suffixes of that stream in lexicographic order (a
  suffix array); suffixes that agree up to an EOS are ordered by position, so lookups that never
  read past an EOS see one consistent order;
- `manifest.json`: format and version, token count, vocabulary size, EOS id, the tokenizer's
  fingerprint, and per file its dtype, shape, byte size, a SHA-256 of its first 64 KiB and a
  SHA-256 of its whole content; `checksum` hashes all of that, so a hand-edited manifest is refused;
- `config.json`: the `DatastoreConfig` that built it.
Plain .npy files (no pickle) opened with `mmap_mode="r"`: pages are read on demand. `Datastore.open`
checks the manifest, the file sizes and the hashed first 64 KiB (headers) of each file, which
catches truncated, replaced and header-damaged files at the cost of reading 128 KiB, then counts the
tokens once for its first-token table (0.3 s at 10 M tokens; ids outside the vocabulary are refused
there); `verify()` hashes the full contents
(about 0.1 s per 10 M tokens), for when damage deep inside a file matters.

A lookup (`Datastore.chain`) finds the longest suffix of the context (n down to min_n tokens) that
occurs in the corpus, by binary search over the suffix array, one token at a time. The occurrences
of a context are one contiguous range of the suffix array, sorted by what follows them, so the
continuation is chosen by frequency and greedily: the most frequent next token of the range (counted
exactly on ranges up to 256 occurrences, else on 256 evenly spaced ones, which is unbiased because
the range is sorted by that token; ties go to the smaller id), then the sub-range that continues
with it, and so on, up to s tokens. Nothing is read past an EOS: the chain stops at a document end,
and the context is cut after its last EOS, so matches never cross documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sprinter.config import check_integers, option, save_config, to_dict
from sprinter.errors import SprinterError
from sprinter.files import FolderLock, read_json

FORMAT = "sprinter-datastore"
VERSION = 1
MANIFEST = "manifest.json"
FILES = ("tokens", "suffixes")
HEAD_BYTES = 1 << 16
SAMPLE = 256  # occurrences read to pick the most frequent next token of a large range
MAX_TOKENS = 2**31 - 1  # int32 positions


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


# -------------------------------------------------------------------------------------------- lookups
class Datastore:
    """A corpus and its suffix array; `chain(context, s)` proposes what followed the context in the corpus."""

    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray, eos_id: int, manifest: dict | None = None,
                 path: Path | None = None):
        self.tokens, self.suffixes = tokens.view(np.ndarray), suffixes.view(np.ndarray)  # (N,), (N,)
        self.eos_id, self.manifest, self.path = int(eos_id), manifest or {}, path
        # Scalar reads go through memoryviews (Python ints, ~2.5x faster than indexing an ndarray), and
        # the range of each first token comes from a table: the binary searches start one level down.
        self._tok, self._sa = memoryview(self.tokens), memoryview(self.suffixes)
        self._first = np.concatenate([[0], np.cumsum(np.bincount(self.tokens))]).tolist()  # (V + 1,)

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int]], eos_id: int) -> "Datastore":
        """An in-memory datastore over token-id documents (tests, small corpora)."""
        tokens = np.fromiter((t for doc in documents for t in (*doc, eos_id)), dtype=np.int32)
        if tokens.size == 0:
            raise SprinterError("documents: got none; expected at least one document")
        return cls(tokens, suffix_array(tokens, eos_id), eos_id)

    @classmethod
    def open(cls, path: str | Path, tokenizer=None) -> "Datastore":
        """Memory-map a datastore folder, refusing a damaged one, or one built for another tokenizer."""
        return open_datastore(Path(path), tokenizer)

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer other than the one the datastore was built with (vocabulary, ids, EOS)."""
        expected = {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id,
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
        built = {k: self.manifest.get(k) for k in expected}
        if built != expected:
            where = str(self.path / MANIFEST) if self.path is not None else "(in memory)"
            raise SprinterError(f"datastore {where!r} was built for another tokenizer ({built}); "
                                f"expected {expected}, the tokenizer in use: rebuild it with "
                                "scripts/build_datastore.py "
                                "--pair (or --tokenizer) of the models you decode with")

    def __len__(self) -> int:
        return int(self.tokens.size)

    def chain(self, context: Sequence[int], s: int, n: int = 3, min_n: int = 1) -> list[int]:
        """Up to `s` tokens that followed the longest suffix of `context` (n down to min_n tokens) in the
        corpus, the most frequent continuation first; [] when no suffix of min_n tokens occurs."""
        if s < 1:
            return []
        context = [int(t) for t in context[-n:]]
        if self.eos_id in context:  # a match must not reach back into the previous document
            context = context[len(context) - context[::-1].index(self.eos_id):]
        for m in range(min(n, len(context)), min_n - 1, -1):
            first = context[-m]
            if not 0 <= first < len(self._first) - 1:
                continue
            lo, hi = self._first[first], self._first[first + 1]
            for depth in range(1, m):
                if lo == hi:
                    break
                lo, hi = self._narrow(lo, hi, depth, context[depth - m])
            if lo < hi:
                out = self._continue(lo, hi, m, s)
                if out:
                    return out
        return []

    def _narrow(self, lo: int, hi: int, depth: int, token: int) -> tuple[int, int]:
        """The part of suffixes[lo:hi] (which share their first `depth` tokens, none an EOS) whose token
        at `depth` is `token`. Reads stay inside the stream: it ends with EOS."""
        tok, sa = self._tok, self._sa
        a, b = lo, hi
        while a < b:
            mid = (a + b) // 2
            if tok[sa[mid] + depth] < token:
                a = mid + 1
            else:
                b = mid
        start, b = a, hi
        while a < b:
            mid = (a + b) // 2
            if tok[sa[mid] + depth] <= token:
                a = mid + 1
            else:
                b = mid
        return start, a

    def _continue(self, lo: int, hi: int, depth: int, s: int) -> list[int]:
        """Greedy most-frequent continuation of the suffixes[lo:hi] (which share `depth` tokens), up to s tokens."""
        out: list[int] = []
        while len(out) < s and hi - lo > SAMPLE:  # a large range: count a sample, then search the sub-range
            following = self.tokens[self.suffixes[lo + np.arange(SAMPLE) * (hi - lo) // SAMPLE] + depth]
            bounds = [0, *((following[1:] != following[:-1]).nonzero()[0] + 1).tolist(), SAMPLE]
            run = max(range(len(bounds) - 1), key=lambda r: bounds[r + 1] - bounds[r])  # first on ties: smallest id
            token = int(following[bounds[run]])
            if token == self.eos_id:
                return out
            out.append(token)
            lo, hi = self._narrow(lo, hi, depth, token)
            depth += 1
        return out + self._greedy_block(lo, hi, depth, s - len(out)) if len(out) < s else out

    def _greedy_block(self, lo: int, hi: int, depth: int, k: int) -> list[int]:
        """`_continue` for a range of at most SAMPLE suffixes: one read of the next k tokens of each."""
        rows = self.suffixes[lo:hi, None].astype(np.int64) + depth + np.arange(k)
        block = self.tokens[np.minimum(rows, self.tokens.size - 1)]  # (R, k); what lies past an EOS is never used
        # split[i, j]: rows i and i + 1 differ within their first j + 1 tokens (the rows are sorted).
        split = np.logical_or.accumulate(block[1:] != block[:-1], axis=1)  # (R - 1, k)
        a, b, out = 0, hi - lo, []
        for j in range(k):
            if b - a == 1:  # one occurrence left: the rest of its row
                rest = block[a, j:].tolist()
                return out + (rest[: rest.index(self.eos_id)] if self.eos_id in rest else rest)
            bounds = [a, *(split[a : b - 1, j].nonzero()[0] + a + 1).tolist(), b]
            run = max(range(len(bounds) - 1), key=lambda r: bounds[r + 1] - bounds[r])  # first on ties: smallest id
            token = int(block[bounds[run], j])
            if token == self.eos_id:
                break
            out.append(token)
            a, b = bounds[run], bounds[run + 1]
        return out

    def verify(self) -> None:
        """Hash the full contents against the manifest (`open` checks sizes and headers only)."""
        if self.path is None:
            return
        for name in FILES:
            entry = self.manifest["files"][name]
            if _sha256(self.path / entry["file"]) != entry["sha256"]:
                raise _unusable(self.path / entry["file"], "its contents do not match the manifest's SHA-256")


# ------------------------------------------------------------------------------------------ the format
def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (every token and its id) and EOS id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()[:16]


def _sha256(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if limit is not None:
            digest.update(fh.read(limit))
        else:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _unusable(file: Path, problem: str) -> SprinterError:
    return SprinterError(f"datastore file {str(file)!r} is unusable: {problem}; expected a datastore written by "
                        f"scripts/build_datastore.py ({FORMAT} version {VERSION}): rebuild it")


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
                                   "bytes": file.stat().st_size, "head_sha256": _sha256(file, HEAD_BYTES),
                                   "sha256": _sha256(file)}
    manifest["checksum"] = _manifest_checksum(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if cfg is not None:
        save_config(cfg, tmp / "config.json")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return manifest


def open_datastore(path: Path, tokenizer=None) -> Datastore:
    """See `Datastore.open`: one SprinterError naming the file and what was expected, for any problem."""
    file = path / MANIFEST
    if not file.is_file():
        raise SprinterError(f"datastore: {str(file)!r} not found; expected a folder written by "
                            "scripts/build_datastore.py (python scripts/build_datastore.py --out ...)")
    try:
        manifest = read_json(file, "datastore manifest")
    except SprinterError:
        raise _unusable(file, "it is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _unusable(file, f"its format is {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    if manifest.get("version") != VERSION:
        raise _unusable(file, f"its format version is {manifest.get('version')!r}")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise _unusable(file, "its checksum does not match its contents (edited or damaged)")
    arrays = {}
    for name in FILES:
        entry = manifest["files"][name]
        data = path / entry["file"]
        if not data.is_file():
            raise _unusable(data, "it is missing")
        if data.stat().st_size != entry["bytes"]:
            raise _unusable(data, f"it is {data.stat().st_size} bytes where the manifest says {entry['bytes']} "
                                  "(truncated?)")
        if _sha256(data, HEAD_BYTES) != entry["head_sha256"]:
            raise _unusable(data, "its header (first 64 KiB) does not match the manifest's checksum")
        try:
            arrays[name] = np.load(data, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise _unusable(data, f"numpy cannot read it ({err})") from None
        if arrays[name].dtype != np.int32 or list(arrays[name].shape) != [manifest["tokens"]]:
            raise _unusable(data, f"it holds {arrays[name].dtype} {list(arrays[name].shape)}, not int32 "
                                  f"[{manifest['tokens']}]")
    if manifest["tokens"] and int(arrays["tokens"][-1]) != manifest["eos_id"]:
        raise _unusable(path / "tokens.npy", f"it does not end with the EOS id {manifest['eos_id']}")
    try:
        store = Datastore(arrays["tokens"], arrays["suffixes"], manifest["eos_id"], manifest, path)
    except ValueError:  # np.bincount of a negative id
        raise _unusable(path / "tokens.npy", "it holds negative token ids") from None
    if len(store._first) - 1 > manifest["vocab_size"]:  # the first-token table counted every id once
        raise _unusable(path / "tokens.npy", f"it holds ids beyond the vocabulary of {manifest['vocab_size']}")
    if tokenizer is not None:
        store.check_tokenizer(tokenizer)
    return store


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


__all__ = ["Datastore", "DatastoreConfig", "build_datastore", "open_datastore", "suffix_array", "tokenize",
           "tokenizer_fingerprint", "write_datastore"]
