"""The verifier ablation (docs/training.md):
python scripts/ablate_verifier.py [--data DIR] [--out DIR] [--runs DIR] [--rows ...]

Trains one verifier per row (one change at a time against the default, same splits), scores each on the
greedy label (thresholds on val, figures on test), times its decode-time gate, and writes
OUT/ablation.json and OUT/ablation.md (default OUT: results/verifiers; the runs go to data/ablation).
"""

import sys

from sprinter.errors import run_cli
from sprinter.train.ablation import run_rows


def main(argv=None) -> None:
    table = run_rows(argv)
    print(f"{len(table['rows'])} rows written to ablation.json and ablation.md")


if __name__ == "__main__":
    sys.exit(run_cli(main))
