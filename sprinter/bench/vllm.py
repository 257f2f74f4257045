"""The vLLM benchmark (scripts/bench_vllm.py, docs/vllm.md): what serving with vLLM adds or costs, speculation included.

Rows, on one pair and one prompt set (the benchmark's held-out prompts, sprinter.bench.protocol):
- vLLM plain (no speculation), vLLM `draft_model` at each fixed k, vLLM `ngram`, vLLM with the sprinter proposer
  (sprinter.integrations.vllm: the draft drafts, the verifier ends each chain at its first flagged token);
- sprinter's own `Decoder` on the same pair and prompts: ar, sd at each k, sd-gated and sprinter (lossy) at batch 1,
  and batched ar / sd (its batched modes) at each concurrency.
Figures: batch-1 latency (ms per new token, one request at a time), throughput (new tokens/s of `concurrency`
requests submitted together), and per request the speculation's acceptance (vLLM's counters read before and after
each batch-1 request: accepted / proposed tokens, and tokens per target step). Each figure is reported as the median
and interquartile range over `repeats` passes (batch 1: over every prompt of every pass). Each engine is built once and
warmed up (one request) before it is timed; engines run one at a time (each in this process, one thread by default).
Every vLLM speculative row's batch-1 output is checked equal to vLLM plain's (greedy: speculation is lossless there).
vLLM requests ignore EOS, so every request costs max_new_tokens; the Decoder's stop at EOS (ms/token normalises).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sprinter.bench.protocol import PromptLenConfig, check_lossless, hardware, libraries, load_prompts
from sprinter.config import ThreadsConfig, check_integer_lists, check_integers, option, to_dict
from sprinter.errors import SprinterError
from sprinter.files import write_atomic, write_json
from sprinter.integrations.vllm import CLASS_PATH, CONFIG_ENV

# One engine on a shared CPU machine: a small KV cache, threads bound by OMP_NUM_THREADS (docs/vllm.md).
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@dataclass(frozen=True)
class BenchVllmConfig(PromptLenConfig, ThreadsConfig):
    pair: str = option("checkpoints/pairs/bench", "pair folder (PAIR/target, PAIR/draft)")
    verifier: str = option("checkpoints/verifiers/bench", "verifier trained for the pair's draft")
    threshold: float | None = option(None, "the proposer's flag threshold (none: the verifier's calibrated one)")
    out: str = option("results/vllm/bench", "output folder (results.json, results.md)")
    num_prompts: int = option(16, "held-out prompts (code and prose taking turns)")
    max_new_tokens: int = option(128, "new tokens per request")
    ks: tuple[int, ...] = option((2, 4, 8), "vLLM draft_model's and the Decoder's sd's fixed k")
    sprinter_k: int = option(8, "the sprinter proposer's most tokens per chain (num_speculative_tokens)")
    ngram_k: int = option(4, "vLLM ngram's num_speculative_tokens (n-grams of 1..3 tokens)")
    concurrency: tuple[int, ...] = option((4, 16), "requests submitted together for the throughput figures")
    repeats: int = option(3, "timed passes per figure")
    threads: int = option(1, "torch / OpenMP threads")
    decoder: bool = option(True, "also time sprinter's own Decoder on the same pair and prompts")

    def __post_init__(self) -> None:
        check_integers(self, ("num_prompts", "prompt_len", "max_new_tokens", "sprinter_k", "ngram_k", "repeats",
                              "threads"))
        check_integer_lists(self, ("ks", "concurrency"))


def spread(values: list[float]) -> dict:
    """Median and interquartile range (the quartiles; both the value itself when there is one)."""
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": 1}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


def vllm_methods(cfg: BenchVllmConfig) -> list[tuple[str, dict | None]]:
    """(name, speculative_config) of every vLLM row, plain first (the reference)."""
    draft = str(Path(cfg.pair) / "draft")
    rows: list[tuple[str, dict | None]] = [("vllm-plain", None)]
    rows += [(f"vllm-draft-k{k}", {"method": "draft_model", "model": draft, "num_speculative_tokens": k})
             for k in cfg.ks]
    rows.append((f"vllm-sprinter-k{cfg.sprinter_k}", {"method": "custom_class", "model": CLASS_PATH,
                                                       "num_speculative_tokens": cfg.sprinter_k}))
    # ngram last: its proposer imports numba, and vLLM 0.32's CPU worker then fails to start any later engine in the
    # same process (its kernel-override scan of sys.modules trips over an llvmlite object: AttributeError
    # '_lib_fn_wrapper' object has no attribute 'get')
    rows.append((f"vllm-ngram-k{cfg.ngram_k}", {"method": "ngram", "num_speculative_tokens": cfg.ngram_k,
                                                "prompt_lookup_min": 1, "prompt_lookup_max": 3}))
    return rows


def spec_counters(llm) -> dict[str, float]:
    """vLLM's speculative-decoding counters so far (all zero without speculation)."""
    names = {"vllm:spec_decode_num_drafts": "steps", "vllm:spec_decode_num_draft_tokens": "proposed",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    out = dict.fromkeys(names.values(), 0.0)
    for metric in llm.get_metrics():
        if metric.name in names:
            out[names[metric.name]] += float(metric.value)
    return out


def run_vllm(cfg: BenchVllmConfig, name: str, spec: dict | None, prompts: list[list[int]]) -> dict:
    """One vLLM engine: warm-up, then `repeats` batch-1 passes and throughput passes."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(Path(cfg.pair) / "target"), dtype="float32", enforce_eager=True, seed=0,
              max_model_len=cfg.prompt_len + cfg.max_new_tokens + max(cfg.sprinter_k, *cfg.ks, cfg.ngram_k) + 8,
              max_num_seqs=max(cfg.concurrency), speculative_config=spec, disable_log_stats=False)
    params = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens, ignore_eos=True)

    def generate(batch: list[list[int]], engine=llm) -> list[list[int]]:
        outs = engine.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    generate(prompts[:1])  # warm-up
    ms, acceptance, outputs = [], [], []
    throughput: dict[int, list[float]] = {c: [] for c in cfg.concurrency}
    for repeat in range(cfg.repeats):
        for ids in prompts:
            before = spec_counters(llm)
            start = time.perf_counter()
            (out,) = generate([ids])
            ms.append(1000 * (time.perf_counter() - start) / len(out))
            after = spec_counters(llm)
            delta = {k: after[k] - before[k] for k in after}
            if repeat == 0:
                outputs.append(out)
                if spec is not None:
                    acceptance.append({"accepted": delta["accepted"], "proposed": delta["proposed"],
                                       "steps": delta["steps"]})
        for c in cfg.concurrency:
            batch = [prompts[i % len(prompts)] for i in range(c)]
            start = time.perf_counter()
            new = sum(map(len, generate(batch)))
            throughput[c].append(new / (time.perf_counter() - start))
    del llm, generate  # the engine goes before the next one starts
    gc.collect()
    row = {"name": name, "engine": "vllm", "speculative_config": spec, "batch1_ms_per_token": spread(ms),
           "tokens_per_s": {str(c): spread(v) for c, v in throughput.items()}, "outputs": outputs}
    if acceptance:
        rates = [a["accepted"] / a["proposed"] for a in acceptance if a["proposed"]]
        per_step = [(a["accepted"] + a["steps"]) / a["steps"] for a in acceptance if a["steps"]]
        row.update(acceptance_rate=spread(rates) if rates else None,
                   tokens_per_step=spread(per_step) if per_step else None, per_request=acceptance)
    return row


def run_decoder(cfg: BenchVllmConfig, prompts: list[list[int]]) -> list[dict]:
    """sprinter's own Decoder on the same pair and prompts."""
    from sprinter.decode.decoder import Decoder

    dec = Decoder.from_pretrained(draft=str(Path(cfg.pair) / "draft"), target=str(Path(cfg.pair) / "target"),
                                  verifier=cfg.verifier, device="cpu", dtype="float32")
    extra = {} if cfg.threshold is None else {"threshold": cfg.threshold}
    single = [("decoder-ar", {"mode": "ar"})] + [(f"decoder-sd-k{k}", {"mode": "sd", "k": k}) for k in cfg.ks]
    single += [("decoder-sd-gated", {"mode": "sd-gated"}), ("decoder-sprinter (lossy)", {"mode": "sprinter", **extra})]
    rows = []
    for name, opts in single:
        dec.generate(prompts[0], max_new_tokens=8, **opts)  # warm-up
        ms = []
        for _ in range(cfg.repeats):
            for ids in prompts:
                start = time.perf_counter()
                out = dec.generate(ids, max_new_tokens=cfg.max_new_tokens, **opts)
                ms.append(1000 * (time.perf_counter() - start) / max(len(out.token_ids), 1))
        row = {"name": name, "engine": "sprinter Decoder", "options": opts, "batch1_ms_per_token": spread(ms),
               "tokens_per_s": {}}
        if opts["mode"] in ("ar", "sd"):  # the Decoder's batched modes
            for c in cfg.concurrency:
                batch, rates = [prompts[i % len(prompts)] for i in range(c)], []
                for _ in range(cfg.repeats):
                    start = time.perf_counter()
                    new = sum(len(o.token_ids) for o in dec.generate(batch, max_new_tokens=cfg.max_new_tokens, **opts))
                    rates.append(new / (time.perf_counter() - start))
                row["tokens_per_s"][str(c)] = spread(rates)
        rows.append(row)
    return rows


def run(cfg: BenchVllmConfig) -> dict:
    """Every row; writes OUT/results.json and OUT/results.md."""
    import importlib.util

    from sprinter.pairs.load import load_tokenizer

    if importlib.util.find_spec("vllm") is None:  # before the Decoder rows, which would run first for nothing
        raise SprinterError("vLLM is not installed in this environment; expected it from "
                            "`bash scripts/install_vllm.sh` (in its own virtual environment: docs/vllm.md)")
    for path in (Path(cfg.pair) / "target", Path(cfg.pair) / "draft", Path(cfg.verifier)):
        if not path.exists():
            raise SprinterError(f"{path}: does not exist; expected the pair's models and a verifier trained for its "
                                "draft (docs/vllm.md, 'Reproduce the measurement')")
    os.environ.update({**ENGINE_ENV, "OMP_NUM_THREADS": str(cfg.threads)})
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    proposer = out / "proposer.yaml"
    lines = [f"draft: {Path(cfg.pair) / 'draft'}", f"verifier: {cfg.verifier}"]  # relative: to this process's folder
    write_atomic(proposer, "\n".join(lines + ([f"threshold: {cfg.threshold}"] if cfg.threshold is not None else []))
                 + "\n")
    os.environ[CONFIG_ENV] = str(proposer.resolve())
    tokenizer = load_tokenizer(str(Path(cfg.pair) / "target"), "target")
    prompts = [list(p.ids) for p in load_prompts(tokenizer, num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len)]
    rows = run_decoder(cfg, prompts) if cfg.decoder else []
    reference = None
    for name, spec in vllm_methods(cfg):
        row = run_vllm(cfg, name, spec, prompts)
        if reference is None:
            reference = row["outputs"]
        for i, (got, want) in enumerate(zip(row.pop("outputs"), reference)):
            check_lossless(name, got, want, where=f"prompt {i}")
        rows.append(row)
    import vllm

    results = {"config": to_dict(cfg), "hardware": hardware(torch.device("cpu"), torch.float32),
               "libraries": {**libraries(), "vllm": vllm.__version__}, "rows": rows}
    write_json(out / "results.json", results)
    write_atomic(out / "results.md", report(results))
    return results


def _fmt(s: dict | None, digits: int = 2) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}, {s['q3']:.{digits}f}]"


