"""The latency model: predicted ms/token for every mode, from a cost profile and acceptance statistics.

Pure functions (no model runs here). The derivations are in docs/latency.md; docs/references.md §1 and §8 give
the start. Every mode runs in rounds: the draft proposes a block, one target forward reads it, the round
emits the accepted tokens and one token of the target's own. Time per token is a round's expected cost over
its expected emitted tokens (a ratio of expectations: the long-run rate of a renewal process).

Costs come from a `CostProfile` (sprinter.bench.costs): d = a draft step (d_h with the hidden state a
learned gate reads), g = a gate call, T(n) = a target forward over n new tokens, r = the rest of a round.
Acceptance comes from `AcceptanceStats`:
- `by_position` a_0, a_1, ...: the chance that block position i is accepted given positions 0..i-1 were
  (greedy: the draft's token is the target's); positions past the list take its last value;
- `verifier`: the gate's true-accept rate (share of label-1 tokens it passes) and false-accept rate (share of
  label-0 tokens it passes) per false-accept budget, from the verifier's metrics.json;
- `ngram`: the n-gram drafter's drafted and accepted tokens per target call and its lookup time per call.

The formulas, with P_j = a_0 ... a_{j-1} the chance that the first j drafted tokens are all accepted:
- ar:     T(1);  draft: d
- sd, k:  (k d + T(k + 1) + r) / (1 + sum_{j=1..k} P_j)
- gated blocks (sprinter, sd-gated, strict sprinter): drafting stops at the first token the gate flags or
  after M = max_block tokens; a label-1 token passes with probability TA, a label-0 one with FA. A Markov
  chain over (block position, run of accepted tokens) gives the block length L's distribution (`gated_block`).
  Cost E[L] (d_h + g) + E[T(L + 1)] + r. Emitted: sprinter keeps the passed tokens unchecked, the flagged
  one when it agrees, and the target's token: E[L] - P(flagged) + P(flagged and label 1) + 1; sd-gated and
  strict sprinter keep the accepted prefix: 1 + sum_{j=1..M} P_j TA^(j-1).
- ngram:  (T(D + 1) + lookup + r) / (1 + A), D and A the drafted and accepted tokens per call.

Assumptions (see docs/latency.md): batch 1; greedy decoding; the prompt's prefill and the end of a
generation are ignored (a few percent at 64 prompt tokens and 128 new ones); a token's label depends only on
how many accepted tokens precede it since its block started or since the last label-0 token (the run), and
the gate's decision only on the token's label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from sprinter.bench.costs import CostProfile
from sprinter.errors import SprinterError


@dataclass(frozen=True)
class AcceptanceStats:
    """A run's acceptance statistics (see the module docstring)."""

    by_position: tuple[float, ...]  # a_i: P(position i accepted | positions 0..i-1 accepted)
    verifier: dict[str, tuple[float, float]] = field(default_factory=dict)  # budget key -> (true_accept, false_accept)
    ngram: tuple[float, float, float] | None = None  # (drafted per call, accepted per call, lookup ms per call)

    def __post_init__(self) -> None:
        if not self.by_position:
            raise SprinterError("by_position: got no acceptance rates; expected at least position 0's")
        check_rates("by_position", self.by_position)
        for budget, rates in self.verifier.items():
            check_rates(f"verifier rates at budget {budget}", rates)
        object.__setattr__(self, "by_position", tuple(float(a) for a in self.by_position))


def check_rates(name: str, rates: Sequence[float]) -> None:
    bad = [r for r in rates if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1]
    if bad:
        raise SprinterError(f"{name}: got {list(rates)!r}; expected probabilities in [0, 1]")


def rate_at(a: Sequence[float], i: int) -> float:
    """a_i, with positions past the list taking its last value."""
    return a[min(i, len(a) - 1)]


def prefix_accept(a: Sequence[float], j: int) -> float:
    """P_j = a_0 ... a_{j-1}: the first j drafted tokens are all accepted (P_0 = 1)."""
    out = 1.0
    for i in range(j):
        out *= rate_at(a, i)
    return out


# ------------------------------------------------------------------------------------------- the modes
def ar_ms(profile: CostProfile) -> float:
    return profile.target(1)


def draft_ms(profile: CostProfile) -> float:
    return profile.draft_step_ms


def sd_tokens_per_call(a: Sequence[float], k: int) -> float:
    """Expected tokens a standard SD round emits: the accepted prefix and the target's token."""
    return 1 + sum(prefix_accept(a, j) for j in range(1, k + 1))


