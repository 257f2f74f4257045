"""Measure a pair's cost profile (draft step, target forwards over 1..max_block+1 tokens, gate calls) in ~2 s.

    python scripts/profile_pair.py --pair demo                      # writes checkpoints/pairs/demo/cost_profile.json
    python scripts/profile_pair.py --pair DIR --out FILE --threads 1 --verifier checkpoints/verifiers/demo

Options and defaults: sprinter.bench.costs.ProfileConfig (or --help). The profile feeds the latency model
(sprinter.decode.latency, docs/latency.md).
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from sprinter.bench.costs import ProfileConfig, profile_pair
from sprinter.config import parse_config
from sprinter.errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(ProfileConfig, argv, "Measure a draft/target pair's cost profile on this device.")
    profile, path = profile_pair(cfg)
    t = profile.target_ms
    print(json.dumps({"key": profile.key, "draft_step_ms": round(profile.draft_step_ms, 4),
                      "draft_run_ms": round(profile.draft_run_ms, 4),
                      "target_ms": {"n=1": round(t[0], 4), f"n={len(t)}": round(t[-1], 4)},
                      "draft_target_cost_ratio": round(profile.cost_ratio, 4),
                      "gate_ms": {k: round(v, 4) for k, v in profile.gate_ms.items()},
                      "round_ms": round(profile.round_ms, 4), "repeats": profile.repeats, "noise": profile.noise,
                      "seconds": profile.seconds}, indent=1))
    print(f"profile written to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
