"""The benchmark's reports: per-prompt records -> results.json (one entry per method), results.md, pareto.png.

Aggregation (names as Spec-Bench and vLLM, docs/references.md §5):
- `ms_per_token`: the median over prompts x repeats of wall time / new tokens; `pooled_ms_per_token`: all
  wall time over all new tokens (every repeat), the mean the latency model predicts; `tokens_per_s`: all new
  tokens over all wall time (the records' first round);
- `target_calls_per_token`, `target_tokens_per_token`, `flops_per_token` (target + draft + verifier):
  totals over new tokens; `mean_acceptance_length`: 1 + accepted / target calls (ar: 1.0);
- fidelity pooled over output tokens: `target_consistency`, `target_nll`, `target_nll_ratio_vs_ar`;
  per prompt, averaged: `rouge_l_vs_ar`, `exact_match_vs_ar`;
- spreads (sprinter.bench.spread): `speedup_vs_ar` is the median over prompts x repeats of ar's ms/token over
  the row's in the same round, `speedup_interval` its bootstrap 90% interval, `tie` / `ties_with` whether it
  overlaps the fastest row of its class (lossless or not);
- degeneracy (sprinter.bench.degeneracy), pooled over output tokens: `repeat_prompt`, `repeat_output`,
  `periodic_tail`; results["reference"] holds the same for the prompts' true continuations;
- `predicted_ms_per_token` from the calibration prompts (made before timing) and `cost_model_ms_per_token` from
  the timed run's own counts, each with its relative error against `pooled_ms_per_token` (`prediction_error`,
  `cost_model_error`): the model prices time over tokens, and on looping text the median prompt runs far
  faster than the pool (demo greedy sd-k8: 0.96 against 1.24 ms/token);
- at temperature > 0, results["distribution_check"]: each lossless row's p-values against ar
  (sprinter.bench.distribution).

Records written before repeats (no `timings`) read as one repeat.
"""

from __future__ import annotations

import datetime
import statistics
import sys
from pathlib import Path
from typing import Sequence

from sprinter.bench.degeneracy import KEYS as DEGENERACY_KEYS
from sprinter.bench.degeneracy import pooled
from sprinter.bench.distribution import ALPHA, check_distributions
from sprinter.bench.latency import add_predictions, within_share
from sprinter.bench.protocol import CALIBRATION, Method, Prompt, disk_error, machine, save_results
from sprinter.bench.spread import LEVEL, bootstrap_interval, mark_ties
from sprinter.bench.workloads import WORKLOADS
from sprinter.decode.stats import promise_warning
from sprinter.errors import SprinterError
from sprinter.files import read_json

FORMAT = "sprinter-bench/1"
METHOD_KEYS = ("name", "family", "operating_point", "lossless", "prompts", "new_tokens", "ms_per_token",
               "pooled_ms_per_token",
               "predicted_ms_per_token", "cost_model_ms_per_token", "prediction_error", "cost_model_error",
               "tokens_per_s", "speedup_vs_ar", "speedup_interval", "tie", "ties_with", *DEGENERACY_KEYS,
               "target_calls_per_token", "target_tokens_per_token",
               "flops_per_token", "mean_acceptance_length", "target_consistency", "target_nll",
               "target_nll_ratio_vs_ar", "rouge_l_vs_ar", "exact_match_vs_ar", "by_domain")
TOP_KEYS = ("format", "created", "hardware", "libraries", "pair", "verifiers", "prompts", "max_new_tokens",
            "temperature", "options", "elapsed_seconds", "methods", "workload", "reference")
CURVES = ("sd-gated", "sd-gated-confidence", "sprinter-mlp", "sprinter-linear", "sprinter-confidence",
          "sd-ratio", "sd-entropy", "sprinter-mlp+ratio", "sprinter-mlp+entropy", "sprinter-entropy",
          "sprinter-margin")  # the last six: sprinter.bench.methods.RELAXED
