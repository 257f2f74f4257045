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

from sprinter.bench.batch import (
    BatchBenchConfig,
    default_config_path,
    markdown,
    run_sweep,
)
from sprinter.config import parse_config
from sprinter.errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(BatchBenchConfig, argv, "Batch sweep: tokens/s of batched ar, sd and ngram as B grows.",
                       default_config_path())
    results = run_sweep(cfg)
    print(markdown(results))
    print(f"written: {Path(cfg.out) / 'results.json'}, results.md, batch.png", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
