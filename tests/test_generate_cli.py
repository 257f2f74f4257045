"""scripts/generate.py as a user runs it: streamed text, JSON output, one-line errors with exit code 2.

Most runs call the script's `main` in this process (a subprocess costs seconds of imports each);
one runs it as a program to cover the `__main__` path."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sprinter.decode.decoder import MODES
from sprinter.errors import run_cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate.py"


@pytest.fixture(scope="module")
def generate_main():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_json_output(generate_main, tiny_pair, capsys):
    argv = ["--pair", str(tiny_pair), "--mode", "sprinter", "--gate", "confidence", "--max-new-tokens", "6",
            "--threads", "1", "--json"]
    assert run_cli(generate_main, argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == out["stats"]["new_tokens"] <= 6
    assert out["stats"]["mode"] == "sprinter" and out["config"]["gate"] == "confidence"


def test_streams_text_and_a_stats_line(generate_main, tiny_pair, capsys):
    argv = ["--pair", str(tiny_pair), "--mode", "sd", "--prompt", "x = ", "--max-new-tokens", "5", "--threads", "1"]
    assert run_cli(generate_main, argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("x = ")
    assert "[sd] " in captured.err and "tokens/s" in captured.err


def test_auto_says_which_modes_ran(generate_main, tiny_pair, capsys):
    argv = ["--pair", str(tiny_pair), "--mode", "auto", "--max-new-tokens", "6", "--threads", "1", "--json"]
    assert run_cli(generate_main, argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["mode"] == "auto" and sum(out["stats"]["modes"].values()) == out["stats"]["new_tokens"]


def test_a_prompts_file_is_one_batch(generate_main, tiny_pair, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('"def f(x):\\n    return"\n"import os"\n')
    argv = ["--pair", str(tiny_pair), "--mode", "ngram", "--ngram-k", "2", "--prompts-file", str(tmp_path / "p.jsonl"),
            "--max-new-tokens", "5", "--threads", "1", "--json"]
    assert run_cli(generate_main, argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [o["prompt"] for o in out] == ["def f(x):\n    return", "import os"]
    assert all(o["stats"]["batch_size"] == 2 and len(o["token_ids"]) <= 5 for o in out)
    assert "[ngram, batch of 2]" in captured.err


def test_compare_shows_ar_beside_the_mode(generate_main, tiny_pair, capsys):
    """The README's main command: both texts, both speeds, the speedup and the identity check."""
    argv = ["--pair", str(tiny_pair), "--mode", "sd", "--compare", "--prompt", "x = ", "--max-new-tokens", "8",
            "--threads", "1"]
    assert run_cli(generate_main, argv) == 0
    out = capsys.readouterr().out
    assert "=== ar, the target alone" in out and "=== sd " in out and out.count("x = ") >= 2
    assert out.count("tokens/s") == 2 and "speedup: " in out
    assert "identical to ar's: yes" in out


def test_compare_json_says_how_far_a_lossy_mode_is(generate_main, tiny_pair, capsys):
    argv = ["--pair", str(tiny_pair), "--mode", "sprinter", "--gate", "never", "--compare", "--max-new-tokens", "8",
            "--threads", "1", "--json"]
    assert run_cli(generate_main, argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "sprinter" and out["lossless"] is False and out["speedup"] > 0
    assert out["ar"]["stats"]["mode"] == "ar" and out["accelerated"]["stats"]["target_calls"] == 0  # the draft alone
    differ = sum(a != b for a, b in zip(out["ar"]["token_ids"], out["accelerated"]["token_ids"]))
    assert out["tokens_differing"] == differ + abs(len(out["ar"]["token_ids"]) - len(out["accelerated"]["token_ids"]))
    assert out["identical"] == (out["tokens_differing"] == 0) and out["nll_ratio"] > 0


def test_the_demo_pair_says_what_it_is_once(generate_main, tiny_pair, tmp_path, capsys):
    demo = tmp_path / "demo"
    shutil.copytree(tiny_pair, demo)
    meta = json.loads((demo / "pair.json").read_text())
    (demo / "pair.json").write_text(json.dumps({**meta, "preset": "demo"}))
    argv = ["--mode", "sd", "--max-new-tokens", "4", "--threads", "1"]
    assert run_cli(generate_main, ["--pair", str(demo), *argv]) == 0
    assert capsys.readouterr().err.count("[demo pair] a toy") == 1
    assert run_cli(generate_main, ["--pair", str(tiny_pair), *argv]) == 0
    assert "[demo pair]" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--mode", "fast"], "mode"),
    (["--mode", "sprinter"], "scripts/train.py"),  # no verifier here, and no gate: before any pair is built
    (["--mode", "sd-gated"], "'sd-gated' need a gate"),
    (["--mode", "sd", "--datastore", "ds"], "only with mode='ngram'"),
    (["--mode", "async", "--window", "0"], "window: got 0"),
    (["--mode", "ar", "--max-new-tokens", "9999"], "context window"),
    (["--mode", "sd", "--k", "0"], "k: got 0"),
    (["--mode", "auto", "--max-false-accept", "0.05"], "max_false_accept: got 0.05 and no verifier"),
    (["--mode", "sd", "--max-false-accept", "0.05"], "expected it only with a mode of ('auto', 'sprinter')"),
    (["--pair", "nowhere", "--mode", "ar"], "pair"),
    (["--prompts-file", "p.txt"], "mode='sprinter'"),
    (["--mode", "ar", "--prompts-file", "missing.txt"], "existing text file"),
    (["--mode", "ar", "--compare"], "compare: got it with mode='ar'"),
    (["--mode", "sd", "--compare", "--prompts-file", "p.txt"], "expected one --prompt"),
])
def test_errors_are_one_line(generate_main, tiny_pair, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # a fresh folder: no demo verifier
    if "--pair" not in argv:
        argv = ["--pair", str(tiny_pair), *argv]
    assert run_cli(generate_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_runs_as_a_program(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "fast"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: mode: got 'fast'; expected one of {MODES}"]
