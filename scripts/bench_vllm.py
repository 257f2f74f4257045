"""The vLLM benchmark: vLLM plain, draft_model at fixed k, ngram and the sprinter proposer, beside sprinter's own
Decoder, on one pair (docs/vllm.md). Needs vLLM (bash scripts/install_vllm.sh, in its own environment):

    nice -n 10 python scripts/bench_vllm.py --pair checkpoints/pairs/bench --verifier checkpoints/verifiers/bench \
        --out results/vllm/bench

Options and defaults: sprinter.bench.vllm.BenchVllmConfig (or --help).
"""

import sys

from sprinter.bench.vllm import BenchVllmConfig, run
from sprinter.config import parse_config
from sprinter.errors import run_cli


def main(argv=None) -> None:
    cfg = parse_config(BenchVllmConfig, argv, "vLLM with and without speculation, beside sprinter's Decoder.")
    results = run(cfg)
    print(f"{len(results['rows'])} rows written to {cfg.out}/results.md and results.json")


if __name__ == "__main__":
    sys.exit(run_cli(main))
