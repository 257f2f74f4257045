"""Train a verifier on collected shards: python scripts/train.py [--data DIR ...] [--out DIR] [--config YAML]

With no arguments: trains on data/demo/ and writes checkpoints/verifiers/demo/ (verifier.safetensors,
metrics.json, train_config.json, TensorBoard run, Lightning .ckpt files for --resume).
"""

import sys

from sprinter.errors import run_cli
from sprinter.train.fit import parse_train_config, summary_lines, train


def main(argv=None) -> None:
    cfg = parse_train_config(argv)
    metrics = train(cfg)
    if metrics:  # DDP ranks other than 0 return {}
        print("\n".join(summary_lines(metrics)))
        print(f"verifier written to {cfg.out}/verifier.safetensors; metrics in {cfg.out}/metrics.json; "
              f"TensorBoard: tensorboard --logdir {cfg.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
