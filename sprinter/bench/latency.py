"""The latency model over a benchmark run: each row's ms/token from the pair's cost profile and acceptance
statistics (by block position from the sd rows, the verifier's rates from its metrics.json, the n-gram rows'
per-call counts). The benchmark feeds it twice: the calibration prompts' statistics (decoded before timing, on
prompts disjoint from the timed ones: the prediction) and the timed run's own (the cost-model diagnostic).
The formulas are sprinter.decode.latency's (docs/latency.md); the regime map is sprinter.bench.regime_map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sprinter.bench.protocol import Method
from sprinter.decode.costs import CostProfile
from sprinter.decode.latency import (
    AcceptanceStats,
    ar_ms,
    counted_ms,
    draft_ms,
    generation_ms,
    ngram_ms,
    sd_gated_ms,
    sd_ms,
    sprinter_ms,
    verifier_rates,
)
from sprinter.files import read_json
from sprinter.verifier import budget_key, checkpoint_file, read_info

WITHIN = 0.25  # a prediction "holds" within this relative error of the measurement
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


def flat_acceptance(stats: Sequence[dict]) -> float | None:
    """P(a drafted token is accepted), pooled over every block position of runs' stats (auto's flat estimate);
    None when no run recorded a checked block."""
    reached = sum(sum(s.get("reached_by_position") or []) for s in stats)
    accepted = sum(sum(s.get("accepted_by_position") or []) for s in stats)
    return accepted / reached if reached else None


def load_verifier_rates(verifiers: dict[str, str], temperature: float | None = None
                        ) -> dict[str, dict[str, tuple[float, float]]]:
    """Per gate name of the benchmark ("mlp", "linear"), its rates from the metrics.json written beside it by
    scripts/train.py; the linear baseline's come from its MLP's metrics.json when it sits in VERIFIER/baselines/.

    A verifier with decode-time thresholds at `temperature` (scripts/calibrate.py) decodes at other thresholds than
    metrics.json's operating points: it has no rates here, and its rows are priced from the calibration prompts'
    own counts (what the verifier flagged there, decoded before timing)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, path in verifiers.items():
        if temperature is not None and _kept_at(path, temperature):
            continue
        own, parent = Path(path) / "metrics.json", Path(path).parent.parent / "metrics.json"
        if own.is_file():
            out[name] = verifier_rates(read_json(own, "metrics.json"))
        elif name == "linear" and Path(path).parent.name == "baselines" and parent.is_file():
            out[name] = verifier_rates(read_json(parent, "metrics.json"), "linear")
    return out


def _kept_at(path: str | Path, temperature: float) -> bool:
    if not checkpoint_file(path).is_file():
        return False
    return bool(read_info(path).kept_thresholds.get(budget_key(temperature)))


def totals(stats: Sequence[dict]) -> dict[str, float]:
    keys = ("new_tokens", "target_calls", "target_tokens", "draft_calls", "verifier_calls", "drafted", "accepted",
            "draft_seconds")
    return {k: float(sum(s.get(k, 0) or 0 for s in stats)) for k in keys}


NO_DRAFT_MODEL = ("ar", "ngram", "ngram-8")  # rows whose generations never prefill the draft model


def predict_row(profile: CostProfile, stats: AcceptanceStats | None, row: tuple[str, float | None], *,
                counts: dict[str, float], prompts: int, prompt_len: int, max_block: int,
                rates: dict[str, dict[str, tuple[float, float]]]) -> float | None:
    """Predicted ms/token of one benchmark row, (family, operating point) (sprinter.bench.benchmark.FAMILIES);
    None for async (the overlap of two threads is not modelled) and for rows without tokens. Every row adds its
    generations' fixed cost (fresh caches and prefills, `generation_ms`) over the tokens a generation emits.

    ar, draft, sd, ngram and the learned sprinter rows follow from the profile and `stats` (acceptance by
    position from the sd rows, the verifier's rates from metrics.json, the n-gram row's drafted and accepted
    tokens per call). sd-gated's stop rule, the confidence gates and hf-assisted have no derived block length:
    their costs are weighed by the row's own counts (`counted_ms`), as are the learned rows without metrics.json."""
    family, operating_point = row
    if family == "async" or not counts["new_tokens"]:
        return None
    per_generation = counts["new_tokens"] / max(1, prompts)
    if family == "draft":  # the draft alone: its prefill, not the target's
        return draft_ms(profile) + profile.draft_prefill_ms / per_generation
    step = per_token(profile, stats, row, counts=counts, prompts=prompts, prompt_len=prompt_len, max_block=max_block,
                     rates=rates)
    return step + generation_ms(profile, per_generation, draft=family not in NO_DRAFT_MODEL)


