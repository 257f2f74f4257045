"""The engine's measurement: each single-prompt mode eager (dynamic caches, the reference) and compiled (static
caches, torch.compile, the gate fused into the draft step), side by side in one run, with where a token's time goes.

For each prompt and mode the two engines take turns (their order rotating), so machine drift falls on both alike.
Every call's wall time is split into sections by timing the loops' model calls: the draft's forwards (compiled:
the fused step, whose graph holds the gate too), the target's forwards, the eager gate's calls (its MLP and the
host sync of the pass/flag test), and the rest: the loop's Python, sampling, the acceptance test, rollbacks.
On CUDA each section synchronises the device at its ends, so its figures are the device's time, and the run is
a little slower than an untimed one; on a CPU the timers only read a clock.

The output checks travel with the figures: every lossless row (ar, sd, sd-gated) equals eager ar token for token,
and each compiled row equals its eager row. Compile seconds are measured once (every graph the rows use is
compiled before timing) and turned into the tokens it takes to pay them back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sprinter.bench.protocol import BenchRuntimeConfig, load_prompts, machine
from sprinter.config import SeedConfig, check_integers, option, save_config
from sprinter.decode.cache import CachedLM
from sprinter.decode.decoder import Decoder
from sprinter.decode.engine import Engine
from sprinter.decode.loops import GateRule
from sprinter.errors import SprinterError
from sprinter.files import write_atomic, write_json
from sprinter.pairs.build import resolve_pair

LOSSLESS = ("ar", "sd", "sd-gated")
MODES = {  # row -> generate() keywords
    "ar": dict(mode="ar"),
    "draft": dict(mode="draft"),
    "sd": dict(mode="sd", k=4),
    "sprinter": dict(mode="sprinter"),
    "sd-gated": dict(mode="sd-gated"),
}
SECTIONS = ("draft", "gate", "target", "other")


@dataclass(frozen=True)
class EngineBenchConfig(BenchRuntimeConfig, SeedConfig):
    """scripts/bench_engine.py's options: the single home of their defaults."""

    pair: str = option("bench", "a preset pair under checkpoints/pairs/ (built if missing) or a pair folder")
    verifier: str | None = option(None, "the gate of the sprinter and sd-gated rows; none: "
                                        "checkpoints/verifiers/<pair name> when it exists, else the draft's confidence")
    out: str | None = option(None, "results folder; none: results/engine/<pair name>-<device type>")
    modes: list[str] = option(list(MODES), f"rows to run, some of {list(MODES)} (ar is always run: the reference)")
    num_prompts: int = option(6, "held-out prompts (the benchmark's split and domains)")
    prompt_len: int = option(64, "tokens per prompt")
    max_new_tokens: int = option(96, "tokens generated per call")
    repeats: int = option(3, "timed calls per prompt, mode and engine (the median is kept)")
    dtype: str = option("float32", "float32, bfloat16, float16 or auto (float32: the rows are checked token for token)")
    seed: int = option(0, "sampling seed (the rows are greedy; it seeds the acceptance draws)")
    gate_cost: bool = option(False, "measure only what the gate costs per drafted token: the draft's step eager, "
                                    "eager + the gate, compiled, and fused with the gate (results: gate_cost.json)")

    def __post_init__(self) -> None:
        check_integers(self, ("num_prompts", "prompt_len", "max_new_tokens", "repeats"))
        check_integers(self, ("threads",), minimum=0)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise SprinterError(f"modes: got {list(self.modes)}; expected some of {list(MODES)}")


