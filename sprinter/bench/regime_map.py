"""The regime map: which mode the latency model (sprinter.decode.latency) predicts fastest over a grid of pairs,
by the draft's greedy agreement and its cost ratio (docs/latency.md, "The regime map"; scripts/regime_map.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sprinter.decode.costs import CostProfile
from sprinter.decode.latency import (
    SPRINTER_RATES,
    STOP_RATES,
    ar_ms,
    check_rates,
    sd_gated_ms,
    sd_ms,
    sprinter_ms,
    verifier_rates,
)
from sprinter.errors import SprinterError
from sprinter.files import read_json
from sprinter.verifier import budget_key

REGIME_MODES = ("ar", "sd", "sd-gated", "sprinter@0.05")


def synthetic_profile(cost_ratio: float, *, slope: float = 0.05, gate_ratio: float = 0.01, max_n: int = 21,
                      ) -> CostProfile:
    """A profile in units of one target step: T(n) = 1 + slope (n - 1), d = cost_ratio, g = gate_ratio, r = 0."""
    if not (cost_ratio > 0 and slope >= 0 and gate_ratio >= 0):
        raise SprinterError(f"synthetic profile: got cost_ratio={cost_ratio!r}, slope={slope!r}, "
                            f"gate_ratio={gate_ratio!r}; expected cost_ratio > 0 and the others >= 0")
    return CostProfile(pair="synthetic", device="model", dtype="-", threads=0, context=0, draft_step_ms=cost_ratio,
                       draft_hidden_step_ms=cost_ratio, target_ms=tuple(1 + slope * n for n in range(max_n)),
                       gate_ms={"learned": gate_ratio, "confidence": gate_ratio}, round_ms=0.0)


def flat_shape(agreement: float) -> tuple[float, ...]:
    """The regime map's assumption: every block position is accepted with the pair's greedy agreement,
    independently of the others (a_i = agreement)."""
    check_rates("agreement", (agreement,))
    return (float(agreement),)


def mode_times(profile: CostProfile, a: Sequence[float], *, ks: Sequence[int] = tuple(range(1, 9)),
               max_block: int = 20, sprinter_rates: tuple[float, float] = SPRINTER_RATES,
               stop_rates: Sequence[tuple[float, float]] = STOP_RATES) -> dict[str, tuple[float, str]]:
    """{mode: (predicted ms/token, its best setting)} for REGIME_MODES: sd over `ks`, sd-gated over `stop_rates`."""
    sd = min((sd_ms(profile, a, k), f"k={k}") for k in ks)
    gated = min((sd_gated_ms(profile, a, ta, fa, max_block), f"TA={ta:g}, FA={fa:g}") for ta, fa in stop_rates)
    return {"ar": (ar_ms(profile), ""), "sd": sd, "sd-gated": gated,
            "sprinter@0.05": (sprinter_ms(profile, a, *sprinter_rates, max_block), "")}


def fastest(times: dict[str, tuple[float, str]]) -> tuple[str, float]:
    """The fastest mode and its speedup over ar."""
    mode = min(times, key=lambda m: times[m][0])
    return mode, times["ar"][0] / times[mode][0]


def regime_grid(agreements: Sequence[float], cost_ratios: Sequence[float], *, slope: float = 0.05,
                gate_ratio: float = 0.01, max_block: int = 20, sprinter_rates: tuple[float, float] = SPRINTER_RATES,
                stop_rates: Sequence[tuple[float, float]] = STOP_RATES) -> list[list[tuple[str, float]]]:
    """grid[i][j]: the fastest of REGIME_MODES and its speedup over ar at cost_ratios[i] and agreements[j], on a
    synthetic profile (`synthetic_profile`) with the flat acceptance shape (`flat_shape`)."""
    grid = []
    for c in cost_ratios:
        profile = synthetic_profile(c, slope=slope, gate_ratio=gate_ratio, max_n=max_block + 2)
        grid.append([fastest(mode_times(profile, flat_shape(g), max_block=max_block, sprinter_rates=sprinter_rates,
                                        stop_rates=stop_rates)) for g in agreements])
    return grid


def regime_table(agreements: Sequence[float], cost_ratios: Sequence[float], grid: list[list[tuple[str, float]]]) -> str:
    """The regime map as a markdown table: rows cost ratio, columns greedy agreement, cells "mode speedup"."""
    lines = ["| cost ratio (rows), greedy agreement (columns) | " + " | ".join(f"{g:g}" for g in agreements) + " |",
             "|---|" + "---|" * len(agreements)]
    for c, row in zip(cost_ratios, grid, strict=True):
        lines.append(f"| {c:g} | " + " | ".join(f"{mode} {speedup:.2f}x" if mode != "ar" else "ar"
                                                for mode, speedup in row) + " |")
    return "\n".join(lines) + "\n"


def pair_point(meta: dict) -> tuple[float, float]:
    """(greedy agreement, draft/target cost ratio) of a pair from its pair.json (scripts/make_pair.py)."""
    try:
        steps = meta["decode_step_ms"]
        return float(meta["greedy_agreement"]), float(steps["draft"]) / float(steps["target"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise SprinterError("pair.json: expected greedy_agreement and decode_step_ms {target, draft} (written by "
                            "scripts/make_pair.py)") from None


def measured_rates(verifier: str | Path, budget: float = 0.05) -> tuple[float, float]:
    """(true accept, false accept) the verifier measured at `budget` on held-out data: its metrics.json (written
    by scripts/train.py beside the checkpoint). The regime map of a pair is drawn from these, not SPRINTER_RATES."""
    path = Path(verifier) / "metrics.json"
    if not path.is_file():
        raise SprinterError(f"verifier: got {str(verifier)!r}, which holds no metrics.json; expected a folder written "
                            "by scripts/train.py")
    rates = verifier_rates(read_json(path, "metrics.json"))
    if budget_key(budget) not in rates:
        raise SprinterError(f"verifier {str(verifier)!r}: no operating point at budget {budget:g} in metrics.json; "
                            f"expected one of {sorted(rates)}")
    return rates[budget_key(budget)]


def plot_regime_map(agreements: Sequence[float], cost_ratios: Sequence[float], grid: list[list[tuple[str, float]]],
                    pairs: dict[str, tuple[float, float]], path, title: str) -> None:
    """The regime map as a PNG: the fastest mode's region in colour, its speedup over ar as contours, and the
    measured pairs marked (name -> (agreement, cost ratio)). matplotlib is an extra: imported here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = {"ar": "#d9d9d9", "sd": "#9ecae1", "sd-gated": "#a1d99b", "sprinter@0.05": "#fdae6b"}
    index = [[REGIME_MODES.index(mode) for mode, _ in row] for row in grid]
    speedup = [[s for _, s in row] for row in grid]
    fig, ax = plt.subplots(figsize=(8.5, 6))
    ax.pcolormesh(agreements, cost_ratios, index, cmap=ListedColormap([colours[m] for m in REGIME_MODES]),
                  vmin=-0.5, vmax=len(REGIME_MODES) - 0.5, shading="nearest")
    lines = ax.contour(agreements, cost_ratios, speedup, levels=[1.0, 1.25, 1.5, 2.0, 3.0, 4.0], colors="black",
                       linewidths=0.8)
    ax.clabel(lines, fmt=lambda v: f"{v:g}x", fontsize=8)
    for name, (g, c) in pairs.items():
        ax.plot(g, c, marker="*", markersize=13, color="crimson", markeredgecolor="black", zorder=3)
        ax.annotate(f"{name} ({g:.2f}, {c:.2f})", (g, c), textcoords="offset points", xytext=(7, 5), fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda y, _: f"{y:g}" if round(y, 3) in (0.03, 0.05, 0.2, 0.3, 0.5) else ""))
    ax.set_xlabel("greedy agreement of draft and target (held-out text)")
    ax.set_ylabel("draft step / target step (log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=colours[m], label=f"fastest: {m}") for m in REGIME_MODES], loc="lower left",
              fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["REGIME_MODES", "fastest", "flat_shape", "measured_rates", "mode_times", "pair_point", "plot_regime_map",
           "regime_grid", "regime_table", "synthetic_profile"]
