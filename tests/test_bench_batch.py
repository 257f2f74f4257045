"""scripts/bench_batch.py on the tiny pair: the sweep runs, checks every row against batched ar, writes its reports."""

import json
from pathlib import Path

import pytest
import torch

from sprinter.bench.batch import BatchBenchConfig, run_sweep
from sprinter.config import parse_config
from sprinter.errors import SprinterError

ROOT = Path(__file__).resolve().parent.parent


def sweep(tiny_pair, out, *extra):
    before = torch.get_num_threads()
    cfg = parse_config(BatchBenchConfig, ["--config", str(ROOT / "configs/bench_batch/tiny.yaml"), "--draft",
                                          str(tiny_pair / "draft"), "--target", str(tiny_pair / "target"), "--out",
                                          str(out), "--i-knee", "4", *extra], "test")
    try:
        return run_sweep(cfg)
    finally:
        torch.set_num_threads(before)


def test_tiny_sweep_writes_its_reports(tiny_pair, tmp_path):
    results = sweep(tiny_pair, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["partial"] is False
    assert on_disk["k_rule"] == {"1": 4, "3": 1} and list(on_disk["methods"]) == ["ar", "sd-k4", "ngram", "ngram-k2"]
    for _size, cell in results["cells"]["code"].items():
        assert cell["ar"]["speedup_vs_ar"] == 1.0 and cell["ngram"]["tokens"] == cell["ar"]["tokens"]
        assert 0 <= cell["ngram"]["draft_share"] < 1
    assert "| 3 |" in (tmp_path / "results.md").read_text() and (tmp_path / "batch.png").exists()
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in records] == ["code/1"] * 4 + ["code/3"] * 4

    # A sweep killed while appending the last cell: --resume drops the torn line, keeps code/1, reruns code/3.
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    with pytest.raises(SprinterError, match="expected --resume"):
        sweep(tiny_pair, tmp_path)
    again = sweep(tiny_pair, tmp_path, "--resume")
    assert again["cells"]["code"]["1"] == results["cells"]["code"]["1"]
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == len(lines)


@pytest.mark.parametrize("argv,message", [(["--batch-sizes", "0"], "batch_sizes"), (["--fixed-k", "0"], "fixed_k"),
                                          (["--i-knee", "-1"], "i_knee"), (["--domains", "poetry"], "domains"),
                                          (["--resume", "--overwrite"], "at most one")])
def test_bad_options_are_refused(argv, message):
    with pytest.raises(SprinterError, match=message):
        parse_config(BatchBenchConfig, argv, "test")


def test_a_stopped_sweep_keeps_its_finished_cells(tiny_pair, tmp_path, monkeypatch):
    import sprinter.bench.batch as batch

    real, calls = batch.run_cell, []

    def stop_at_the_second_cell(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # as a time budget's signal would
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "run_cell", stop_at_the_second_cell)
    before = torch.get_num_threads()
    cfg = parse_config(BatchBenchConfig, ["--config", str(ROOT / "configs/bench_batch/tiny.yaml"), "--draft",
                                          str(tiny_pair / "draft"), "--target", str(tiny_pair / "target"), "--out",
                                          str(tmp_path), "--i-knee", "4"], "test")
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cfg)
    finally:
        torch.set_num_threads(before)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["partial"] is True and list(on_disk["cells"]["code"]) == ["1"]