class Sections:
    """Seconds spent in each section of a generate call (see the module's docstring), gathered by wrapping the
    loops' model calls for the duration of a `with` block."""

    def __init__(self, target: torch.nn.Module, device: torch.device):
        self.target, self.device = target, device
        self.seconds = dict.fromkeys(SECTIONS[:-1], 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, section, fn):
        sections = self

        def wrapper(this, *args, **kwargs):
            name = section(this)
            sections._sync()
            start = time.perf_counter()
            out = fn(this, *args, **kwargs)
            sections._sync()
            sections.seconds[name] += time.perf_counter() - start
            return out

        return wrapper

    @contextlib.contextmanager
    def watching(self) -> Iterator["Sections"]:
        role = lambda lm: "target" if lm.model is self.target else "draft"  # noqa: E731
        patches = [(CachedLM, "append", self._timed(role, CachedLM.append)),
                   (CachedLM, "append_fused", self._timed(role, CachedLM.append_fused)),
                   (GateRule, "__call__", self._timed(lambda rule: "gate", GateRule.__call__))]
        saved = [(cls, name, getattr(cls, name)) for cls, name, _ in patches]
        try:
            for cls, name, fn in patches:
                setattr(cls, name, fn)
            yield self
        finally:
            for cls, name, fn in saved:
                setattr(cls, name, fn)


