"""The batch sweep: tokens/s of batched "ar", "sd" and "ngram" as the batch grows (SSSD's question,
docs/references.md §4).

The protocol is sprinter.bench.protocol's (docs/benchmark.md, docs/batching.md). For each domain (code
windows, prose docstrings: the benchmark's held-out prompts) and each batch size B, one batch of B prompts
is decoded by every method (after a warm-up of each), `repeats` times with the methods' order rotated each
repeat; a method's figure is the median over repeats of (new tokens of the batch / its wall time).
Greedy by default: every method's outputs are checked equal, token for token, to batched "ar"'s (all of
them are lossless). Rows: "ar"; "sd-k{k}" (the draft model); "ngram" (k from the batch size and
I_knee, sprinter.decode.roofline) and "ngram-k{k}" for each fixed k.

Each finished (domain, B) cell is appended to OUT/records.jsonl, so --resume continues a killed sweep.
Writes OUT/results.json, OUT/results.md and OUT/batch.png (matplotlib optional, as sprinter.bench.report);
results.json is also written after every finished cell, with "partial": true, so a sweep stopped from outside
(a time budget) keeps what it measured.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sprinter.bench.protocol import (
    DOMAINS,
    PairBenchConfig,
    append_records,
    check_domains,
    check_lossless,
    check_window,
    disk_error,
    load_prompts,
    machine,
    open_records,
    rotated,
    save_results,
    warm_up,
)
from sprinter.config import (
    CONFIGS,
    check_integer_lists,
    check_integers,
    check_runs,
    option,
    parse_config,
    to_dict,
)
from sprinter.decode.decoder import Decoder
from sprinter.decode.options import DecodeOptions
from sprinter.decode.roofline import measure_i_knee, speculation_length
from sprinter.errors import SprinterError
from sprinter.files import write_atomic

CONFIG_DIR = CONFIGS / "bench_batch"
FORMAT = "sprinter-bench-batch/1"
RUNTIME_OPTIONS = ("out", "resume", "overwrite", "progress", "warmup")  # may change on --resume


@dataclass(frozen=True)
class BatchBenchConfig(PairBenchConfig):
    """The batch sweep's options: the single home of their defaults (scripts/bench_batch.py reads them)."""

    batch_sizes: tuple[int, ...] = option((1, 4, 8, 16, 32), "batch sizes B of the sweep")
    k: int = option(4, "sd: tokens drafted per sequence and target call")
    ngram_n: int = option(3, "ngram: longest suffix looked up")
    fixed_k: tuple[int, ...] = option((4,), "ngram: fixed draft lengths, a row each (beside the k rule's row)")
    i_knee: float | None = option(None, "the k rule's I_knee; none: measured on the device at start")
    datastore: str | None = option(None, "ngram rows also look up this datastore (scripts/build_datastore.py); "
                                         "none: each sequence's own text only")
    sd: bool = option(True, "include the sd row (needs the draft model)")
    domains: tuple[str, ...] = option(DOMAINS, f"prompt domains, a sweep each: some of {DOMAINS}")
    max_new_tokens: int = option(64, "most tokens to generate per prompt")
    repeats: int = option(3, "timed runs per (domain, B, method); the median is reported")
    warmup: int = option(1, "warm-up batches per method before timing")
    temperature: float = option(0.0, "0 is greedy (outputs checked equal to batched ar's); above 0 samples")
    out: str = option("results/batch/demo", "output folder: results.json, results.md, batch.png")
    resume: bool = option(False, "continue from OUT/records.jsonl (same options): finished cells are kept")
    overwrite: bool = option(False, "replace the records in OUT")

    def __post_init__(self) -> None:
        check_integers(self, ("k", "ngram_n", "prompt_len", "max_new_tokens", "repeats"))
        check_integers(self, ("threads", "warmup"), minimum=0)
        check_integer_lists(self, ("batch_sizes",))
        check_integer_lists(self, ("fixed_k",), empty=True)
        check_domains(self.domains)
        DecodeOptions(mode="ngram", max_new_tokens=self.max_new_tokens, k=self.k, ngram_n=self.ngram_n,
                      i_knee=self.i_knee)
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise SprinterError(f"temperature: got {self.temperature!r}; expected a finite number >= 0")
        check_runs(self, neither="PAIR/draft and PAIR/target")


