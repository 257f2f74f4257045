"""Benchmark every decoding mode on the same prompts and hardware: speed and fidelity side by side.

    python scripts/benchmark.py                                    # configs/bench/demo.yaml: demo pair + verifier
    python scripts/benchmark.py --config configs/bench/tiny.yaml --draft D --target T --verifier V --out results/tiny
    python scripts/benchmark.py --methods ar sd hf-assisted --num-prompts 10 --max-new-tokens 64
    python scripts/benchmark.py --resume                           # continue an interrupted run in --out

Writes OUT/results.json, OUT/results.md and OUT/pareto.png (per-prompt records in OUT/records.jsonl).
Options and defaults: sprinter.bench.benchmark.BenchConfig (or --help).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from sprinter.bench.benchmark import parse_bench_config, run_benchmark
from sprinter.bench.protocol import print_report
from sprinter.bench.report import markdown
from sprinter.errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_bench_config(argv)
    print_report([markdown(run_benchmark(cfg))], f"{Path(cfg.out) / 'results.json'}, results.md, pareto.png")


if __name__ == "__main__":
    sys.exit(run_cli(main))