def report(results: dict) -> str:
    cfg, hw = results["config"], results["hardware"]
    conc = [str(c) for c in cfg["concurrency"]]
    head = ["row", "engine", "batch-1 ms/token", *[f"tokens/s @ {c}" for c in conc], "acceptance", "tokens/step"]
    lines = [f"# vLLM benchmark: {cfg['pair']}", "",
             f"{cfg['num_prompts']} held-out prompts x {cfg['max_new_tokens']} new tokens, greedy, float32, "
             f"{cfg['threads']} thread(s), {cfg['repeats']} passes; {hw['cpu']}; vLLM {results['libraries']['vllm']}, "
             f"torch {results['libraries']['torch']}, transformers {results['libraries']['transformers']}.",
             "Each cell: median [first quartile, third quartile]; batch 1 over every prompt of every pass, throughput "
             "over passes, acceptance (accepted / proposed tokens) and tokens per target step over requests at "
             "batch 1. Every vLLM row's output equals vLLM plain's. Reproduce: docs/vllm.md.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        cells = [row["name"], row["engine"], _fmt(row["batch1_ms_per_token"]),
                 *[_fmt(row["tokens_per_s"].get(c), 1) for c in conc],
                 _fmt(row.get("acceptance_rate")), _fmt(row.get("tokens_per_step"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["BenchVllmConfig", "report", "run", "spread", "vllm_methods"]
