"""Build an offline draft/target pair: python scripts/make_pair.py --preset {tiny,demo,bench} [--arch gpt2|llama]"""

import json
import sys

from sprinter.errors import run_cli
from sprinter.pairs.build import build_pair, parse_pair_config


def main(argv=None) -> None:
    cfg = parse_pair_config(argv)
    meta = build_pair(cfg)
    keys = ("target_params", "draft_params", "target_val_loss", "draft_val_loss", "greedy_agreement", "decode_step_ms",
            "training_seconds")
    print(json.dumps({k: meta[k] for k in keys}, indent=1))
    print(f"pair written to {cfg.out_dir}/ (target/, draft/, pair.json)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
