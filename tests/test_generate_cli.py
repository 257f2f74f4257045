"""scripts/generate.py as a user runs it: JSON output, one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_json_output(tiny_pair):
    proc = run("--pair", str(tiny_pair), "--mode", "sprinter", "--gate", "confidence", "--max-new-tokens", "6",
               "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == out["stats"]["new_tokens"] <= 6
    assert out["stats"]["mode"] == "sprinter" and out["config"]["gate"] == "confidence"


def test_streams_text_and_a_stats_line(tiny_pair):
    proc = run("--pair", str(tiny_pair), "--mode", "sd", "--prompt", "x = ", "--max-new-tokens", "5", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x = ")
    assert "[sd] " in proc.stderr and "tokens/s" in proc.stderr


def test_errors_are_one_line(tiny_pair, tmp_path):
    for args, message in ((["--mode", "fast"], "mode"),
                          (["--pair", str(tiny_pair), "--mode", "sprinter"], "scripts/train.py"),
                          (["--pair", str(tiny_pair), "--mode", "ar", "--max-new-tokens", "9999"], "context window")):
        proc = run(*args, cwd=tmp_path)  # a fresh folder: no demo verifier, no demo pair is built
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last
        assert "Traceback" not in proc.stderr
