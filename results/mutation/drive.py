"""The fourth run's driver: the mutants `mutmut run` had not reached, each against a short test selection first.

mutmut 3 runs, for each mutant, every test its stats say reaches the mutated function; for the functions every
decode test reaches (Sampler.probs, CachedLM.append, ...) that is most of the suite, up to ten minutes a mutant on
two shared cores. This driver runs in mutmut's own mutants/ folder and uses its trampolines (the environment
variable MUTANT_UNDER_TEST picks the mutant), so a mutant means what it means to mutmut. Each not-run mutant
(exit code None in mutants/**/*.meta) gets

- phase A: the test files written for its function (tests/test_mutants.py and the function's unit tests), `-x`;
- phase B, for the ones phase A did not kill: mutmut's whole selection (pyproject's
  pytest_add_cli_args_test_selection), `-x`.

A mutant is killed when a test fails (pytest exit code 1), survives when every test passes (0); a phase that runs
past its time limit is a timeout (counted apart, as mutmut counts it). The tiny pairs are built once
(SPRINTER_TEST_PAIRS); torch and sprinter are imported once and every mutant's test session is a fork.

    cd MUT/mutants && PYTHONPATH=$PWD python ../../main/results/mutation/drive.py --workers 2 --out ../run4.jsonl
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport mutmut itself reads its settings with
    import tomli as tomllib

SELECTION_A = {
    "sprinter.decode.sampling.": ["tests/test_mutants.py", "tests/test_acceptance.py", "tests/test_invariants.py",
                                  "tests/test_decode.py"],
    "sprinter.decode.acceptance.": ["tests/test_acceptance.py", "tests/test_mutants.py", "tests/test_invariants.py",
                                    "tests/test_decode_distribution.py"],
    "sprinter.decode.cache.": ["tests/test_mutants.py", "tests/test_invariants.py", "tests/test_decode.py",
                               "tests/test_batched.py"],
}
LIMIT = {"A": 240.0, "B": 900.0}


def not_run() -> list[str]:
    names = []
    for meta in sorted(glob.glob("sprinter/**/*.meta", recursive=True)):
        codes = json.load(open(meta))["exit_code_by_key"]
        names += [name for name, code in codes.items() if code is None]
    return names


def done(out: str) -> dict[str, dict]:
    final = {}
    if os.path.exists(out):
        for line in open(out):
            row = json.loads(line)
            final[row["mutant"]] = row
    return final


def start(name: str, tests: list[str], log: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    import pytest
    from mutmut.mutation.trampoline import set_mutant_under_test

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    set_mutant_under_test(name)
    code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
    os._exit(int(code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="../run4.jsonl")
    parser.add_argument("--logs", default="../run4-logs")
    parser.add_argument("--only", nargs="*", help="these mutants (a trial; a name no module holds runs the tests "
                                                  "unmutated: every phase must pass)")
    parser.add_argument("--phases", default="AB", help="A, B or AB")
    args = parser.parse_args()
    os.makedirs(args.logs, exist_ok=True)
    os.environ.setdefault("SPRINTER_TEST_PAIRS", os.path.abspath("../test-pairs"))
    whole = tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
    # the same tests, tests/test_mutants.py first: the unit tests written against survivors fail fastest
    whole = sorted(whole, key=lambda path: path != "tests/test_mutants.py")
    import torch  # noqa: F401  (imported once, before the forks)
    import transformers  # noqa: F401

    import sprinter.decode.decoder  # noqa: F401

    finished = done(args.out)
    queue = []
    for name in args.only or not_run():
        row = finished.get(name)
        if row is None:
            queue.append((name, args.phases[0]))
        elif row["phase"] == "A" and row["status"] != "killed" and "B" in args.phases:
            queue.append((name, "B"))
    print(f"{len(queue)} mutant phases to run", flush=True)
    running: dict[int, tuple[str, str, float]] = {}
    while queue or running:
        while queue and len(running) < args.workers:
            name, phase = queue.pop(0)
            tests = next((t for prefix, t in SELECTION_A.items() if name.startswith(prefix)), whole) \
                if phase == "A" else whole
            pid = start(name, tests, os.path.join(args.logs, f"{name}.{phase}.log"))
            running[pid] = (name, phase, time.time())
        time.sleep(0.2)
        for pid, (name, phase, began) in list(running.items()):
            waited, status = os.waitpid(pid, os.WNOHANG)
            seconds = time.time() - began
            if not waited and seconds < LIMIT[phase]:
                continue
            if not waited:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                code, result = None, "timeout"
            else:
                code = os.waitstatus_to_exitcode(status)
                result = {0: "survived", 1: "killed"}.get(code, f"error {code}")
            del running[pid]
            with open(args.out, "a") as f:
                f.write(json.dumps({"mutant": name, "phase": phase, "status": result, "code": code,
                                    "seconds": round(seconds, 1)}) + "\n")
            print(f"{phase} {result:9s} {seconds:6.1f}s {name}", flush=True)
            if phase == "A" and result != "killed" and "B" in args.phases:
                queue.append((name, "B"))


if __name__ == "__main__":
    sys.exit(main())
