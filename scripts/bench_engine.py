"""Eager vs compiled decoding, side by side in one run: ms/token per mode, where a token's time goes, compile cost.

    python scripts/bench_engine.py                               # the bench pair, one thread: results/engine/bench-cpu
    python scripts/bench_engine.py --pair demo --num-prompts 2   # a quick look
    python scripts/bench_engine.py --device cuda                 # on a GPU: CUDA graphs (mode "reduce-overhead")

Options and defaults: sprinter.bench.engine.EngineBenchConfig (or --help). docs/engine.md explains the engine.
"""

from __future__ import annotations

import sys
from typing import Sequence

from sprinter.bench.engine import EngineBenchConfig, run_engine_bench
from sprinter.config import parse_config
from sprinter.errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    run_engine_bench(parse_config(EngineBenchConfig, argv, "Eager vs compiled decoding, side by side."))


if __name__ == "__main__":
    sys.exit(run_cli(main))
