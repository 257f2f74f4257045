"""The async benchmark (scripts/bench_async.py): `ar`, `sd` and `async` side by side on each pair, with the
intra-op threads each would get on a machine of two cores: ar on one thread, sd on one and on two (its
draft and target take turns, each may use both cores), async on one thread per side (two cores).

The protocol is sprinter.bench.protocol's (docs/benchmark.md, docs/async.md: greedy, held-out stdlib prompts
of both domains, a warm-up per method, the methods interleaved prompt by prompt with their order rotated,
every output checked equal to ar's, per-prompt records in OUT/<pair>/records.jsonl for --resume), but
timing only: no fidelity scoring (every row is lossless). An output may leave ar's only where the target's
two best logits are within NEAR_TIE (fp32 rounding, which depends on the forward's shape, decides; async's
block shapes vary with timing): such a flip is counted per row; any other difference stops the run. Per
pair it writes OUT/<pair>/results.json and results.md: medians over prompts of ms/token and of the speedup
over ar on the same prompt, and for async the median overlap (DecodeStats.overlap) and each side's busy
share of the wall time. Every row also gets
cpu_per_wall: the process's CPU time over the wall time, the cores' worth of CPU it really got (busy times
are wall time, so they also count time a side spent descheduled or waiting for the GIL).
"""

from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sprinter.bench import protocol
from sprinter.bench.protocol import Prompt, PromptLenConfig
from sprinter.config import (
    DeviceConfig,
    ProgressConfig,
    check_integer_lists,
    check_integers,
    check_runs,
    option,
    to_dict,
)
from sprinter.decode.decoder import Decoder
from sprinter.decode.options import DecodeOptions
from sprinter.errors import SprinterError

FORMAT = "sprinter-async-bench/1"
RUNTIME_OPTIONS = ("pairs", "out", "resume", "overwrite", "progress", "warmup")  # may change on --resume
NEAR_TIE = 1e-4  # fp32 target logits this close: which wins depends on the forward's shape (async's varies with timing)


def logit_gap(decoder: Decoder, prompt: Prompt, reference: list[int], i: int, token: int) -> float:
    """|logit(ar's token) - logit(token)| of the target at new position i after ar's prefix."""
    ids = torch.tensor([list(prompt.ids) + reference[:i]], device=decoder.pair.device)  # (1, T)
    with torch.inference_mode():
        logits = decoder.pair.target(ids).logits[0, -1].float()
    return abs(logits[reference[i]] - logits[token]).item()


@dataclass(frozen=True)
class AsyncBenchConfig(ProgressConfig, PromptLenConfig, DeviceConfig):
    """Options of scripts/bench_async.py: the single home of their defaults."""

    pairs: tuple[str, ...] = option(("demo", "bench"), "preset pairs under checkpoints/pairs/ (built if missing) or "
                                                       "pair folders")
    num_prompts: int = option(20, "held-out prompts per pair (code and prose take turns)")
    max_new_tokens: int = option(128, "most tokens to generate per prompt")
    ks: tuple[int, ...] = option((2, 4, 8), "sd: draft lengths k")
    windows: tuple[int, ...] = option((2, 4, 8), "async: windows (most drafted tokens awaiting verification)")
    ar_threads: int = option(1, "intra-op threads for ar")
    sd_threads: tuple[int, ...] = option((1, 2), "intra-op threads for sd, one row per count (its two models take "
                                                 "turns on them)")
    async_threads: int = option(1, "intra-op threads for each side of async")
    warmup: int = option(1, "warm-up generations per method before timing")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto (both async sides run on it, on separate CUDA streams)")
    out: str = option("results/async", "output folder: OUT/<pair>/records.jsonl, results.json and results.md")
    resume: bool = option(False, "continue from OUT/<pair>/records.jsonl (same options): finished prompts are kept")
    overwrite: bool = option(False, "replace the records in OUT/<pair>")

    def __post_init__(self) -> None:
        check_integers(self, ("num_prompts", "prompt_len", "max_new_tokens", "ar_threads", "async_threads"))
        check_integer_lists(self, ("sd_threads",))
        check_integers(self, ("warmup",), minimum=0)
        check_runs(self)
        if not self.pairs:
            raise SprinterError("pairs: got none; expected at least one pair name or folder")
        for k in self.ks:
            DecodeOptions(mode="sd", max_new_tokens=self.max_new_tokens, k=k)
        for window in self.windows:
            DecodeOptions(mode="async", window=window)


