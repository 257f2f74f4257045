"""The data-scaling curve on decode-time contexts: python scripts/scaling_curve.py --verifiers V1 V2 ... --data D

V1, V2, ... are verifiers trained (scripts/train.py) on more and more rows of one prompt list; D is an on-policy
collection over that list (scripts/collect.py --source onpolicy --verifier V). Writes OUT/results.json,
OUT/results.md and OUT/scaling.png: AUROC and true-accept at --budget false-accept against training rows, on D's
rows of the verifiers' test prompts and on the training collections' own test rows (sprinter.train.scaling).
"""

import sys

from sprinter.errors import run_cli
from sprinter.train.scaling import parse_scaling_config, run


def main(argv=None) -> None:
    cfg = parse_scaling_config(argv)
    results = run(cfg)
    for r in sorted(results["points"], key=lambda r: r["train_rows"]):
        d = r["decode_time"]
        print(f"{r['verifier']}: {r['train_rows']} training rows; decode-time AUROC {d['auroc']:.3f}, true-accept "
              f"{d['true_accept']:.3f} at {cfg.budget} false-accept")
    print(f"{cfg.out}/results.md, {cfg.out}/scaling.png")


if __name__ == "__main__":
    sys.exit(run_cli(main))
