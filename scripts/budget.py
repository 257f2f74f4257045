"""Declared vs measured decode-time false-accept rate: python scripts/budget.py --pair P --verifier V [--out DIR]

For each temperature (0; 0.8 with top-p 0.95) and each budget F in {0.02, 0.05, 0.1}, mode sprinter decodes
held-out prompts (test split) at F with the calibrated threshold fixed and adapted online, and writes
OUT/results.json and OUT/results.md: declared F, measured false-accept rate with its 90% interval, flag rate,
ms/token, and whether the budget holds (sprinter.bench.budget).
"""

import sys

from sprinter.bench.budget import parse_budget_config, run
from sprinter.errors import run_cli


def main(argv=None) -> None:
    cfg = parse_budget_config(argv)
    results = run(cfg)
    held = sum(r["holds"] for r in results["rows"])
    print(f"{held} of {len(results['rows'])} rows hold their budget; {cfg.out}/results.md")


if __name__ == "__main__":
    sys.exit(run_cli(main))
