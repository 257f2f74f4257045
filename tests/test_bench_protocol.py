"""The benchmark protocol (sprinter.bench.protocol): rotated order, warm-up, the lossless check, and records that
survive a torn tail or a full disk. Model-free: the runs themselves are tested in test_bench.py."""

import json
from pathlib import Path

import pytest
import torch

from sprinter.bench.protocol import (
    RECORDS,
    RUN,
    append_records,
    check_lossless,
    machine,
    open_records,
    print_report,
    rotated,
    save_results,
    warm_up,
)
from sprinter.errors import SprinterError

HEADER = {"options": {"seed": 0, "max_new_tokens": 8}, "methods": ["ar", "sd-k4"]}


def record(prompt: int, method: str) -> dict:
    return {"prompt": prompt, "method": method, "tokens": [1, 2, 3], "stats": {"new_tokens": 3}}


def finished_run(out: Path, prompts: int = 2) -> list[str]:
    """A run of `prompts` finished prompts in OUT, as the benchmark leaves it; returns the record lines."""
    assert open_records(out, HEADER, resume=False, overwrite=False) == {}
    for p in range(prompts):
        append_records(out, [record(p, m) for m in HEADER["methods"]])
    return (out / RECORDS).read_text().splitlines()


def test_rotated_starts_each_round_one_later():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotated(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert rotated([], 3) == []


def test_warm_up_runs_every_method_the_given_times():
    calls = []
    warm_up(["ar", "sd"], calls.append, times=2)
    assert calls == ["ar", "sd", "ar", "sd"]
    warm_up(["ar"], calls.append, times=0)
    assert len(calls) == 4


def test_check_lossless_names_the_method_and_the_place():
    with pytest.raises(SprinterError, match=r"sd-k4 is lossless .* on prompt 7 at new token 1: \[9\] vs \[2\]"):
        check_lossless("sd-k4", [1, 9], [1, 2], where="prompt 7")
    assert check_lossless("sd-k4", [1, 2], [1, 2], where="prompt 7") is None
    assert check_lossless("async-w2", [1, 9], [1, 2], where="prompt 7", tolerate=lambda i: i == 1) == 1


def test_a_fresh_run_refuses_an_out_that_holds_records(tmp_path):
    finished_run(tmp_path)
    with pytest.raises(SprinterError, match="already holds records.jsonl; expected --resume"):
        open_records(tmp_path, HEADER, resume=False, overwrite=False)
    assert open_records(tmp_path, HEADER, resume=False, overwrite=True) == {}
    assert (tmp_path / RECORDS).read_text() == ""


def test_resume_keeps_finished_prompts_and_drops_an_unfinished_one(tmp_path):
    lines = finished_run(tmp_path)
    (tmp_path / RECORDS).write_text("\n".join(lines[:3]) + "\n")  # prompt 1 lacks its sd-k4 record
    said = []
    done = open_records(tmp_path, HEADER, resume=True, overwrite=False, log=said.append)
    assert list(done) == [0] and said == ["resume: prompt 1 had not finished; it runs again"]
    assert (tmp_path / RECORDS).read_text().splitlines() == lines[:2]


@pytest.mark.parametrize("cut", [1, 10, -1], ids=["one-character", "hand-cut", "missing-brace"])
def test_resume_drops_a_torn_last_line_says_so_and_reruns_its_prompt(tmp_path, cut):
    lines = finished_run(tmp_path)
    torn = lines[-1][:cut]
    (tmp_path / RECORDS).write_text("\n".join(lines[:-1]) + "\n" + torn)  # a write cut short: no final newline
    said = []
    done = open_records(tmp_path, HEADER, resume=True, overwrite=False, log=said.append)
    assert list(done) == [0]
    assert said[0].startswith("resume: dropped the torn last line of") and f"line 4, {len(torn)} characters" in said[0]
    assert said[1] == "resume: prompt 1 had not finished; it runs again"
    assert (tmp_path / RECORDS).read_text().splitlines() == lines[:2]  # appends continue after whole lines
    append_records(tmp_path, [record(1, m) for m in HEADER["methods"]])
    assert (tmp_path / RECORDS).read_text().splitlines() == lines


def test_a_damaged_line_before_the_last_is_refused_not_dropped(tmp_path):
    lines = finished_run(tmp_path)
    lines[1] = lines[1][:12]
    (tmp_path / RECORDS).write_text("\n".join(lines) + "\n")
    with pytest.raises(SprinterError, match=r"records: line 2 of .* is not a record .*--overwrite"):
        open_records(tmp_path, HEADER, resume=True, overwrite=False)


def test_resume_refuses_other_options_and_a_damaged_run_file(tmp_path):
    finished_run(tmp_path)
    other = {**HEADER, "options": {"seed": 1, "max_new_tokens": 8}}
    with pytest.raises(SprinterError, match=r"other options.*\['seed'\]"):
        open_records(tmp_path, other, resume=True, overwrite=False)
    (tmp_path / RUN).write_text('{"options": {"se')
    with pytest.raises(SprinterError, match="other options"):
        open_records(tmp_path, HEADER, resume=True, overwrite=False)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_while_appending_is_one_error_that_says_to_resume(tmp_path):
    finished_run(tmp_path, prompts=0)
    (tmp_path / RECORDS).unlink()
    (tmp_path / RECORDS).symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(SprinterError) as err:
        append_records(tmp_path, [record(0, "ar")])
    message = str(err.value)
    assert "appending to" in message and "No space left on device" in message and "--resume" in message
    assert "\n" not in message


def test_results_are_written_whole_with_the_machine_they_ran_on_and_reported_on_two_streams(tmp_path, capsys):
    results = {"format": "x/1", **machine(torch.device("cpu"), torch.float32), "methods": []}
    assert results["hardware"]["device"] == "cpu" and results["hardware"]["dtype"] == "float32"
    assert results["libraries"]["torch"] == torch.__version__
    save_results(tmp_path, results, "| table |\n")
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "results.md").read_text() == "| table |\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temporary file left
    print_report(["| a |", "| b |"], "OUT/results.json, results.md")
    out, err = capsys.readouterr()
    assert out == "| a |\n| b |\n" and err == "written: OUT/results.json, results.md\n"  # a pipe reads the tables


def test_the_benchmark_scripts_read_their_presets(tmp_path):
    from sprinter.bench.batch import parse_batch_config
    from sprinter.bench.benchmark import parse_bench_config

    assert parse_batch_config([]).fixed_k == (2, 4)  # configs/bench_batch/demo.yaml; the class default is (4,)
    assert parse_batch_config(["--fixed-k", "8"]).fixed_k == (8,)  # a flag beats the preset
    assert parse_bench_config(["--out", str(tmp_path)]).out == str(tmp_path)