def per_token(profile: CostProfile, stats: AcceptanceStats | None, row: tuple[str, float | None], *,
              counts: dict[str, float], prompts: int, prompt_len: int, max_block: int,
              rates: dict[str, dict[str, tuple[float, float]]]) -> float:
    """predict_row's per-token time of the decode steps (without the generation's fixed cost)."""
    family, operating_point = row
    if family == "ar":
        return ar_ms(profile)
    # Verification calls: the single-prompt loops read the prompt with the first block, the batched ones (ngram)
    # in a call of its own; either way a call's tokens, less the prompt's, are the last emitted token and a block.
    calls = counts["target_calls"] - (prompts if family == "ngram" else 0)
    read = counts["target_tokens"] - prompts * (prompt_len if family == "ngram" else prompt_len - 1)
    a = stats.by_position if stats is not None else ()
    if family == "sd" and a:
        return sd_ms(profile, a, int(operating_point))
    if family in ("ngram", "ngram-8") and calls > 0:  # ngram-8: auto's loop, the prompt read with the first block
        return ngram_ms(profile, counts["drafted"] / calls, counts["accepted"] / calls,
                        1e3 * counts["draft_seconds"] / calls)
    gate = "confidence" if family.endswith("confidence") or family in ("sprinter-entropy", "sprinter-margin") \
        else "learned"  # the draft-side gates cost what the confidence gate does: a read of q
    scorer = {"sprinter-mlp": "mlp", "sprinter-strict": "mlp", "sprinter-linear": "linear"}.get(family)
    point = rates.get(scorer, {}).get(budget_key(operating_point)) if scorer and operating_point is not None else None
    if point is not None and a:
        model = sd_gated_ms if family == "sprinter-strict" else sprinter_ms
        return model(profile, a, point[0], point[1], max_block, gate)
    return counted_ms(profile, draft_calls=counts["draft_calls"], target_calls=calls, target_tokens=read,
                      gate_calls=counts["verifier_calls"], new_tokens=counts["new_tokens"],
                      gate=gate if counts["verifier_calls"] else "learned")


def predictions(profile: CostProfile, runs: dict[str, list[dict]], families: dict[str, tuple[str, float | None]],
                *, prompt_len: int, max_block: int, rates: dict[str, dict[str, tuple[float, float]]]
                ) -> tuple[dict[str, float | None], AcceptanceStats | None]:
    """ms/token per method name from a set of runs, and the acceptance statistics behind them.

    runs: each method's per-prompt stats (DecodeStats.to_dict()); families: method name -> (family, operating
    point). The sprinter-mlp-compare rows are priced with the compare verifier's rates."""
    sd_stats = [s for name, stats in runs.items() if families[name][0] == "sd" for s in stats]
    a = acceptance_by_position(sd_stats)
    stats = AcceptanceStats(a) if a else None
    out = {}
    for name, row_stats in runs.items():
        own = {**rates, "mlp": rates.get("compare", {})} if name.startswith("sprinter-mlp-compare") else rates
        out[name] = predict_row(profile, stats, families[name], counts=totals(row_stats), prompts=len(row_stats),
                                prompt_len=prompt_len, max_block=max_block, rates=own)
    return out, stats


def add_predictions(results: dict, profile, options: dict, verifiers: dict[str, str], methods: Sequence[Method],
                    done: dict[int, list[dict]], pair_meta: dict, calibration: dict[str, list[dict]]) -> None:
    """Each entry's `predicted_ms_per_token`, from the calibration prompts' counts (decoded before timing, on
    prompts disjoint from the timed ones) and the profile, and its `cost_model_ms_per_token`, from the timed
    run's own counts (a check that the costs add up, not a prediction), each with its relative error against
    the measured pooled ms/token (all time over all tokens: the model prices a mean, not the median prompt).
    Under `pair`: the profile's draft_target_cost_ratio, the pair's greedy_agreement (pair.json), the
    calibration's acceptance by position and the profile. Without calibration prompts the prediction is None."""
    rows = {m.name: (m.family, m.operating_point) for m in methods}
    rates = load_verifier_rates(verifiers, options.get("temperature"))
    timed = {m.name: [r["stats"] for i in sorted(done) for r in done[i] if r["method"] == m.name] for m in methods}
    cost_model, timed_stats = predictions(profile, timed, rows, prompt_len=options["prompt_len"],
                                          max_block=options["max_block"], rates=rates)
    predicted, stats = ({}, None) if not calibration else predictions(
        profile, calibration, rows, prompt_len=options["prompt_len"], max_block=options["max_block"], rates=rates)

    def error(estimate, measured):
        return estimate / measured - 1 if estimate is not None and measured else None

    def measured(entry: dict) -> float | None:  # the pooled ms/token the model predicts (older results: the median)
        return entry.get("pooled_ms_per_token") or entry["ms_per_token"]

    ar_predicted, ar_measured = predicted.get("ar"), next(
        (measured(e) for e in results["methods"] if e["name"] == "ar"), None)
    for entry in results["methods"]:
        entry["predicted_ms_per_token"] = predicted.get(entry["name"])
        # the speedup over ar both ways: a machine that is busier (or quieter) during the timed run than during the
        # profile moves every row's ms/token alike, and cancels here
        entry["predicted_speedup"] = (ar_predicted / entry["predicted_ms_per_token"]
                                      if ar_predicted and entry["predicted_ms_per_token"] else None)
        entry["speedup_prediction_error"] = None if entry["name"] == "ar" else error(  # ar's: 1 / 1, not a test
            entry["predicted_speedup"], ar_measured / measured(entry) if ar_measured and measured(entry) else None)
        entry["cost_model_ms_per_token"] = cost_model.get(entry["name"])
        entry["prediction_error"] = error(entry["predicted_ms_per_token"], measured(entry))
        entry["cost_model_error"] = error(entry["cost_model_ms_per_token"], measured(entry))
    results["pair"].update(draft_target_cost_ratio=profile.cost_ratio,
                           greedy_agreement=pair_meta.get("greedy_agreement"),
                           acceptance_by_position=list(stats.by_position) if stats else None,
                           timed_acceptance_by_position=list(timed_stats.by_position) if timed_stats else None,
                           cost_profile=profile.to_dict())


def within_share(entries: Sequence[dict], key: str) -> tuple[int, int]:
    """(rows whose `key` error is within WITHIN, rows with such an error)."""
    errors = [e[key] for e in entries if e.get(key) is not None]
    return sum(abs(x) <= WITHIN for x in errors), len(errors)


__all__ = ["WITHIN", "acceptance_by_position", "add_predictions", "flat_acceptance", "load_verifier_rates",
           "predict_row", "predictions", "totals", "within_share"]
