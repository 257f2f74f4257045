"""Shard folders are read without copies, split by prompt, and refused clearly when they are unusable."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sprinter.data.synthetic import write_shards
from sprinter.errors import SprinterError
from sprinter.train.data import BatchSampler, loader, open_folders, split_prompts

FEATURES = ("hidden", "token_id", "draft_prob", "draft_entropy", "position")


def test_gather_across_shards_matches_the_files(tmp_path):
    folder = write_shards(tmp_path / "d", num_prompts=10, tokens_per_prompt=7, num_shards=3)
    _, table = open_folders([folder], FEATURES, "soft")
    full = {k: torch.cat([load_file(str(folder / f"shard-{i:05d}.safetensors"))[k] for i in range(3)])
            for k in ("hidden", "token_id", "accept_sprinter")}
    rows = torch.tensor([69, 0, 23, 24, 47, 5])
    for name, values in full.items():
        assert torch.equal(table.gather(name, rows), values[rows])
    batch = next(iter(loader(table, FEATURES, "soft", rows, batch_size=4, shuffle=False)))
    assert batch["hidden"].shape == (4, 16) and set(batch["eval_label"].tolist()) <= {0.0, 1.0}
    assert torch.equal(batch["label"], table.gather("accept_soft", rows[:4].sort().values))


def test_split_never_shares_a_prompt_and_covers_every_row():
    g = torch.Generator().manual_seed(0)
    prompt_index = torch.randint(0, 37, (2000,), generator=g)
    splits = split_prompts(prompt_index, 0.2, 0.2, seed=3)
    sets = {name: set(prompt_index[rows].tolist()) for name, rows in splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sorted(torch.cat(list(splits.values())).tolist()) == list(range(2000))
    assert all(len(s) > 0 for s in sets.values())
    assert torch.equal(split_prompts(prompt_index, 0.2, 0.2, seed=3)["test"], splits["test"])  # seeded


def test_sampler_gives_each_rank_disjoint_equal_batches():
    rows = torch.arange(103)
    parts = [list(BatchSampler(rows, 10, shuffle=True, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(BatchSampler(rows, 10, shuffle=True, rank=1, world_size=2)) == 6
    seen = [set(torch.cat(p).tolist()) for p in parts]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 51
    evals = [torch.cat(list(BatchSampler(rows, 10, shuffle=False, rank=r, world_size=2))) for r in (0, 1)]
    assert sorted(torch.cat(evals).tolist()) == rows.tolist()  # evaluation sees every row once


def rewrite(file, **changes):
    tensors = load_file(str(file))
    tensors.update(changes)
    save_file(tensors, str(file))


def test_bad_inputs_are_refused_before_training(tmp_path):
    good = write_shards(tmp_path / "good")
    with pytest.raises(SprinterError, match="no manifest.json"):
        open_folders([tmp_path], FEATURES, "sprinter")
    other_hidden = write_shards(tmp_path / "h32", hidden_size=32)
    with pytest.raises(SprinterError, match="hidden size"):
        open_folders([good, other_hidden], FEATURES, "sprinter")
    other_draft = write_shards(tmp_path / "draft", draft={"name": "other", "fingerprint": "zzz"})
    with pytest.raises(SprinterError, match="different drafts"):
        open_folders([good, other_draft], FEATURES, "sprinter")
    with pytest.raises(SprinterError, match="carry the target"):
        open_folders([good], (*FEATURES, "target_prob"), "sprinter")
    with pytest.raises(SprinterError, match="lacks column"):
        open_folders([good], (*FEATURES, "draft_margin"), "sprinter")

    short = write_shards(tmp_path / "short")
    shard = short / "shard-00000.safetensors"
    rewrite(shard, token_id=load_file(str(shard))["token_id"][:-1])
    with pytest.raises(SprinterError, match="row counts"):
        open_folders([short], FEATURES, "sprinter")

    miscount = write_shards(tmp_path / "miscount")
    manifest = json.loads((miscount / "manifest.json").read_text())
    manifest["num_samples"] += 5
    (miscount / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SprinterError, match="num_samples"):
        open_folders([miscount], FEATURES, "sprinter")

    nan = write_shards(tmp_path / "nan")
    probs = load_file(str(nan / "shard-00001.safetensors"))["draft_prob"]
    probs[3] = float("nan")
    rewrite(nan / "shard-00001.safetensors", draft_prob=probs)
    with pytest.raises(SprinterError, match="'draft_prob' has NaN"):
        open_folders([nan], FEATURES, "sprinter")

    single = write_shards(tmp_path / "single")
    for i in range(2):
        file = single / f"shard-0000{i}.safetensors"
        rewrite(file, accept_greedy=torch.zeros_like(load_file(str(file))["accept_greedy"]))
    with pytest.raises(SprinterError, match="single class"):
        open_folders([single], FEATURES, "greedy")
    open_folders([single], FEATURES, "sprinter")  # the other labels are still usable

    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "manifest.json").write_text((good / "manifest.json").read_text())
    (tmp_path / "garbage" / "shard-00000.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(SprinterError, match="not a readable safetensors"):
        open_folders([tmp_path / "garbage"], FEATURES, "sprinter")
