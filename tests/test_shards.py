"""The shard format: atomic writes, manifest checks, column loading without pickle."""

import errno
import json
import os

import pytest
import torch

from sprinter.data.shards import (
    FORMAT,
    ShardWriter,
    complete_shards,
    iter_shards,
    load_columns,
    read_manifest,
    write_manifest,
)
from sprinter.errors import SprinterError


def _rows(start: int, n: int) -> dict[str, torch.Tensor]:
    return {"hidden": torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 3),
            "prompt_index": torch.arange(start, start + n)}


def _finish(folder, entries):
    write_manifest(folder, {"format": FORMAT, "num_samples": sum(e["rows"] for e in entries), "shards": entries})


def test_writer_streams_shards_and_loader_concatenates(tmp_path):
    writer = ShardWriter(tmp_path, rows_per_shard=4)
    for start in range(0, 10, 2):
        writer.add(_rows(start, 2))
    entries = writer.close()
    assert [e["rows"] for e in entries] == [4, 4, 2]
    assert [e["file"] for e in entries] == ["shard-00000.safetensors", "shard-00001.safetensors",
                                            "shard-00002.safetensors"]
    _finish(tmp_path, entries)
    cols = load_columns(tmp_path, ["prompt_index", "hidden"])
    assert cols["prompt_index"].tolist() == list(range(10))
    assert cols["hidden"].shape == (10, 3)
    assert [name for name, _ in iter_shards(tmp_path)] == [e["file"] for e in entries]
    assert read_manifest(tmp_path)["num_samples"] == 10


def test_ranks_never_collide_and_resume_continues_numbering(tmp_path):
    ShardWriter(tmp_path, 2, rank=1).close()
    a = ShardWriter(tmp_path, 2, rank=1)
    a.add(_rows(0, 2))
    b = ShardWriter(tmp_path, 2, rank=1)  # a resumed writer of the same rank
    b.add(_rows(2, 2))
    assert [p.name for p in complete_shards(tmp_path)] == ["shard-r1-00000.safetensors", "shard-r1-00001.safetensors"]


def test_manifest_problems_are_clear(tmp_path):
    with pytest.raises(SprinterError, match="no manifest.json"):
        read_manifest(tmp_path)
    writer = ShardWriter(tmp_path, rows_per_shard=2)
    writer.add(_rows(0, 2))
    with pytest.raises(SprinterError, match="unfinished collection"):
        read_manifest(tmp_path)
    entries = writer.close()
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "num_samples": 3,
                                                        "shards": [{**entries[0], "rows": 3}]}))
    with pytest.raises(SprinterError, match="has 2 rows; the manifest says 3"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(SprinterError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_full_disk_keeps_finished_shards_and_leaves_no_partial_file(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path, rows_per_shard=2)
    writer.add(_rows(0, 2))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SprinterError, match="No space left on device.*1 shard.*--resume"):
        writer.add(_rows(2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]


def test_readers_map_the_files_instead_of_copying_them(tmp_path):
    writer = ShardWriter(tmp_path, rows_per_shard=4)
    writer.add(_rows(0, 4))
    _finish(tmp_path, writer.close())
    (_, columns), = iter_shards(tmp_path)
    # Every column is a view of one copy-on-write map of the file: no column was read into its own buffer.
    assert columns["hidden"].untyped_storage().data_ptr() == columns["prompt_index"].untyped_storage().data_ptr()
    columns["prompt_index"][0] = 99  # copy-on-write: the file is unchanged
    assert load_columns(tmp_path, ["prompt_index"])["prompt_index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(SprinterError, match="lacks column"):
        next(iter_shards(tmp_path, ["draft_margin"]))