def methods(cfg: AsyncBenchConfig) -> list[tuple[str, int, dict]]:
    """(name, intra-op threads, generate options) per row."""
    rows = [("ar", cfg.ar_threads, {"mode": "ar"})]
    rows += [(f"sd-k{k}-t{n}", n, {"mode": "sd", "k": k})
             for n in sorted(set(cfg.sd_threads)) for k in sorted(set(cfg.ks))]
    rows += [(f"async-w{w}", cfg.async_threads, {"mode": "async", "window": w}) for w in sorted(set(cfg.windows))]
    return rows


def run_once(decoder: Decoder, prompt: Prompt, threads: int, options: dict, max_new_tokens: int) -> dict:
    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    out = decoder.generate(list(prompt.ids), max_new_tokens=max_new_tokens, **options)
    seconds = time.perf_counter() - start
    stats = out.stats.to_dict()
    stats["wall_seconds"] = seconds  # the whole call, thread start and join included
    stats["cpu_per_wall"] = (time.process_time() - cpu) / seconds  # cores' worth of CPU this process got
    return {"tokens": out.token_ids, "stats": stats}


def summarize(name: str, threads: int, runs: list[dict], reference: list[dict]) -> dict:
    def ms(run: dict) -> float:
        return 1000 * run["stats"]["wall_seconds"] / max(1, run["stats"]["new_tokens"])

    stats = [r["stats"] for r in runs]
    total = lambda key: sum(s[key] or 0 for s in stats)  # noqa: E731
    tokens = total("new_tokens")
    entry = {"name": name, "threads": threads, "prompts": len(runs), "new_tokens": tokens,
             "ms_per_token": statistics.median(map(ms, runs)),
             "speedup_vs_ar": statistics.median(ms(a) / ms(r) for r, a in zip(runs, reference)),
             "target_calls_per_token": total("target_calls") / tokens,
             "mean_acceptance_length": 1 + total("accepted") / total("target_calls"),
             "cpu_per_wall": statistics.median(s["cpu_per_wall"] for s in stats),
             "near_tie_flips": sum(r["near_tie_flip"] for r in runs)}
    if name.startswith("async"):
        overlaps = [s["overlap"] for s in stats if s["overlap"] is not None]
        entry["overlap"] = statistics.median(overlaps) if overlaps else None
        entry["draft_busy_share"] = statistics.median(s["draft_busy_seconds"] / s["wall_seconds"] for s in stats)
        entry["target_busy_share"] = statistics.median(s["target_busy_seconds"] / s["wall_seconds"] for s in stats)
        entry["discarded_per_token"] = total("discarded") / tokens
    return entry


def run_prompt(decoder: Decoder, prompt: Prompt, rows: list[tuple[str, int, dict]], *, pair: str,
               max_new_tokens: int, bar) -> list[dict]:
    """Every row on one prompt (order rotated by the prompt index), each checked equal to ar's output."""
    runs: dict[str, dict] = {}
    for name, threads, options in protocol.rotated(rows, prompt.index):
        bar.set_postfix_str(f"{Path(pair).name} prompt {prompt.index} {name}")
        runs[name] = run_once(decoder, prompt, threads, options, max_new_tokens)
        bar.update(1)
    reference = runs["ar"]["tokens"]
    records = []
    for name, _, _ in rows:
        tokens = runs[name]["tokens"]

        def near_tie(i: int, tokens: list[int] = tokens) -> bool:
            return i < len(tokens) and logit_gap(decoder, prompt, reference, i, tokens[i]) <= NEAR_TIE

        i = protocol.check_lossless(name, tokens, reference, where=f"prompt {prompt.index} of pair {pair!r}",
                                    tolerate=near_tie)
        records.append({"prompt": prompt.index, "method": name, **runs[name], "near_tie_flip": i is not None})
    return records


