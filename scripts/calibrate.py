"""Decode-time calibration of a trained verifier: python scripts/calibrate.py --verifier V --data D [D2 ...]

Each D is an on-policy collection over the prompts V was trained on, at one temperature
(`python scripts/collect.py --source onpolicy --verifier V ...`); the rows of V's val prompts pick, for each budget
F, the lowest threshold at which at most F of the passed tokens are ones the target rejects (at the upper end of
the 90% interval by default). The thresholds go into V's metadata (`kept_thresholds`, preferred at that
temperature by `max_false_accept=F`) and V/calibration.json (sprinter.train.recalibrate).
"""

import sys

from sprinter.errors import run_cli
from sprinter.train.recalibrate import calibrate_decode_time, parse_calibrate_config, summary


def main(argv=None) -> None:
    cfg = parse_calibrate_config(argv)
    report = calibrate_decode_time(cfg)
    print(summary(report))
    if not cfg.dry_run:
        print(f"written: {cfg.verifier}/verifier.safetensors (kept_thresholds), {cfg.verifier}/calibration.json")


if __name__ == "__main__":
    sys.exit(run_cli(main))
