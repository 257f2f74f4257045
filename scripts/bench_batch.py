"""The batch sweep: tokens/s of batched ar, sd and ngram for B in (1, 4, 8, 16, 32), on code and prose prompts.

    python scripts/bench_batch.py                                   # configs/bench_batch/demo.yaml: demo pair, 1 thread
    python scripts/bench_batch.py --threads 2 --out results/batch/demo-2t
    python scripts/bench_batch.py --config configs/bench_batch/gpu.yaml   # a CUDA device: the real picture
    python scripts/bench_batch.py --resume                          # continue a killed sweep in --out

Writes OUT/records.jsonl (a line per method of each finished cell), OUT/results.json, OUT/results.md and OUT/batch.png.
Options and defaults: sprinter.bench.batch.BatchBenchConfig
(or --help).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from sprinter.bench.batch import markdown, parse_batch_config, run_sweep
from sprinter.bench.protocol import print_report
from sprinter.errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_batch_config(argv)
    print_report([markdown(run_sweep(cfg))], f"{Path(cfg.out) / 'results.json'}, results.md, batch.png")


if __name__ == "__main__":
    sys.exit(run_cli(main))