def sd_ms(profile: CostProfile, a: Sequence[float], k: int) -> float:
    """Standard speculative decoding with k drafted tokens per target call."""
    if not (isinstance(k, int) and k >= 1):
        raise SprinterError(f"k: got {k!r}; expected an integer >= 1")
    return (k * profile.draft_step_ms + profile.target(k + 1) + profile.round_ms) / sd_tokens_per_call(a, k)


@dataclass(frozen=True)
class Block:
    """What a gated round drafts and keeps, in expectation."""

    length: float  # E[L]: drafted tokens
    target_ms: float  # E[T(L + 1)]: the verification forward
    flagged: float  # P(the block ended at a flagged token, not at max_block)
    flagged_label1: float  # P(... and that token is label 1: kept by the check)
    accepted_prefix: float  # E[leading label-1 tokens]: what a round that checks every token keeps


def gated_block(profile: CostProfile, a: Sequence[float], true_accept: float, false_accept: float,
                max_block: int) -> Block:
    """The block-length distribution of a gated round, by a Markov chain over (position i, run r).

    mass[r]: P(i tokens drafted, all passed by the gate, and the last r of them accepted in a row). Drafting
    token i: label 1 with probability a_r, passed with TA (run r + 1) or flagged (the block ends, L = i + 1);
    label 0 with 1 - a_r, passed with FA (run 0) or flagged. After M tokens the block ends unflagged."""
    check_rates("true/false accept", (true_accept, false_accept))
    if not (isinstance(max_block, int) and max_block >= 1):
        raise SprinterError(f"max_block: got {max_block!r}; expected an integer >= 1")
    mass = [1.0]
    length = target = flagged = flagged1 = accepted = 0.0
    for i in range(max_block):
        accepted += mass[i] * rate_at(a, i)  # run i covers the whole block: every token so far accepted
        nxt = [0.0] * (i + 2)
        ends = 0.0
        for r, m in enumerate(mass):
            if m == 0.0:
                continue
            a_r = rate_at(a, r)
            flag1, flag0 = m * a_r * (1 - true_accept), m * (1 - a_r) * (1 - false_accept)
            ends += flag1 + flag0
            flagged1 += flag1
            nxt[r + 1] += m * a_r * true_accept
            nxt[0] += m * (1 - a_r) * false_accept
        flagged += ends
        length += ends * (i + 1)
        target += ends * profile.target(i + 2)
        mass = nxt
    rest = sum(mass)  # drafted max_block tokens, every one passed
    length += rest * max_block
    target += rest * profile.target(max_block + 1)
    return Block(length, target, flagged, flagged1, accepted)


def clean_prefix(a: Sequence[float], true_accept: float, max_block: int) -> float:
    """E[accepted prefix] of a gated block in closed form: sum_{j=1..M} P_j TA^(j-1) (checks `gated_block`)."""
    return sum(prefix_accept(a, j) * true_accept ** (j - 1) for j in range(1, max_block + 1))


def gated_round_ms(profile: CostProfile, block: Block, gate: str) -> float:
    """A gated round's cost: E[L] draft steps and gate calls, the verification forward, the rest of the round."""
    step = profile.draft_hidden_step_ms if gate == "learned" else profile.draft_step_ms
    return block.length * (step + profile.gate_ms[gate]) + block.target_ms + profile.round_ms


def sprinter_ms(profile: CostProfile, a: Sequence[float], true_accept: float, false_accept: float, max_block: int,
                gate: str = "learned") -> float:
    """SPRINTER: the passed tokens are kept unchecked; only the flagged token meets the target."""
    block = gated_block(profile, a, true_accept, false_accept, max_block)
    emitted = block.length - block.flagged + block.flagged_label1 + 1
    return gated_round_ms(profile, block, gate) / emitted


def sd_gated_ms(profile: CostProfile, a: Sequence[float], true_accept: float, false_accept: float, max_block: int,
                gate: str = "learned") -> float:
    """A lossless block whose length a gate decides (drafting stops at its first flag): every token is checked.
    Strict sprinter is this; sd-gated's stop rule (1 - prod P(accept) > c) is modelled as a gate whose
    operating point (TA, FA) stands for the threshold c."""
    block = gated_block(profile, a, true_accept, false_accept, max_block)
    return gated_round_ms(profile, block, gate) / (1 + block.accepted_prefix)


