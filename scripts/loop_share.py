"""How much of a pair's plain (`ar`) output loops, greedy and sampled, beside the held-out text itself.

    python scripts/loop_share.py                      # the demo pair: 20 held-out prompts x 128 tokens
    python scripts/loop_share.py --pair DIR --num-prompts 40 --temperature 0.6
    python scripts/loop_share.py --pair DIR --split val --max-new-tokens 64   # choosing a workload's length

The prompts and text come from the `val` split by default: the benchmark's workload lengths are chosen there
(sprinter.bench.workloads) and reported on `test`.

The figure is the share of generated tokens that complete a 4-gram the same output already holds
(sprinter.bench.compare.loop_share). Small targets loop under greedy decoding, which flatters drafting
(README, Quickstart). Options and defaults: sprinter.bench.compare.LoopShareConfig (or --help).
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from sprinter.bench.compare import LoopShareConfig, measure_loop_share
from sprinter.config import parse_config
from sprinter.errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(LoopShareConfig, argv, "The loop share of a pair's ar output, greedy and sampled.")
    print(json.dumps(measure_loop_share(cfg), indent=1))


if __name__ == "__main__":
    sys.exit(run_cli(main))
