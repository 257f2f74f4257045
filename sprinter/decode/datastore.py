"""The n-gram datastore (SSSD, docs/references.md §4): a suffix array over a tokenized corpus, memory-mapped.

On disk a datastore is a folder of four files, written by `build_datastore` (sprinter.data.datastore,
scripts/build_datastore.py):
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
with it, and so on, up to k tokens. Nothing is read past an EOS: the chain stops at a document end,
and the context is cut after its last EOS, so matches never cross documents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from sprinter.errors import SprinterError
from sprinter.files import read_json

FORMAT = "sprinter-datastore"
VERSION = 1
MANIFEST = "manifest.json"
FILES = ("tokens", "suffixes")
HEAD_BYTES = 1 << 16
SAMPLE = 256  # occurrences read to pick the most frequent next token of a large range
MAX_TOKENS = 2**31 - 1  # int32 positions


# -------------------------------------------------------------------------------------------- lookups
class Datastore:
    """A corpus and its suffix array; `chain(context, k)` proposes what followed the context in the corpus."""

    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray, eos_id: int, manifest: dict | None = None,
                 path: Path | None = None):
        self.tokens, self.suffixes = tokens.view(np.ndarray), suffixes.view(np.ndarray)  # (N,), (N,)
        self.eos_id, self.manifest, self.path = int(eos_id), manifest or {}, path
        # Scalar reads go through memoryviews (Python ints, ~2.5x faster than indexing an ndarray), and
        # the range of each first token comes from a table: the binary searches start one level down.
        self._tok, self._sa = memoryview(self.tokens), memoryview(self.suffixes)
        self._first = np.concatenate([[0], np.cumsum(np.bincount(self.tokens))]).tolist()  # (V + 1,)

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

    def chain(self, context: Sequence[int], k: int, n: int = 3, min_n: int = 1) -> list[int]:
        """Up to `k` tokens that followed the longest suffix of `context` (n down to min_n tokens) in the
        corpus, the most frequent continuation first; [] when no suffix of min_n tokens occurs."""
        if k < 1:
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
                out = self._continue(lo, hi, m, k)
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

    def _continue(self, lo: int, hi: int, depth: int, k: int) -> list[int]:
        """Greedy most-frequent continuation of the suffixes[lo:hi] (which share `depth` tokens), up to k tokens."""
        out: list[int] = []
        while len(out) < k and hi - lo > SAMPLE:  # a large range: count a sample, then search the sub-range
            following = self.tokens[self.suffixes[lo + np.arange(SAMPLE) * (hi - lo) // SAMPLE] + depth]
            bounds = [0, *((following[1:] != following[:-1]).nonzero()[0] + 1).tolist(), SAMPLE]
            run = max(range(len(bounds) - 1), key=lambda r: bounds[r + 1] - bounds[r])  # first on ties: smallest id
            token = int(following[bounds[run]])
            if token == self.eos_id:
                return out
            out.append(token)
            lo, hi = self._narrow(lo, hi, depth, token)
            depth += 1
        return out + self._greedy_block(lo, hi, depth, k - len(out)) if len(out) < k else out

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
            if sha256(self.path / entry["file"]) != entry["sha256"]:
                raise _unusable(self.path / entry["file"], "its contents do not match the manifest's SHA-256")


# ------------------------------------------------------------------------------------------ the format
def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (every token and its id) and EOS id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()[:16]


def sha256(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if limit is not None:
            digest.update(fh.read(limit))
        else:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _unusable(file: Path, problem: str) -> SprinterError:
    return SprinterError(f"datastore file {str(file)!r} is unusable: {problem}; expected a datastore written by "
                        f"scripts/build_datastore.py ({FORMAT} version {VERSION}): rebuild it")


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
    if manifest.get("checksum") != manifest_checksum(manifest):
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
        if sha256(data, HEAD_BYTES) != entry["headsha256"]:
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


__all__ = ["FILES", "FORMAT", "HEAD_BYTES", "MANIFEST", "MAX_TOKENS", "VERSION", "Datastore", "manifest_checksum",
           "open_datastore", "sha256", "tokenizer_fingerprint"]