BEST_OF = ("sd", "sd-gated", "sd-gated-confidence")  # lossless families whose fastest operating point is marked


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _ms_per_token(record: dict) -> float | None:
    stats = record["stats"]
    return 1000 * stats["wall_seconds"] / stats["new_tokens"] if stats["new_tokens"] else None


def _repeat_ms(record: dict) -> list[float | None]:
    """ms/token of each timed round of a record (one round for records written before repeats)."""
    timings = record.get("timings") or [record["stats"]]
    return [1000 * t["wall_seconds"] / t["new_tokens"] if t["new_tokens"] else None for t in timings]


def summarize(records: Sequence[dict], reference: dict[int, dict], prompts: dict[int, Sequence[int]] | None = None
              ) -> dict:
    """The figures of one method over its records; `reference`: ar's record per prompt; `prompts`: each prompt's
    ids (for the degeneracy figures; None: not computed)."""
    stats = [r["stats"] for r in records]
    total = lambda key: sum(s.get(key, 0) or 0 for s in stats)  # noqa: E731
    tokens = total("new_tokens")
    ms = [m for r in records for m in _repeat_ms(r) if m is not None]
    rounds = [t for r in records for t in (r.get("timings") or [r["stats"]])]
    speedups = [ref / own for r in records
                for own, ref in zip(_repeat_ms(r), _repeat_ms(reference[r["prompt"]])) if own and ref]
    degeneracy = (pooled([(prompts[r["prompt"]], r["tokens"]) for r in records]) if prompts is not None
                  else dict.fromkeys(DEGENERACY_KEYS))
    scored = sum(r["fidelity"]["tokens"] for r in records)
    nll = _ratio(sum(r["fidelity"]["nll_sum"] for r in records), scored)
    ar_scored = sum(reference[r["prompt"]]["fidelity"]["tokens"] for r in records)
    ar_nll = _ratio(sum(reference[r["prompt"]]["fidelity"]["nll_sum"] for r in records), ar_scored)
    return {
        "prompts": len(records), "new_tokens": tokens,
        "ms_per_token": statistics.median(ms) if ms else None,
        "pooled_ms_per_token": _ratio(1000 * sum(t["wall_seconds"] for t in rounds),
                                      sum(t["new_tokens"] for t in rounds)),
        "tokens_per_s": _ratio(tokens, total("wall_seconds")),
        "speedup_vs_ar": statistics.median(speedups) if speedups else None,
        "speedup_interval": bootstrap_interval(speedups),
        **degeneracy,
        "target_calls_per_token": _ratio(total("target_calls"), tokens),
        "target_tokens_per_token": _ratio(total("target_tokens"), tokens),
        "flops_per_token": _ratio(total("target_flops") + total("draft_flops") + total("verifier_flops"), tokens),
        "mean_acceptance_length": 1 + total("accepted") / total("target_calls") if total("target_calls") else None,
        "target_consistency": _ratio(sum(r["fidelity"]["consistent"] for r in records), scored),
        "target_nll": nll,
        "target_nll_ratio_vs_ar": _ratio(nll, ar_nll) if nll is not None and ar_nll is not None else None,
        "rouge_l_vs_ar": statistics.fmean(r["rouge_l_vs_ar"] for r in records),
        "exact_match_vs_ar": statistics.fmean(float(r["exact_match_vs_ar"]) for r in records),
        **guard(stats),
    }