def ngram_ms(profile: CostProfile, drafted: float, accepted: float, lookup_ms: float = 0.0) -> float:
    """SSSD-style n-gram drafting: D drafted and A accepted tokens per target call, `lookup_ms` to draft."""
    if not 0 <= accepted <= drafted:
        raise SprinterError(f"ngram: got {accepted!r} accepted of {drafted!r} drafted per call; expected "
                            "0 <= accepted <= drafted")
    return (profile.target(drafted + 1) + lookup_ms + profile.round_ms) / (1 + accepted)


def counted_ms(profile: CostProfile, *, draft_calls: float, target_calls: float, target_tokens: float,
               gate_calls: float, new_tokens: float, gate: str = "learned") -> float:
    """Costs weighed by a run's own counts (every step counted once): for rows whose block statistics the
    model does not derive (sd-gated's stop rule, the confidence gates, hf-assisted). target_tokens: the
    tokens the verification forwards read, the prompt left out."""
    if target_calls < 0 or new_tokens <= 0:
        raise SprinterError(f"counts: got {target_calls!r} target calls for {new_tokens!r} tokens; expected calls >= 0 "
                            "and tokens > 0")
    step = profile.draft_hidden_step_ms if gate == "learned" and gate_calls else profile.draft_step_ms
    n = max(1.0, target_tokens / target_calls) if target_calls else 1.0
    verify = target_calls * (profile.target(n) + profile.round_ms)
    return (draft_calls * step + gate_calls * profile.gate_ms[gate] + verify) / new_tokens


# ------------------------------------------------------------------------------------------- a benchmark run
MIN_REACHED = 10  # blocks that must reach a position before its acceptance rate is estimated from them


def acceptance_by_position(stats: Sequence[dict]) -> tuple[float, ...]:
    """a_i pooled over runs' stats (DecodeStats.to_dict()): accepted_by_position / reached_by_position, up to the
    first position fewer than MIN_REACHED blocks reached. () when no run recorded a checked block."""
    reached: list[int] = []
    accepted: list[int] = []
    for s in stats:
        pairs = zip(s.get("reached_by_position") or [], s.get("accepted_by_position") or [], strict=True)
        for i, (r, acc) in enumerate(pairs):
            if i == len(reached):
                reached.append(0)
                accepted.append(0)
            reached[i] += r
            accepted[i] += acc
    rates = []
    for r, acc in zip(reached, accepted, strict=True):
        if r < MIN_REACHED:
            break
        rates.append(acc / r)
    return tuple(rates)


def verifier_rates(metrics: dict, scorer: str = "verifier") -> dict[str, tuple[float, float]]:
    """{budget key: (true_accept, false_accept)} on the test split from a metrics.json (sprinter.train.fit):
    the trained verifier's ("verifier") or a baseline's ("linear", ...)."""
    report = metrics.get(scorer) if scorer == "verifier" else metrics.get("baselines", {}).get(scorer)
    if not report or "operating_points" not in report:
        return {}
    return {key: (p["true_accept"], p["false_accept"]) for key, p in report["operating_points"].items()}


