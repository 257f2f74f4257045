"""Collect draft features and accept labels: python scripts/collect.py [--draft D --target T] [--source corpus|decode]

With no arguments: the demo pair (built first if missing) on the standard library's `val` split, into
data/demo/. Several processes: torchrun --nproc-per-node N scripts/collect.py ... (each rank writes
its own shards; rank 0 writes the manifest).
"""

import sys

from sprinter.data.collect import collect, parse_collect_config, summary
from sprinter.errors import run_cli


def main(argv=None) -> None:
    cfg = parse_collect_config(argv)
    manifest = collect(cfg)
    if manifest is not None:
        print(summary(manifest))


if __name__ == "__main__":
    sys.exit(run_cli(main))