def run_engine_bench(cfg: EngineBenchConfig) -> dict:
    """Run every row on both engines; write results.json and results.md into the out folder; return the results."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    draft, target = resolve_pair(cfg.pair)
    pair_name = Path(draft).parent.name
    verifier = cfg.verifier
    if verifier is None and Path(f"checkpoints/verifiers/{pair_name}").exists():
        verifier = f"checkpoints/verifiers/{pair_name}"
    eager = Decoder.from_pretrained(draft, target, verifier=verifier, device=cfg.device, dtype=cfg.dtype)
    pair = eager.pair
    out = Path(cfg.out or f"results/engine/{pair_name}-{pair.device.type}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    compiled = Decoder(pair, eager.gate, eager.verifier_info, engine=Engine(pair.device, compile=True))
    if not compiled.engine.compile:
        raise SprinterError("compile: this platform cannot torch.compile (see the note above); expected a C++ "
                            "compiler on CPU or Triton on CUDA")
    if cfg.gate_cost:
        return measure_gate_cost(cfg, eager, compiled, out, verifier)
    gate = {} if verifier is not None else {"gate": "confidence"}
    modes = ["ar"] + [m for m in cfg.modes if m != "ar"]
    calls = {m: dict(MODES[m], **(gate if m in ("sprinter", "sd-gated") else {})) for m in modes}
    prompts = load_prompts(pair.tokenizer, num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len)

    # 1. Compile the graphs the rows use before timing: one untimed call per prompt and mode on both engines
    #    (a bucket first met while timing compiles then, and that call is run again).
    start = time.perf_counter()
    for prompt in prompts:
        for mode in modes:
            for decoder in (eager, compiled):
                decoder.generate(list(prompt.ids), max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, **calls[mode])
    compile_seconds = compiled.engine.compile_seconds  # every graph's, paid once per Decoder
    print(f"compile: {compile_seconds:.1f} s of graphs ({time.perf_counter() - start:.1f} s with the warm-up calls)",
          file=sys.stderr)

    # 2. Time: per prompt, per mode, the two engines take turns.
    engines = {"eager": eager, "compiled": compiled}
    samples: dict[tuple[str, str], list[dict]] = {(m, e): [] for m in modes for e in engines}
    outputs: dict[tuple[str, str, int], list[int]] = {}
    for p_index, prompt in enumerate(prompts):
        for mode in modes:
            for r in range(cfg.repeats):
                order = list(engines) if (p_index + r) % 2 == 0 else list(engines)[::-1]
                for name in order:
                    for _ in range(2):
                        sections = Sections(pair.target, pair.device)
                        with sections.watching():
                            res = engines[name].generate(list(prompt.ids), max_new_tokens=cfg.max_new_tokens,
                                                         seed=cfg.seed, **calls[mode])
                        if not res.stats.compile_seconds:
                            break
                        compile_seconds += res.stats.compile_seconds  # a graph the warm-up did not reach
                    wall = res.stats.wall_seconds
                    parts = dict(sections.seconds, other=max(0.0, wall - sum(sections.seconds.values())))
                    samples[(mode, name)].append({"ms_per_token": 1000 * wall / res.stats.new_tokens,
                                                  **{k: 1000 * v / res.stats.new_tokens for k, v in parts.items()},
                                                  "target_calls": res.stats.target_calls,
                                                  "tokens": res.stats.new_tokens})
                    outputs[(mode, name, p_index)] = res.token_ids
        print(f"prompt {p_index + 1}/{len(prompts)} done", file=sys.stderr)

        summary = summarise(cfg, samples, outputs, modes, calls, compile_seconds, p_index + 1)
        summary.update({"pair": str(Path(draft).parent), "verifier": verifier,
                        **machine(pair.device, pair.dtype)})
        write_json(out / "results.json", summary)  # after every prompt: a run stopped from outside keeps them
        write_atomic(out / "results.md", report(summary))
    print(report(summary))
    if summary["mismatches"]:
        raise SprinterError(f"outputs: {len(summary['mismatches'])} rows differ ({summary['mismatches'][:3]}); "
                            "expected every lossless row to equal ar and every compiled row its eager row")
    return summary


def measure_gate_cost(cfg: EngineBenchConfig, eager: Decoder, compiled: Decoder, out: Path, verifier: str | None
                      ) -> dict:
    """Milliseconds per drafted token of the draft's one-token step: eager, eager with the gate after it, compiled,
    and compiled with the gate fused into it; the four take turns call by call (medians of many)."""
    from sprinter.decode.drafters import DraftStep
    from sprinter.decode.gates import ConfidenceGate

    pair = eager.pair
    gate = eager.gate if eager.gate is not None else ConfidenceGate()
    layers = gate.hidden_layers
    capacity = cfg.prompt_len + 64
    plain = compiled.engine.lm(pair.draft, pair.vocab_size, capacity)  # shares the cache: one runs at a time
    fused = compiled.engine.fused(pair.draft, gate, pair.vocab_size, greedy=True)
    if fused is None:
        raise SprinterError(f"gate_cost: the gate of {cfg.verifier!r} cannot be fused into the draft step (its block "
                            "features keep state between tokens); expected a verifier without prev_draft_prob and "
                            "block_cum_prob")
    reference = CachedLM(pair.draft, pair.vocab_size)
    ids = torch.arange(cfg.prompt_len, device=pair.device)[None] % pair.vocab_size
    one = ids[:, -1:].clone()
    sampler_soft = torch.nn.functional.softmax

    def eager_step(with_gate: bool) -> None:
        logits, hidden = reference.append(one, hidden=layers if with_gate else 0)
        if with_gate:
            q_soft = sampler_soft(logits[0].float(), -1)
            x = logits[0].argmax(-1)
            step = DraftStep(token=x, q=q_soft, q_soft=q_soft, hidden=None if hidden is None else hidden[0, 0],
                             hidden_prev=hidden[0, 1] if layers > 1 else None)
            bool(gate.accept_prob(step, 0) >= gate.threshold)  # the loop's one host sync per decision
        reference.rollback(1)

    def compiled_step(with_gate: bool) -> None:
        if with_gate:
            *_, p_accept = plain.append_fused(one, fused, 0)
            bool(p_accept >= gate.threshold)
        else:
            plain.append(one)
        plain.rollback(1)

    with torch.inference_mode():
        reference.append(ids)
        plain.append(ids)
        calls = {"eager": lambda: eager_step(False), "eager+gate": lambda: eager_step(True),
                 "compiled": lambda: compiled_step(False), "fused": lambda: compiled_step(True)}
        for fn in calls.values():  # compile, warm up
            for _ in range(5):
                fn()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(400):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                if pair.device.type == "cuda":
                    torch.cuda.synchronize(pair.device)
                times[name].append(1000 * (time.perf_counter() - start))
    ms = {name: round(statistics.median(t), 4) for name, t in times.items()}
    result = {"format": "sprinter-gate-cost/1", "verifier": verifier, "gate": type(gate).__name__,
              "features": list(getattr(gate, "features", ())), "ms_per_drafted_token": ms,
              "eager_gate_share_of_step": round((ms["eager+gate"] - ms["eager"]) / ms["eager"], 4),
              "fused_gate_share_of_step": round((ms["fused"] - ms["compiled"]) / ms["compiled"], 4),
              **machine(pair.device, pair.dtype)}
    write_json(out / "gate_cost.json", result)
    print(json.dumps(result, indent=1))
    return result


def summarise(cfg: EngineBenchConfig, samples: dict, outputs: dict, modes: list[str], calls: dict,
              compile_seconds: float, prompts_done: int) -> dict:
    """The medians per mode and engine, the sections, the checks and the compile pay-back, so far."""
    # The checks: lossless rows equal eager ar; each compiled row equals its eager row (a lossy row's differences
    # are reported, not fatal: a P(accept) on its threshold may round the other way in a fused graph).
    mismatches, differences = [], []
    for (mode, name, p_index), ids in outputs.items():
        if mode in LOSSLESS and ids != outputs[("ar", "eager", p_index)]:
            mismatches.append(f"{mode} ({name}) differs from ar on prompt {p_index}")
        if name == "compiled" and ids != outputs[(mode, "eager", p_index)]:
            (mismatches if mode in LOSSLESS else differences).append(
                f"{mode} compiled differs from {mode} eager on prompt {p_index}")
    rows = []
    for mode in modes:
        row = {"mode": mode, "call": calls[mode]}
        for name in ("eager", "compiled"):
            got = samples[(mode, name)]
            row[name] = {key: round(statistics.median(s[key] for s in got), 4)
                         for key in ("ms_per_token", *SECTIONS, "target_calls")}
            model_ms = row[name]["draft"] + row[name]["target"]
            row[name]["outside_forwards_share"] = round(1 - model_ms / row[name]["ms_per_token"], 4)
        row["compiled_over_eager"] = round(row["compiled"]["ms_per_token"] / row["eager"]["ms_per_token"], 4)
        saved = row["eager"]["ms_per_token"] - row["compiled"]["ms_per_token"]
        row["tokens_to_amortise_compile"] = round(1000 * compile_seconds / saved) if saved > 0 else None
        rows.append(row)
    return {"format": "sprinter-engine-bench/1", "compile_seconds": round(compile_seconds, 2),
            "prompts": prompts_done, "max_new_tokens": cfg.max_new_tokens, "repeats": cfg.repeats, "rows": rows,
            "mismatches": mismatches, "lossy_differences": differences, "config": dataclasses.asdict(cfg)}


def report(results: dict) -> str:
    """The results as markdown: the speed table, then where a token's time goes."""
    hw = results["hardware"]
    where = hw.get("gpu") or hw.get("cpu")
    lines = [f"# Engine: eager vs compiled ({results['pair']}, {where}, {hw['dtype']}, "
             f"{hw['torch_threads']} thread(s))", "",
             f"{results['prompts']} prompts x {results['max_new_tokens']} tokens, median of {results['repeats']} "
             f"calls each; compile {results['compile_seconds']} s (once per Decoder). torch "
             f"{results['libraries']['torch']}, transformers {results['libraries']['transformers']}.", "",
             "| mode | eager ms/token | compiled ms/token | compiled / eager | tokens to pay back compiling |",
             "|---|---:|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(f"| {row['mode']} | {row['eager']['ms_per_token']:.3f} | {row['compiled']['ms_per_token']:.3f} "
                     f"| {row['compiled_over_eager']:.2f}x | {row['tokens_to_amortise_compile'] or 'never'} |")
    lines += ["", "Where a token's time goes (ms per token; compiled: the gate runs inside the draft's fused step):",
              "",
              "| mode | engine | draft forwards | gate | target forwards | other (Python, sampling, syncs) "
              "| outside the forwards |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        for name in ("eager", "compiled"):
            r = row[name]
            lines.append(f"| {row['mode']} | {name} | {r['draft']:.3f} | {r['gate']:.3f} | {r['target']:.3f} | "
                         f"{r['other']:.3f} | {100 * r['outside_forwards_share']:.0f}% |")
    lines += ["", "Checks: " + ("every lossless row equals ar, and every compiled row its eager row."
                                if not results["mismatches"] + results.get("lossy_differences", [])
                                else "; ".join(results["mismatches"] + results.get("lossy_differences", [])))]
    return "\n".join(lines) + "\n"


__all__ = ["EngineBenchConfig", "Sections", "report", "run_engine_bench"]
