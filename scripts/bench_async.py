"""ar, sd and async side by side on the demo and bench pairs (greedy; outputs checked equal to ar's).

    python scripts/bench_async.py                                  # demo and bench pairs, 20 prompts x 128 tokens
    python scripts/bench_async.py --pairs demo --num-prompts 4 --windows 2 4 --out /tmp/async
    python scripts/bench_async.py --resume                         # continue a killed run in --out

Writes OUT/<pair>/results.json and results.md (default OUT: results/async) and prints the tables.
Options and defaults: sprinter.bench.asynchronous.AsyncBenchConfig (or --help).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from sprinter.bench.asynchronous import AsyncBenchConfig, markdown, run
from sprinter.bench.protocol import print_report
from sprinter.config import parse_config
from sprinter.errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(AsyncBenchConfig, argv, "Benchmark ar, sd and async (draft and target in two threads).")
    print_report([markdown(results) for results in run(cfg)], f"{Path(cfg.out)}/<pair>/results.json, results.md")


if __name__ == "__main__":
    sys.exit(run_cli(main))