def bench_pair(cfg: AsyncBenchConfig, pair: str, bar) -> dict:
    """Every row on every prompt of one pair (continuing OUT/<pair>/records.jsonl with --resume); returns its
    results dict."""
    from sprinter.pairs.build import resolve_pair

    draft, target = resolve_pair(pair, None, None)
    decoder = Decoder.from_pretrained(draft, target, device=cfg.device)
    prompts = protocol.load_prompts(decoder.tokenizer, num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len)
    rows = methods(cfg)
    header = {"options": {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_OPTIONS},
              "pair": [draft, target], "methods": [name for name, _, _ in rows],
              "prompts": [[p.domain, p.doc, list(p.ids)] for p in prompts]}
    done = protocol.open_records(Path(cfg.out) / Path(pair).name, header, resume=cfg.resume, overwrite=cfg.overwrite)
    todo = [p for p in prompts if p.index not in done]
    bar.update(len(rows) * (len(prompts) - len(todo)))
    if todo:
        protocol.warm_up(rows, lambda row: run_once(decoder, todo[0], row[1], row[2], min(cfg.max_new_tokens, 16)),
                times=cfg.warmup)
    for prompt in todo:
        done[prompt.index] = run_prompt(decoder, prompt, rows, pair=pair, max_new_tokens=cfg.max_new_tokens, bar=bar)
        protocol.append_records(Path(cfg.out) / Path(pair).name, done[prompt.index])
    runs = {name: [r for p in prompts for r in done[p.index] if r["method"] == name] for name, _, _ in rows}
    return {"format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **protocol.machine(decoder.pair.device, decoder.pair.dtype),
            "pair": {"name": pair, "draft": draft, "target": target}, "prompts": len(prompts),
            "max_new_tokens": cfg.max_new_tokens, "options": to_dict(cfg),
            "methods": [summarize(name, threads, runs[name], runs["ar"]) for name, threads, _ in rows]}


def markdown(results: dict) -> str:
    hw = results["hardware"]
    where = hw.get("gpu") or f"{hw['cpu']} ({hw.get('cpu_count')} cores visible)"

    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    flips = ", ".join(f"{e['name']} {e['near_tie_flips']}" for e in results["methods"] if e["near_tie_flips"])
    lines = [f"# ar, sd and async: pair {results['pair']['name']}", "",
             f"{where}; {hw['dtype']}; torch {results['libraries']['torch']}. {results['prompts']} held-out prompts, "
             f"up to {results['max_new_tokens']} new tokens, greedy; every output equals ar's (near-tie flips: "
             f"{flips or 'none'}). Medians over prompts; "
             "speedup = ar's ms/token over the row's on the same prompt. threads: intra-op threads (async: per side).",
             "", "| method | threads | ms/token | speedup vs ar | target calls/token | mean acc. length | CPU / wall "
             "| overlap | draft busy | target busy |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results["methods"]:
        lines.append(f"| {e['name']} | {e['threads']} | {fmt(e['ms_per_token'])} | {fmt(e['speedup_vs_ar'])} | "
                     f"{fmt(e['target_calls_per_token'], 3)} | {fmt(e['mean_acceptance_length'])} | "
                     f"{fmt(e['cpu_per_wall'])} | {fmt(e.get('overlap'))} | {fmt(e.get('draft_busy_share'))} | "
                     f"{fmt(e.get('target_busy_share'))} |")
    lines += ["", "overlap = (draft busy + target busy - wall) / min(draft busy, target busy): 1 when the less busy "
              "side ran entirely alongside the other, 0 when they took turns. busy: share of the wall time "
              "(time outside waits, descheduled or GIL-blocked time included). CPU / wall: process CPU time over "
              "wall time, the cores' worth of CPU the row really got.", ""]
    return "\n".join(lines)


def run(cfg: AsyncBenchConfig) -> list[dict]:
    """Benchmark every pair; writes OUT/<pair>/results.json and results.md; returns the results."""
    from tqdm import tqdm

    before = torch.get_num_threads()
    total = len(cfg.pairs) * cfg.num_prompts * len(methods(cfg))
    out = []
    try:
        with tqdm(total=total, desc="bench-async", unit="gen", disable=not cfg.progress) as bar:
            for pair in cfg.pairs:
                results = bench_pair(cfg, pair, bar)
                folder = Path(cfg.out) / Path(pair).name
                protocol.save_results(folder, results, markdown(results))
                out.append(results)
    finally:
        torch.set_num_threads(before)
    return out


__all__ = ["AsyncBenchConfig", "markdown", "run"]
