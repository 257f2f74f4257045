"""The on-disk format of collected data: `OUT/manifest.json` plus `OUT/shard-NNNNN.safetensors`.

A shard is a safetensors file whose tensors all have the same number of rows: `hidden` (N, H) and
1-D columns such as `token_id`, `draft_prob`, `target_prob` and the three accept labels. Shards are
written to a temporary file and renamed into place, so a killed run never leaves a shard that looks
complete; each shard also carries its row count and rank in its safetensors metadata, so a folder can
be audited (and a run resumed) from its shard files alone. The manifest is written last, once every
rank has finished: a folder without one is an unfinished collection.

Readers use `read_manifest`, `iter_shards`, `load_columns` and `map_safetensors`. Columns are mapped
from disk (copy-on-write `np.memmap`), never read whole into RAM, so a training set can be larger than
memory; nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from sprinter.errors import SprinterError
from sprinter.files import read_json, write_atomic

FORMAT = "sprinter-shards/1"
MANIFEST = "manifest.json"
LABELS = ("accept_greedy", "accept_sprinter", "accept_soft", "accept_relaxed")
RELAXED_LAMBDA = 0.5  # accept_relaxed: 1 iff p(x) >= RELAXED_LAMBDA * max p (sprinter.data.contexts.accept_labels)
# Columns every shard holds; a collector may add more (draft-side only), listed in the manifest. accept_relaxed came
# later: shards collected before it lack it and stay readable for every label rule but "relaxed".
REQUIRED_COLUMNS = ("hidden", "token_id", "draft_prob", "draft_entropy", "target_prob", "position", "prompt_index",
                    *LABELS[:3])
SHARD_NAME = re.compile(r"^shard-(?:r(\d+)-)?(\d{5,})\.safetensors$")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def shard_name(rank: int, index: int) -> str:
    """`shard-00003.safetensors` on rank 0, `shard-r1-00003.safetensors` on rank 1: ranks never collide."""
    return f"shard-{index:05d}.safetensors" if rank == 0 else f"shard-r{rank}-{index:05d}.safetensors"


def _disk_error(path: Path, err: OSError, kept: int) -> SprinterError:
    reason = err.strerror or str(err)
    return SprinterError(f"could not write {str(path)!r}: {reason}; the {kept} shard(s) already written in "
                         f"{str(path.parent)!r} are intact: free some space and rerun with --resume")


def complete_shards(folder: str | Path) -> list[Path]:
    """The finished shard files in `folder` (temporary files of a killed run are not shards)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if SHARD_NAME.match(p.name)) if folder.is_dir() else []