def guard(stats: Sequence[dict]) -> dict:
    """The decode-time guard over a method's records, pooled: its false-accept and flag rates, the promised ones,
    and a warning when a measured rate is far from its promise (sprinter.decode.stats.check_promise's rule)."""
    total = lambda key: sum(s.get(key, 0) or 0 for s in stats)  # noqa: E731
    passed, calls = total("passed_unchecked"), total("verifier_calls")
    promised = next((s for s in stats if s.get("promised_false_accept") is not None), None)
    out = {"passed_unchecked": passed, "false_accept_rate": _ratio(total("false_accepts"), passed),
           "flag_rate": _ratio(total("flagged"), calls),
           "promised_false_accept": promised and promised["promised_false_accept"],
           "promised_flag_rate": promised and promised["promised_flag_rate"], "verifier_warning": None}
    if promised is not None:
        out["verifier_warning"] = promise_warning(total("false_accepts"), passed, total("flagged"), calls,
                                                  promised["promised_false_accept"], promised["promised_flag_rate"])
    return out


def method_entries(methods: Sequence[Method], done: dict[int, list[dict]],
                   prompts: dict[int, Sequence[int]] | None = None) -> list[dict]:
    """One entry per method (the fastest of each BEST_OF family marked best; ties marked), over the finished
    prompts; `prompts`: each prompt's ids, for the degeneracy figures."""
    if not done:
        raise SprinterError("no prompt finished; nothing to report (run without --resume, or with more time)")
    by_method: dict[str, list[dict]] = {}
    for index in sorted(done):
        for record in done[index]:
            by_method.setdefault(record["method"], []).append(record)
    reference = {r["prompt"]: r for r in by_method["ar"]}
    entries = []
    for method in methods:
        records = by_method[method.name]
        entry = {"name": method.name, "family": method.family, "operating_point": method.operating_point,
                 "lossless": method.lossless, **summarize(records, reference, prompts)}
        domains = sorted({r["domain"] for r in records})
        entry["by_domain"] = {d: {k: v
                                  for k, v in summarize([r for r in records if r["domain"] == d], reference).items()
                                  if k in ("prompts", "speedup_vs_ar", "target_consistency", "target_nll_ratio_vs_ar",
                                           "rouge_l_vs_ar")}
                              for d in domains}
        entries.append(entry)
    for family in BEST_OF:
        timed = [e for e in entries if e["family"] == family and e["speedup_vs_ar"] is not None]
        for e in entries:
            if e["family"] == family:
                e["best"] = bool(timed) and e is max(timed, key=lambda x: x["speedup_vs_ar"])
    mark_ties(entries)
    return entries


def recommended_stop_threshold(entries: Sequence[dict]) -> float | None:
    """The stop threshold of the fastest sd-gated row (None without sd-gated rows)."""
    best = [e for e in entries if e["family"] == "sd-gated" and e.get("best")]
    return best[0]["operating_point"] if best else None


def check_results(results: dict) -> None:
    """Refuse a results dict without the documented keys (the schema test and readers use this)."""
    missing = [k for k in TOP_KEYS if k not in results]
    if missing or results.get("format") != FORMAT:
        raise SprinterError(f"results: missing keys {missing} or format {results.get('format')!r}; expected {FORMAT!r}")
    for entry in results["methods"]:
        missing = [k for k in METHOD_KEYS if k not in entry]
        if missing:
            raise SprinterError(f"results method {entry.get('name')!r}: missing keys {missing}")
    if "ar" not in {e["name"] for e in results["methods"]}:
        raise SprinterError("results: no 'ar' entry; expected the reference method")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if abs(value) >= 1e5 else f"{value:.{digits}f}"
    return str(value)


