"""The regime map: which mode the latency model predicts fastest over greedy agreement and draft/target cost.

    python scripts/regime_map.py checkpoints/pairs/demo/pair.json checkpoints/pairs/bench/pair.json
    python scripts/regime_map.py --out docs/regime_map.png --table docs/regime_map.md --slope 0.05 PAIR.json ...
    python scripts/regime_map.py --verifier checkpoints/verifiers/bench checkpoints/pairs/bench/pair.json

Draws OUT (a PNG: the fastest of ar, sd, sd-gated and sprinter at the 0.05 budget in each region, its predicted
speedup over ar as contours, the given pairs marked from their pair.json) and prints (or writes) the markdown
table. The assumptions (flat acceptance shape, verifier rates, verification slope) are in docs/latency.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sprinter.bench.regime_map import measured_rates, pair_point, plot_regime_map, regime_grid, regime_table
from sprinter.config import option, parse_config
from sprinter.decode.latency import SPRINTER_RATES, STOP_RATES
from sprinter.errors import SprinterError, run_cli
from sprinter.files import read_json, write_atomic

TABLE_AGREEMENTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TABLE_RATIOS = (0.02, 0.05, 0.1, 0.15, 0.25, 0.4, 0.6)


@dataclass
class RegimeConfig:
    pairs: tuple[str, ...] = option((), "pair.json files of the pairs to mark (greedy_agreement, decode_step_ms)")
    out: str = option("docs/regime_map.png", "the PNG to draw")
    table: str | None = option(None, "write the markdown table here (none: print it)")
    slope: float = option(0.05, "verification cost: T(n) = T(1) (1 + slope (n - 1)), in target steps")
    gate_ratio: float = option(0.01, "a gate call's cost, in target steps")
    max_block: int = option(20, "sprinter / sd-gated: the longest block")
    true_accept: float = option(SPRINTER_RATES[0], "the verifier's true-accept rate at the 0.05 false-accept budget")
    verifier: str | None = option(None, "the verifier of the marked pair: its measured (true accept, false accept) at "
                                        "the 0.05 budget (metrics.json) replace true_accept and 0.05")

    def __post_init__(self) -> None:
        if not (0 <= self.true_accept <= 1) or self.slope < 0 or self.gate_ratio < 0 or self.max_block < 1:
            raise SprinterError(f"got true_accept={self.true_accept!r}, slope={self.slope!r}, gate_ratio="
                                f"{self.gate_ratio!r}, max_block={self.max_block!r}; expected true_accept in [0, 1], "
                                "slope and gate_ratio >= 0, max_block >= 1")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # pair.json files may also be given without --pairs (with it, they are its values)
    files = [] if any(a == "--pairs" or a.startswith("--pairs=") for a in args) else [a for a in args
                                                                                       if a.endswith(".json")]
    cfg = parse_config(RegimeConfig, [a for a in args if a not in files], "Draw the latency model's regime map.")

    pairs = {}
    for file in (*cfg.pairs, *files):
        if not Path(file).is_file():
            raise SprinterError(f"pair: got {file!r}, which does not exist; expected a pair.json")
        pairs[Path(file).parent.name] = pair_point(read_json(file, "pair.json"))
    true_accept, false_accept = (measured_rates(cfg.verifier) if cfg.verifier
                                 else (cfg.true_accept, SPRINTER_RATES[1]))
    rates = dict(sprinter_rates=(true_accept, false_accept), stop_rates=STOP_RATES, slope=cfg.slope,
                 gate_ratio=cfg.gate_ratio, max_block=cfg.max_block)
    agreements = [0.3 + 0.02 * i for i in range(33)]
    ratios = [0.02 * (30 ** (i / 39)) for i in range(40)]  # 0.02 .. 0.6, evenly on a log scale
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    plot_regime_map(agreements, ratios, regime_grid(agreements, ratios, **rates), pairs, cfg.out,
                    f"The fastest mode by the latency model; contours: its speedup over ar\n(flat acceptance, "
                    f"verification slope {cfg.slope:g} per token, verifier true-accept {true_accept:.2f} at "
                    f"false-accept {false_accept:.2f}{' (measured)' if cfg.verifier else ''}, gate "
                    f"{cfg.gate_ratio:g} of a target step)")
    table = regime_table(TABLE_AGREEMENTS, TABLE_RATIOS, regime_grid(TABLE_AGREEMENTS, TABLE_RATIOS, **rates))
    if cfg.table:
        write_atomic(cfg.table, table)
    else:
        print(table)
    print(f"written: {cfg.out}" + (f", {cfg.table}" if cfg.table else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