class ShardWriter:
    """Streams rows out to shards of one rank, so memory stays flat however many rows are collected.

    `add(rows)` buffers a dict of equal-length tensors; once `rows_per_shard` rows are buffered they are
    written as one shard. Callers add whole prompts at a time, so a shard never splits a prompt (which
    is what makes `--resume` exact). `close()` writes what is left. `written` lists manifest entries.
    """

    def __init__(self, folder: str | Path, rows_per_shard: int = 50_000, rank: int = 0,
                 metadata: dict[str, str] | None = None) -> None:
        if rows_per_shard < 1:
            raise SprinterError(f"rows_per_shard: got {rows_per_shard!r}; expected an integer >= 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.rank = rank
        self.metadata = dict(metadata or {})
        self.written: list[dict] = []
        self._buffer: dict[str, list[torch.Tensor]] = {}
        self._buffered = 0
        taken = [int(m.group(2)) for p in complete_shards(self.folder)
                 if (m := SHARD_NAME.match(p.name)) and int(m.group(1) or 0) == rank]
        self._next_index = max(taken, default=-1) + 1

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Buffer rows (a dict of tensors with equal first dimension); write a shard when enough are buffered."""
        counts = {name: t.shape[0] for name, t in rows.items()}
        if len(set(counts.values())) > 1:
            raise SprinterError(f"rows: columns have different lengths {counts}; expected equal row counts")
        if self._buffer and set(rows) != set(self._buffer):
            raise SprinterError(f"rows: got columns {sorted(rows)}; expected {sorted(self._buffer)}")
        for name, tensor in rows.items():
            self._buffer.setdefault(name, []).append(tensor.detach().to("cpu").contiguous())
        self._buffered += next(iter(counts.values()), 0)
        if self._buffered >= self.rows_per_shard:
            self.flush()

    def flush(self) -> dict | None:
        """Write the buffered rows as one shard; returns its manifest entry (None if nothing was buffered)."""
        if self._buffered == 0:
            return None
        tensors = {name: torch.cat(parts) for name, parts in self._buffer.items()}
        path = self.folder / shard_name(self.rank, self._next_index)
        meta = {**self.metadata, "format": FORMAT, "rank": str(self.rank), "rows": str(self._buffered)}
        try:
            write_atomic(path, safetensors_bytes(tensors, metadata=meta))
        except OSError as err:
            raise _disk_error(path, err, len(complete_shards(self.folder))) from None
        entry = {"file": path.name, "rows": self._buffered, "rank": self.rank}
        self.written.append(entry)
        self._next_index += 1
        self._buffer, self._buffered = {}, 0
        return entry

    def close(self) -> list[dict]:
        self.flush()
        return self.written


def read_header(file: str | Path) -> tuple[dict, int]:
    """(safetensors header {column: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}, byte offset of
    the data), read without touching the data."""
    try:
        with open(file, "rb") as handle:
            (n,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"header is a {type(header).__name__}")
    except (OSError, struct.error, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SprinterError(f"shard {str(file)!r} is not a readable safetensors file ({err})") from None
    return header, 8 + n


def map_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one copy-on-write memory map (no read into RAM)."""
    header, start = read_header(file)
    try:
        data = torch.from_numpy(np.memmap(file, dtype=np.uint8, mode="c", offset=start))
    except (OSError, ValueError) as err:  # ValueError: no data after the header
        raise SprinterError(f"shard {str(file)!r} is not a readable safetensors file ({err})") from None
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        dtype = _DTYPES.get(spec["dtype"])
        if dtype is None or end > data.numel() or end - begin != math.prod(spec["shape"]) * dtype.itemsize:
            raise SprinterError(f"shard {str(file)!r}: column {name!r} ({spec}) does not fit the file")
        raw = data[begin:end]
        if begin % dtype.itemsize:  # safetensors aligns tensors; copy if a writer did not
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(spec["shape"])
    return out


def shard_entry(path: Path) -> dict:
    """The manifest entry of a shard file, read from its safetensors header."""
    header, _ = read_header(path)
    meta = header.pop("__metadata__", None) or {}
    rows = {spec["shape"][0] if spec["shape"] else None for spec in header.values()}
    if len(rows) != 1 or None in rows:
        counts = {name: (spec["shape"] or [None])[0] for name, spec in header.items()}
        raise SprinterError(f"shard {str(path)!r}: columns have row counts {counts}; expected one row count")
    return {"file": path.name, "rows": rows.pop(), "rank": int(meta.get("rank", 0))}


# The collection settings that decide what a row means (its prompt, its context, its labels): two shards whose
# settings differ in any of these hold rows of different experiments. The size of a run (num_prompts, batch_size,
# rows_per_shard), where it runs and how it is written are left out: they change no row.
ROW_SETTINGS = ("dataset", "split", "text_field", "hub_split", "source", "prompt_len", "max_new_tokens", "k",
                "windows_per_document", "temperature", "seed", "dtype", "hidden_dtype")


def settings_fingerprint(config: dict) -> str:
    """A short hash of a collection config's ROW_SETTINGS (a key the config lacks counts as None)."""
    settings = {name: config.get(name) for name in ROW_SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_shard_pair(path: str | Path, draft_fingerprint: str | None, target_fingerprint: str | None,
                     source: str | None = None, settings: str | None = None) -> None:
    """Refuse a shard whose metadata names another draft, target, context source or collection settings than the
    collection's (a shard copied in from another folder). A shard without that metadata (hand-made, synthetic, or
    written before shards carried it) is taken as it is."""
    header, _ = read_header(path)
    meta = header.get("__metadata__") or {}
    got = meta.get("settings")
    if got is not None and settings is not None and got != settings:
        raise SprinterError(f"data: shard {str(path)!r} was collected with other settings (fingerprint {got!r}) than "
                            f"the collection's ({settings!r}; the settings are {', '.join(ROW_SETTINGS)}): expected "
                            "the shards of one collection (move the foreign shard out, or recollect with --overwrite)")
    got = meta.get("source")
    if got is not None and source is not None and got != source:
        raise SprinterError(f"data: shard {str(path)!r} holds {got!r} contexts; the collection's context_source is "
                            f"{source!r}: expected the shards of one collection (move the foreign shard out, or "
                            "recollect with --overwrite)")
    for role, expected in (("draft", draft_fingerprint), ("target", target_fingerprint)):
        got = meta.get(role)
        if got is not None and expected is not None and got != expected:
            raise SprinterError(f"data: shard {str(path)!r} was made with {role} fingerprint {got!r}; the collection's "
                                f"{role} is {expected!r}: expected the shards of one pair (move the foreign shard out, "
                                "or recollect with --overwrite)")


def write_manifest(folder: str | Path, manifest: dict) -> None:
    path = Path(folder) / MANIFEST
    try:
        write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as err:
        raise _disk_error(path, err, len(complete_shards(folder))) from None


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder, checked against the shard files it lists."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        hint = (" (it holds shards: an unfinished collection; rerun the collection with --resume)"
                if complete_shards(folder) else "")
        raise SprinterError(f"data: {str(folder)!r} has no {MANIFEST}{hint}; expected a folder written by "
                            "scripts/collect.py")
    manifest = read_json(path, "data: manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SprinterError(f"data: {str(path)!r} has format {got!r}; expected {FORMAT!r}")
    shards, pair = manifest.get("shards", []), {}
    for role in ("draft", "target"):
        pair[role] = manifest.get(role, {}).get("fingerprint") if isinstance(manifest.get(role), dict) else None
    if not isinstance(shards, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                              and isinstance(e.get("rows"), int) for e in shards):
        raise SprinterError(f"data: {str(path)!r} lists its shards as {str(shards)[:80]}; expected entries "
                            '{"file": name, "rows": count}')
    for entry in shards:
        shard = folder / entry["file"]
        if not shard.is_file():
            raise SprinterError(f"data: shard {entry['file']!r} listed in {str(path)!r} is missing")
        config = manifest.get("config")
        settings = settings_fingerprint(config) if isinstance(config, dict) else None
        check_shard_pair(shard, pair["draft"], pair["target"], manifest.get("context_source"), settings)
        rows = shard_entry(shard)["rows"]
        if rows != entry["rows"]:
            raise SprinterError(f"data: shard {entry['file']!r} has {rows} rows; the manifest says {entry['rows']}")
    total = sum(entry["rows"] for entry in shards)
    if total != manifest.get("num_samples"):
        raise SprinterError(f"data: shards of {str(folder)!r} hold {total} rows; the manifest says "
                            f"num_samples={manifest.get('num_samples')}")
    return manifest


def unlisted_shards(folder: str | Path, manifest: dict) -> list[str]:
    """Shard files in a finished collection's folder that its manifest does not list (copied in by hand: never
    read, so worth a word)."""
    listed = {entry["file"] for entry in manifest.get("shards", [])}
    return sorted(p.name for p in complete_shards(folder) if p.name not in listed)


def iter_shards(folder: str | Path, names: list[str] | tuple[str, ...] | None = None
                ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, {column: memory-mapped tensor}) for each shard in manifest order (all columns if names is None)."""
    folder = Path(folder)
    for entry in read_manifest(folder)["shards"]:
        columns = map_safetensors(folder / entry["file"])
        keys = list(columns) if names is None else list(names)
        missing = [name for name in keys if name not in columns]
        if missing:
            raise SprinterError(f"data: shard {str(folder / entry['file'])!r} lacks column(s) {missing}; "
                                f"it has {sorted(columns)}")
        yield entry["file"], {name: columns[name] for name in keys}


def load_columns(folder: str | Path, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The named columns of every shard, concatenated in manifest order (a copy in RAM: for small columns)."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for _, columns in iter_shards(folder, names):
        for name in names:
            parts[name].append(columns[name])
    if not any(parts.values()):
        raise SprinterError(f"data: {str(folder)!r} holds no rows")
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


__all__ = ["FORMAT", "LABELS", "MANIFEST", "RELAXED_LAMBDA", "REQUIRED_COLUMNS", "ShardWriter", "check_shard_pair",
           "complete_shards", "iter_shards", "unlisted_shards",
           "load_columns", "map_safetensors", "read_header", "read_manifest", "shard_entry", "shard_name",
           "write_manifest"]