def parse_batch_config(argv: Sequence[str] | None) -> BatchBenchConfig:
    """scripts/bench_batch.py's options: defaults < configs/bench_batch/demo.yaml (or --config) < flags."""
    return parse_config(BatchBenchConfig, argv, "Batch sweep: tokens/s of batched ar, sd and ngram as B grows.",
                        CONFIG_DIR / "demo.yaml")


def methods(cfg: BatchBenchConfig) -> dict[str, dict]:
    """Row name -> the generate options of that row."""
    rows = {"ar": {"mode": "ar"}}
    if cfg.sd:
        rows[f"sd-k{cfg.k}"] = {"mode": "sd", "k": cfg.k}
    rows["ngram"] = {"mode": "ngram", "ngram_n": cfg.ngram_n, "i_knee": cfg.i_knee}
    rows.update({f"ngram-k{k}": {"mode": "ngram", "ngram_n": cfg.ngram_n, "ngram_k": k} for k in cfg.fixed_k})
    return rows


def batch_prompts(cfg: BatchBenchConfig, tokenizer, domain: str) -> list[list[int]]:
    """max(batch_sizes) prompts of the domain (the pool cycles when the split has fewer); a batch of B takes the
    first B."""
    size = max(cfg.batch_sizes)
    picked = load_prompts(tokenizer, dataset=cfg.dataset, split=cfg.split, domains=(domain,), num_prompts=size,
                          prompt_len=cfg.prompt_len)
    return [list(picked[i % len(picked)].ids) for i in range(size)]


def run_cell(cfg: BatchBenchConfig, decoder: Decoder, prompts: list[list[int]], rows: dict[str, dict], bar) -> dict:
    """Every method on one batch, `repeats` times (order rotated); the outputs checked against batched ar's."""
    names = list(rows)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    outputs: dict[str, list[list[int]]] = {}
    for repeat in range(cfg.repeats):
        for name in rotated(names, repeat):
            start = time.perf_counter()
            outs = decoder.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    seed=cfg.seed, **rows[name])
            seconds = time.perf_counter() - start
            tokens = sum(o.stats.new_tokens for o in outs)
            accepted, drafted = sum(o.stats.accepted for o in outs), sum(o.stats.drafted for o in outs)
            calls = sum(o.stats.target_calls for o in outs)
            runs[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                               "draft_share": outs[0].stats.draft_seconds / seconds,
                               "mean_acceptance_length": 1 + accepted / calls, "drafted": drafted,
                               "accepted": accepted, "target_forwards": max(o.stats.target_calls for o in outs)})
            outputs[name] = [o.token_ids for o in outs]
            bar.update(1)
    if cfg.temperature == 0:
        for name in names:
            for row, (got, want) in enumerate(zip(outputs[name], outputs["ar"], strict=True)):
                check_lossless(name, got, want, where=f"row {row} of a batch of {len(prompts)} (vs batched ar)")
    cell = {}
    ar_median = statistics.median(r["tokens_per_s"] for r in runs["ar"])
    for name in names:
        median = lambda key: statistics.median(r[key] for r in runs[name])  # noqa: E731, B023 (used only this pass)
        cell[name] = {"tokens_per_s": median("tokens_per_s"), "seconds": median("seconds"),
                      "tokens": runs[name][0]["tokens"], "draft_share": median("draft_share"),
                      "mean_acceptance_length": runs[name][0]["mean_acceptance_length"],
                      "acceptance_rate": (runs[name][0]["accepted"] / runs[name][0]["drafted"]
                                          if runs[name][0]["drafted"] else None),
                      "target_forwards": runs[name][0]["target_forwards"],
                      "speedup_vs_ar": median("tokens_per_s") / ar_median}
    return cell


