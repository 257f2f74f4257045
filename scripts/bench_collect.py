"""Labelled tokens/s of the corpus and decode sources vs the SPRINTER release's sequential loop.

python scripts/bench_collect.py [--draft D --target T] [--num-prompts 16] [--threads 2]
Writes results/collect/bench-<time>.json and prints a table. Not a test: keep runs short.
"""

import sys

from sprinter.bench.collect import parse_bench_config, run_benchmark, write_results
from sprinter.errors import run_cli


def main(argv=None) -> None:
    cfg = parse_bench_config(argv)
    report = run_benchmark(cfg)
    path = write_results(cfg, report)
    print(f"{'method':<20}{'rows':>8}{'seconds':>10}{'tokens/s':>12}{'speedup':>10}")
    for name, r in report["results"].items():
        print(f"{name:<20}{r['rows']:>8}{r['seconds']:>10.2f}{r['labelled_tokens_per_s']:>12.1f}"
              f"{r['speedup_vs_release']:>9.1f}x")
    print(f"first rows agree with the release loop: {report['first_row_agreement']}")
    print(f"results written to {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