def _share(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _estimate(value, error) -> str:
    return "-" if value is None else f"{value:.2f} ({error:+.0%})" if error is not None else f"{value:.2f}"


def _interval(e: dict) -> str:
    interval = e.get("speedup_interval")
    text = _fmt(e["speedup_vs_ar"])
    if interval:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    return text + (" (tie)" if e.get("tie") else "")


def markdown(results: dict) -> str:
    hw, p = results["hardware"], results["prompts"]
    where = hw.get("gpu") or f"{hw['cpu']}, {hw['torch_threads']} torch thread(s)"
    domains = ", ".join(f"{n} {d}" for d, n in p["domains"].items())
    workload = results.get("workload", "greedy")
    note = WORKLOADS[workload].note if workload in WORKLOADS else workload
    repeats = results.get("repeats", 1)
    lines = [f"# Benchmark: {results['pair']['target']} (target) / {results['pair']['draft']} (draft)", "",
             f"Workload **{workload}**: {note}.", "",
             f"{where}; {hw['dtype']}; torch {results['libraries']['torch']}, transformers "
             f"{results['libraries']['transformers']}. {p['count']} prompts ({domains}; "
             f"{p['prompt_len']} tokens from {p['dataset']}/{p['split']}), "
             f"up to {results['max_new_tokens']} new tokens, "
             f"temperature {results['temperature']}, top-p {results.get('top_p', 1.0)}, {repeats} timed repeat(s). "
             "Speedup: median over prompts x repeats of ar's ms/token over the method's, measured interleaved in "
             f"the same round, with its bootstrap {LEVEL:.0%} interval; (tie): the interval overlaps the fastest row "
             "of its class (lossless or lossy), so the two are not told apart. Loop shares (bench.degeneracy): "
             "tokens completing a 4-gram seen earlier in the prompt / in the output, and tokens inside a periodic "
             "tail (period <= 8, >= 32 tokens). Pooled ms/token: all time over all tokens, the mean the latency model "
             "predicts. Predicted: from calibration prompts decoded before timing; cost model: from the timed run's "
             "own counts (a diagnostic); both with their error against the pooled ms/token.",
             "",
             "| method | ms/token | pooled ms/token | speedup vs ar [90%] | predicted (err) | cost model (err) "
             "| repeat: prompt | repeat: output | periodic tail | tokens/s | target calls/token | target tokens/token "
             "| FLOPs/token | mean acc. length | target consistency | target NLL | NLL / ar | ROUGE-L vs ar "
             "| exact match vs ar |",
             "|---|" + "---:|" * 18]
    reference = results.get("reference") or {}
    if reference.get("repeat_output") is not None:
        lines.append("| corpus text (the prompts' true continuations) | - | - | - | - | - | "
                     + " | ".join(_share(reference[k]) for k in DEGENERACY_KEYS) + " |" + " - |" * 10)
    for e in results["methods"]:
        name = (e["name"] + (f" (best {e['family']})" if e.get("best") else "")
                + (" [lossless]" if e["lossless"] else "") + (" [verifier off its promise]"
                                                              if e.get("verifier_warning") else ""))
        lines.append("| " + " | ".join([name, _fmt(e["ms_per_token"]), _fmt(e.get("pooled_ms_per_token")),
                                         _interval(e),
                                         _estimate(e.get("predicted_ms_per_token"), e.get("prediction_error")),
                                         _estimate(e.get("cost_model_ms_per_token"), e.get("cost_model_error")),
                                         *(_share(e.get(k)) for k in DEGENERACY_KEYS),
                                         _fmt(e["tokens_per_s"], 1),
                                         _fmt(e["target_calls_per_token"], 3),
                                         _fmt(e["target_tokens_per_token"]), _fmt(e["flops_per_token"]),
                                         _fmt(e["mean_acceptance_length"]), _fmt(e["target_consistency"], 3),
                                         _fmt(e["target_nll"], 3), _fmt(e["target_nll_ratio_vs_ar"], 3),
                                         _fmt(e["rouge_l_vs_ar"], 3), _fmt(e["exact_match_vs_ar"], 2)]) + " |")
    ties = [e for e in results["methods"] if e.get("tie")]
    if ties:
        lines += ["", "Ties (intervals overlapping the fastest row of their class): "
                  + "; ".join(f"{e['name']} with {e['ties_with']}" for e in ties) + "."]
    held = [(label, *within_share(results["methods"], key)) for label, key in
            (("predictions (calibration prompts)", "prediction_error"), ("cost model (same-run counts)",
                                                                         "cost_model_error"))]
    lines += ["", "Within 25% of the measured (pooled) ms/token: " + "; ".join(
        f"{label} {n} of {total} rows" for label, n, total in held) + "."]
    n, total = within_share(results["methods"], "speedup_prediction_error")
    if total:
        lines[-1] += (f" Of the predicted speedups over ar (a machine-wide change of load between the profile and the "
                      f"timed run cancels in them): {n} of {total} rows within 25%.")
    for e in results["methods"]:
        if e.get("verifier_warning"):
            lines += ["", f"{e['name']} [verifier off its promise]: {e['verifier_warning']}; its speed and fidelity "
                          "figures do not reflect a trustworthy verifier (docs/decoding.md, the decode-time guard)."]
    stop = results.get("recommended_stop_threshold")
    if stop is not None:
        lines += ["", f"sd-gated: the fastest stop threshold was {stop:g} (`--store-stop-threshold` writes it into the "
                      "stop verifier's checkpoint, where mode sd-gated reads its default)."]
    checked = results["temperature"] == 0 and results["options"]["check_lossless"]
    lines += ["", "Lossless rows were checked equal to ar's output token for token (first repeat; every repeat gave "
                  "the same tokens)." if checked else
              "Lossless rows were not checked against ar's output token for token (sampling, or "
              "--no-check-lossless)."]
    check = results.get("distribution_check")
    if check:
        first = next(iter(check.values()))
        lines += ["", f"Distribution check of the lossless rows against ar (exact swap tests over {first['prompts']} "
                      f"prompts; fail below p = {first['threshold']:.2g}, the smallest attainable p being "
                      f"{first['smallest_p']:.2g}): " + "; ".join(
                          f"{name} p_nll {c['p_nll']:.2g}, p_tokens {c['p_tokens']:.2g}"
                          + ("" if c["passed"] else " FAILED") for name, c in check.items()) + "."]
    return "\n".join(lines + [""])


def plot(results: dict, path: Path) -> None:
    """Fidelity (target consistency; target NLL over ar's) against speedup: reference points and one curve
    per gate over its operating points (false-accept budgets, or confidence thresholds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in results["methods"] if e["speedup_vs_ar"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "target_consistency", "target consistency (share of target-greedy tokens)"),
                           (axes[1], "target_nll_ratio_vs_ar", "target NLL / ar's (lower is closer)")):
        for e in entries:  # each point's bootstrap 90% speedup interval as a horizontal bar (its spread)
            low, high = e.get("speedup_interval") or (e["speedup_vs_ar"],) * 2
            if e[key] is not None:
                ax.plot([low, high], [e[key]] * 2, color="grey", lw=0.8, alpha=0.6, zorder=1)
            if e["family"] not in CURVES and e[key] is not None:
                ax.scatter(e["speedup_vs_ar"], e[key], marker="*" if e.get("best") else "o", s=60, zorder=3)
                ax.annotate(e["name"], (e["speedup_vs_ar"], e[key]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        for family in CURVES:
            curve = sorted((e for e in entries if e["family"] == family and e[key] is not None),
                           key=lambda e: e["operating_point"])
            if curve:
                ax.plot([e["speedup_vs_ar"] for e in curve], [e[key] for e in curve], "-s", label=family, zorder=2)
                for e in curve:
                    ax.annotate(f"{e['operating_point']:g}", (e["speedup_vs_ar"], e[key]), textcoords="offset points",
                                xytext=(3, -10), fontsize=7)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")  # speedups span 0.3x (hf-assisted) to 7x (the draft alone)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda x, _: f"{x:g}x" if round(x, 3) in (0.2, 0.5, 2, 5) else ""))
        ax.set_xlabel("speedup vs ar (median over prompts x repeats, log scale; bars: 90% interval)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if any(e["family"] in CURVES for e in entries):
            ax.legend(fontsize=8, title="curve labels: budget / threshold", title_fontsize=7)
    fig.suptitle(f"{results['pair']['target']} / {results['pair']['draft']}: fidelity against speed", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_reports(out: Path, *, options: dict, decoder, verifiers: dict[str, str], prompts: Sequence[Prompt],
                  methods: Sequence[Method], done: dict[int, list[dict]], seconds: float) -> dict:
    """Write OUT/results.json, results.md and pareto.png from the finished prompts; returns the results.
    `options`: the benchmark's options as a dict (sprinter.config.to_dict of its BenchConfig). The decoder's
    `profile` (the pair's CostProfile, sprinter.decode.costs) gives the predicted ms/token (None: not predicted)."""
    pair, profile = decoder.pair, decoder.profile
    calibration = read_json(out / CALIBRATION, CALIBRATION) if (out / CALIBRATION).is_file() else {}
    verifier_info = {}
    for name, path in verifiers.items():
        from sprinter.verifier import read_info

        info = read_info(path)
        verifier_info[name] = {"path": path, "features": list(info.features), "arch": info.arch,
                               "label_rule": info.label_rule, "thresholds": info.thresholds,
                               "kept_thresholds": info.kept_thresholds,
                               "context_source": info.context_source}
    finished = [p for p in prompts if p.index in done]
    domains: dict[str, int] = {}
    for p in finished:
        domains[p.domain] = domains.get(p.domain, 0) + 1
    results = {
        "format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **machine(pair.device, pair.dtype),
        "pair": {"draft": pair.draft_name, "target": pair.target_name, "vocab_size": pair.vocab_size,
                 "auto_draft_prior": getattr(decoder, "draft_prior", None)},
        "verifiers": verifier_info,
        "prompts": {"dataset": options["dataset"], "split": options["split"], "count": len(finished),
                    "planned": len(prompts), "domains": domains, "prompt_len": options["prompt_len"]},
        "max_new_tokens": options["max_new_tokens"], "temperature": options["temperature"], "options": options,
        "elapsed_seconds": round(seconds, 2),
        "methods": method_entries(methods, done, {p.index: p.ids for p in finished}),
        "workload": options.get("workload", "greedy"), "top_p": options.get("top_p", 1.0),
        "repeats": options.get("repeats", 1),
        "reference": pooled([(p.ids, p.continuation) for p in finished if p.continuation]),
    }
    results["prompts"]["calibration"] = {"split": options.get("calibration_split"),
                                         "count": len(next(iter(calibration.values()), [])) if calibration else 0}
    results["distribution_check"] = (check_distributions(methods, done, options.get("distribution_alpha", ALPHA))
                                     if options["temperature"] > 0 else None)
    results["recommended_stop_threshold"] = recommended_stop_threshold(results["methods"])
    if profile is not None:
        meta = Path(pair.draft_name).parent / "pair.json"
        add_predictions(results, profile, options, verifiers, methods, done,
                        read_json(meta, "pair.json") if meta.is_file() else {}, calibration)
    else:
        for entry in results["methods"]:
            entry.update(predicted_ms_per_token=None, cost_model_ms_per_token=None, prediction_error=None,
                         cost_model_error=None)
    check_results(results)
    save_results(out, results, markdown(results))
    try:
        import matplotlib  # noqa: F401  (an extra: sprinter[plot]; the GPU image may lack it)
    except ImportError:
        print(f"note: pareto.png not written: matplotlib is not installed (pip install 'sprinter[plot]'); then "
              f"`python scripts/benchmark.py --resume --out {out}` (same options) draws it from the records",
              file=sys.stderr)
        return results
    try:
        plot(results, out / "pareto.png")
    except OSError as err:
        raise disk_error(out / "pareto.png", err, "writing") from err
    return results


__all__ = ["FORMAT", "METHOD_KEYS", "check_results", "markdown", "method_entries", "plot", "summarize",
           "write_reports"]