def run_sweep(cfg: BatchBenchConfig) -> dict:
    """Run the sweep and write OUT/results.json, results.md and batch.png; returns the results."""
    from tqdm import tqdm

    from sprinter.pairs.build import resolve_pair

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    draft, target = resolve_pair(cfg.pair, cfg.draft, cfg.target)
    decoder = Decoder.from_pretrained(draft, target, device=cfg.device, dtype=cfg.dtype, datastore=cfg.datastore)
    check_window(cfg.prompt_len, cfg.max_new_tokens, decoder.pair.max_length)
    rows = methods(cfg)
    pools = {domain: batch_prompts(cfg, decoder.tokenizer, domain) for domain in cfg.domains}
    i_knee = cfg.i_knee if cfg.i_knee is not None else measure_i_knee(decoder.pair.device, decoder.pair.dtype)
    sizes = sorted(set(cfg.batch_sizes))
    out = Path(cfg.out)
    header = {"options": {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_OPTIONS}, "methods": list(rows),
              "pair": [draft, target], "i_knee": i_knee}
    done = open_records(out, header, resume=cfg.resume, overwrite=cfg.overwrite, key="cell")
    todo = [(domain, size) for domain in cfg.domains for size in sizes if f"{domain}/{size}" not in done]
    start = time.perf_counter()
    def results(partial: bool) -> dict:
        cells: dict[str, dict[str, dict]] = {domain: {} for domain in cfg.domains}
        for domain in cfg.domains:
            for size in sizes:
                if f"{domain}/{size}" in done:
                    cells[domain][str(size)] = {r["method"]: {k: v for k, v in r.items() if k not in ("cell", "method")}
                                                for r in done[f"{domain}/{size}"]}
        return {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **machine(decoder.pair.device, decoder.pair.dtype),
                "pair": {"draft": draft, "target": target}, "options": to_dict(cfg), "i_knee": i_knee,
                "k_rule": {str(b): speculation_length(i_knee, b) for b in sizes}, "methods": rows,
                "elapsed_seconds": time.perf_counter() - start, "partial": partial, "cells": cells}

    if todo:
        warm = pools[todo[0][0]][:2]
        warm_up(rows.values(), lambda options: decoder.generate(warm, max_new_tokens=8, **options), times=cfg.warmup)
    with tqdm(total=len(todo) * len(rows) * cfg.repeats, desc="batch sweep", unit="batch",
              disable=not cfg.progress) as bar:
        for domain, size in todo:
            bar.set_postfix_str(f"{domain} B={size}")
            cell = run_cell(cfg, decoder, pools[domain][:size], rows, bar)
            records = [{"cell": f"{domain}/{size}", "method": name, **figures} for name, figures in cell.items()]
            append_records(out, records)
            done[f"{domain}/{size}"] = records
            # A sweep stopped from outside (a time budget) keeps its finished cells in results.json.
            write_atomic(out / "results.json", json.dumps(results(partial=True), indent=2) + "\n")
    final = results(partial=False)
    write_reports(final, out)
    return final


def markdown(results: dict) -> str:
    hw, opts = results["hardware"], results["options"]
    where = hw.get("gpu") or f"{hw['cpu']}, {hw['torch_threads']} thread(s)"
    lines = [f"Batch sweep on {where}; {hw['dtype']}; {opts['prompt_len']}-token prompts, {opts['max_new_tokens']} new "
             f"tokens, temperature {opts['temperature']}, median of {opts['repeats']}. I_knee = "
             f"{results['i_knee']:.1f} tokens; the k rule gives "
             + ", ".join(f"k={k} at B={b}" for b, k in results["k_rule"].items()) + ".", ""]
    for domain, by_size in results["cells"].items():
        names = list(results["methods"])
        lines += [f"### {domain}: tokens/s (speedup vs batched ar; mean acceptance length)", "",
                  "| B | " + " | ".join(names) + " | ngram lookup share |", "|---" * (len(names) + 2) + "|"]
        for size, cell in by_size.items():
            entries = [f"{cell[n]['tokens_per_s']:.0f} ({cell[n]['speedup_vs_ar']:.2f}x; "
                       f"{cell[n]['mean_acceptance_length']:.2f})" for n in names]
            lines.append(f"| {size} | " + " | ".join(entries) + f" | {100 * cell['ngram']['draft_share']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["cells"])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        sizes = [int(b) for b in results["cells"][domain]]
        for name in results["methods"]:
            ax.plot(sizes, [results["cells"][domain][str(b)][name]["tokens_per_s"] for b in sizes], marker="o",
                    label=name)
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="tokens/s", title=domain)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_results(out, results, markdown(results) + "\n")
    try:
        import matplotlib  # noqa: F401  (an extra: sprinter[plot])
    except ImportError:
        print("note: batch.png not written: matplotlib is not installed (pip install 'sprinter[plot]')",
              file=sys.stderr)
        return
    try:
        plot(results, out / "batch.png")
    except OSError as err:
        raise disk_error(out / "batch.png", err, "writing") from err


__all__ = ["BatchBenchConfig", "markdown", "methods", "parse_batch_config", "run_sweep"]