def load_verifier_rates(verifiers: dict[str, str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per gate name of the benchmark ("mlp", "linear"), its rates from the metrics.json written beside it by
    scripts/train.py; the linear baseline's come from its MLP's metrics.json when it sits in VERIFIER/baselines/."""
    import json
    from pathlib import Path

    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, path in verifiers.items():
        own, parent = Path(path) / "metrics.json", Path(path).parent.parent / "metrics.json"
        if own.is_file():
            out[name] = verifier_rates(json.loads(own.read_text()))
        elif name == "linear" and Path(path).parent.name == "baselines" and parent.is_file():
            out[name] = verifier_rates(json.loads(parent.read_text()), "linear")
    return out


def totals(stats: Sequence[dict]) -> dict[str, float]:
    keys = ("new_tokens", "target_calls", "target_tokens", "draft_calls", "verifier_calls", "drafted", "accepted",
            "draft_seconds")
    return {k: float(sum(s.get(k, 0) or 0 for s in stats)) for k in keys}


def predict_row(profile: CostProfile, stats: AcceptanceStats | None, *, family: str, operating_point: float | None,
                counts: dict[str, float], prompts: int, prompt_len: int, max_block: int,
                rates: dict[str, dict[str, tuple[float, float]]]) -> float | None:
    """Predicted ms/token of one benchmark row (sprinter.bench.benchmark.FAMILIES); None for async (the
    overlap of two threads is not modelled) and for rows without tokens.

    ar, draft, sd, ngram and the learned sprinter rows follow from the profile and `stats` (acceptance by
    position from the sd rows, the verifier's rates from metrics.json, the n-gram row's drafted and accepted
    tokens per call). sd-gated's stop rule, the confidence gates and hf-assisted have no derived block length:
    their costs are weighed by the row's own counts (`counted_ms`), as are the learned rows without metrics.json."""
    from sprinter.train.calibrate import budget_key

    if family == "async" or not counts["new_tokens"]:
        return None
    if family == "ar":
        return ar_ms(profile)
    if family == "draft":
        return draft_ms(profile)
    # Verification calls: the single-prompt loops read the prompt with the first block, the batched ones (ngram)
    # in a call of its own; either way a call's tokens, less the prompt's, are the last emitted token and a block.
    calls = counts["target_calls"] - (prompts if family == "ngram" else 0)
    read = counts["target_tokens"] - prompts * (prompt_len if family == "ngram" else prompt_len - 1)
    a = stats.by_position if stats is not None else ()
    if family == "sd" and a:
        return sd_ms(profile, a, int(operating_point))
    if family == "ngram" and calls > 0:
        return ngram_ms(profile, counts["drafted"] / calls, counts["accepted"] / calls,
                        1e3 * counts["draft_seconds"] / calls)
    gate = "confidence" if family.endswith("confidence") else "learned"
    scorer = {"sprinter-mlp": "mlp", "sprinter-strict": "mlp", "sprinter-linear": "linear"}.get(family)
    point = rates.get(scorer, {}).get(budget_key(operating_point)) if scorer and operating_point is not None else None
    if point is not None and a:
        model = sd_gated_ms if family == "sprinter-strict" else sprinter_ms
        return model(profile, a, point[0], point[1], max_block, gate)
    return counted_ms(profile, draft_calls=counts["draft_calls"], target_calls=calls, target_tokens=read,
                      gate_calls=counts["verifier_calls"], new_tokens=counts["new_tokens"],
                      gate=gate if counts["verifier_calls"] else "learned")


def predictions(profile: CostProfile, records: dict[str, list[dict]], families: dict[str, tuple[str, float | None]],
                *, prompt_len: int, max_block: int, rates: dict[str, dict[str, tuple[float, float]]]
                ) -> tuple[dict[str, float | None], AcceptanceStats | None]:
    """Predicted ms/token per method name of a benchmark run, and the acceptance statistics behind them.

    records: each method's per-prompt records; families: method name -> (family, operating point)."""
    sd_stats = [r["stats"] for name, recs in records.items() if families[name][0] == "sd" for r in recs]
    a = acceptance_by_position(sd_stats)
    stats = AcceptanceStats(a) if a else None
    out = {}
    for name, recs in records.items():
        family, point = families[name]
        out[name] = predict_row(profile, stats, family=family, operating_point=point,
                                counts=totals([r["stats"] for r in recs]), prompts=len(recs), prompt_len=prompt_len,
                                max_block=max_block, rates=rates)
    return out, stats


# ------------------------------------------------------------------------------------------- the regime map
# Assumed where no run has measured them (docs/latency.md, "The regime map"): the verifier's true-accept rate at
# the 0.05 false-accept budget (docs/references.md §8's example), and the operating points (TA, FA) a stop gate may take
# for sd-gated, of which the fastest is used (the benchmark sweeps its stop threshold the same way).
SPRINTER_RATES = (0.65, 0.05)
STOP_RATES = ((0.65, 0.05), (0.75, 0.1), (0.85, 0.2), (0.93, 0.4))
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


__all__ = ["REGIME_MODES", "SPRINTER_RATES", "STOP_RATES", "AcceptanceStats", "Block", "acceptance_by_position",
           "ar_ms", "clean_prefix", "counted_ms", "draft_ms", "fastest", "flat_shape", "gated_block", "gated_round_ms",
           "load_verifier_rates", "mode_times", "ngram_ms", "pair_point", "plot_regime_map", "predict_row",
           "predictions", "prefix_accept", "rate_at",
           "regime_grid", "regime_table", "sd_gated_ms", "sd_ms", "sd_tokens_per_call", "sprinter_ms",
           "synthetic_profile", "verifier_rates"]
