"""The benchmark: every decoding mode on the same prompts and hardware, speed and fidelity side by side.

The protocol is sprinter.bench.protocol's (docs/benchmark.md): batch 1, greedy by default, held-out
prompts of two domains, a warm-up generation per method first, then the methods interleaved prompt by
prompt (their order rotated each prompt). Each lossless method's output is checked equal to `ar`'s
(greedy runs); a difference stops the run with a SprinterError. Fidelity is scored outside the timed
region by one teacher-forced target forward per output (sprinter.bench.fidelity).

Per-prompt records are appended to OUT/records.jsonl as each prompt finishes; `resume` continues from
them. sprinter.bench.report turns the records into results.json, results.md and pareto.png.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sprinter.bench.fidelity import exact_match, rouge_l, score_output
from sprinter.bench.methods import (
    DEFAULT_METHODS,
    FAMILIES,
    build_methods,
    check_verifiers,
    compiled_methods,
)
from sprinter.bench.protocol import (
    RECORDS,
    BenchRuntimeConfig,
    Method,
    Prompt,
    PromptSetConfig,
    append_records,
    check_domains,
    check_lossless,
    check_window,
    load_prompts,
    open_records,
    rotated,
    warm_up,
)
from sprinter.bench.report import write_reports
from sprinter.config import (
    CONFIGS,
    ModelsConfig,
    SeedConfig,
    check_integers,
    check_runs,
    option,
    to_dict,
)
from sprinter.decode.costs import measure_costs
from sprinter.decode.decoder import Decoder
from sprinter.decode.gates import (
    CONFIDENCE_THRESHOLD,
    check_threshold,
)
from sprinter.decode.options import DEMO_VERIFIER, DecodeOptions
from sprinter.errors import SprinterError
from sprinter.files import FolderLock

CONFIG_DIR = CONFIGS / "bench"
# Options that may change on --resume without changing what a record means.
RUNTIME_OPTIONS = ("out", "resume", "overwrite", "progress", "threads", "warmup", "store_stop_threshold")


@dataclass(frozen=True)
class BenchConfig(PromptSetConfig, ModelsConfig, BenchRuntimeConfig, SeedConfig):
    """The benchmark's options: the single home of their defaults (scripts/benchmark.py reads them)."""

    verifier: str = option(DEMO_VERIFIER, "the project's verifier checkpoint (scripts/train.py --out)")
    linear_verifier: str | None = option(None, "the paper's linear verifier; none: VERIFIER/baselines/linear")
    compare_verifier: str | None = option(None, "sprinter-mlp: also run this verifier (e.g. the previous default) "
                                                "at the same budgets, rows sprinter-mlp-compare@B, beside VERIFIER's")
    methods: tuple[str, ...] = option(DEFAULT_METHODS, f"method families to run, some of {FAMILIES}")
    ks: tuple[int, ...] = option((2, 4, 8), "sd: draft lengths k (the best one is marked)")
    windows: tuple[int, ...] = option((4,), "async: windows (most drafted tokens awaiting verification); each side "
                                            "runs on --threads intra-op threads")
    budgets: tuple[float, ...] = option((), "sprinter: false-accept budgets to run (empty: all the checkpoint has)")
    confidence_thresholds: tuple[float, ...] = option((0.2, CONFIDENCE_THRESHOLD, 0.6),
                                                      "sprinter-confidence: thresholds on q(x) "
                                                      "(0.4: Hugging Face's default)")
    max_block: int = option(20, "sprinter: call the target after this many passed tokens; sd-gated: the longest block")
    stop_thresholds: tuple[float, ...] = option((0.3, 0.5, 0.7), "sd-gated: stop thresholds on 1 - prod P(accept) "
                                                                  "to sweep (the fastest is marked)")
    stop_verifier: str | None = option(None, "sd-gated: the verifier whose P(accept) sets the block length (one "
                                             "trained with --label-rule soft suits it); none: VERIFIER")
    store_stop_threshold: bool = option(False, "write the fastest sd-gated stop threshold into STOP_VERIFIER's "
                                               "checkpoint (the Decoder's default for mode sd-gated)")
    num_prompts: int = option(40, "prompts in all (the domains take turns)")
    prompt_len: int = option(64, "prompt tokens")
    max_new_tokens: int = option(128, "most tokens to generate per prompt")
    temperature: float = option(0.0, "0 is greedy (outputs of lossless methods are checked); above 0 samples")
    check_lossless: bool = option(True, "greedy: stop with an error when a lossless method's output differs from ar's "
                                        "(off for bfloat16/float16, where near-ties can flip; "
                                        "exact_match_vs_ar still shows it)")
    seed: int = option(0, "seed of prompt i's generator is seed + i, the same for every method")
    warmup: int = option(1, "warm-up generations per method before timing")
    compile: bool = option(False, "also run the ar, draft, sd, sd-gated and sprinter rows compiled (NAME+compiled: "
                                  "static caches, torch.compile; every graph is compiled before timing)")
    out: str = option("results/demo", "output folder: records.jsonl, results.json, results.md, pareto.png")
    resume: bool = option(False, "continue from OUT/records.jsonl (same options)")
    overwrite: bool = option(False, "replace the records in OUT")
    progress: bool = option(True, "show a progress bar")
    rule_k: int = option(4, "sd-ratio, sd-entropy: tokens drafted per target call")
    ratio_lambdas: tuple[float, ...] = option((0.3, 0.5, 0.8), "sd-ratio: lambdas of the ratio rule (keep x iff "
                                                                "p(x) >= lambda max p) to sweep")
    entropy_taus: tuple[float, ...] = option((1.0, 2.0, 3.0), "sd-entropy: taus of the entropy rule (keep x where "
                                                               "the target's entropy >= tau nats) to sweep")
    gated_ratio_lambda: float = option(0.5, "sprinter-mlp+ratio: the ratio rule's lambda at every budget")
    gated_entropy_tau: float = option(2.0, "sprinter-mlp+entropy: the entropy rule's tau (nats) at every budget")
    entropy_gate_thresholds: tuple[float, ...] = option((0.2, 0.4, 0.6), "sprinter-entropy: thresholds on "
                                                                          "exp(-H(q)) to sweep")
    margin_thresholds: tuple[float, ...] = option((0.1, 0.3, 0.5), "sprinter-margin: thresholds on q's top-1 minus "
                                                                    "top-2 probability to sweep")
    gate_data: str | None = option(None, "sprinter-entropy, sprinter-margin: calibrate their thresholds at BUDGETS "
                                         "(empty: 0.02 0.05 0.1 0.2) on this shard folder's rows (scripts/collect.py; "
                                         "label accept_greedy at temperature 0, else accept_sprinter), rows "
                                         "GATE@BUDGET, instead of sweeping the thresholds")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in FAMILIES]
        if unknown or not self.methods:
            raise SprinterError(f"methods: got {list(self.methods)}; expected some of {FAMILIES}")
        if "ar" not in self.methods:
            raise SprinterError(f"methods: got {list(self.methods)}; expected 'ar' among them (every speedup and "
                                "fidelity figure is measured against it)")
        check_domains(self.domains)
        check_integers(self, ("num_prompts", "prompt_len", "max_new_tokens", "max_block"))
        for k in self.ks:
            DecodeOptions(mode="sd", max_new_tokens=self.max_new_tokens, k=k)
        for window in self.windows:
            DecodeOptions(mode="async", window=window)
        check_integers(self, ("warmup", "threads"), minimum=0)
        for value in (*self.budgets, *self.confidence_thresholds, *self.stop_thresholds):
            check_threshold(value)
        if "sd-gated" in self.methods and not self.stop_thresholds:
            raise SprinterError("stop_thresholds: got none with method sd-gated; expected at least one")
        if self.store_stop_threshold and "sd-gated" not in self.methods:
            raise SprinterError(f"store_stop_threshold: got True with methods {list(self.methods)}; expected "
                                "'sd-gated' among them (its sweep chooses the threshold)")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise SprinterError(f"temperature: got {self.temperature!r}; expected a finite number >= 0")
        check_runs(self, neither="PAIR/draft and PAIR/target")
        self._check_relaxed()

    def _check_relaxed(self) -> None:
        """The RELAXED families' operating points, checked as DecodeOptions checks them (before any model loads)."""
        check_integers(self, ("rule_k",))
        if self.gate_data is not None and not (Path(self.gate_data) / "manifest.json").is_file():
            raise SprinterError(f"gate_data: got {self.gate_data!r}, which holds no manifest.json; expected a folder "
                                "written by scripts/collect.py")
        for value in (*self.entropy_gate_thresholds, *self.margin_thresholds):
            check_threshold(value)
        for rule, values in (("ratio", (*self.ratio_lambdas, self.gated_ratio_lambda)),
                             ("entropy", (*self.entropy_taus, self.gated_entropy_tau))):
            for value in values:
                DecodeOptions(mode="sd", rule=rule, rule_threshold=value)


def default_config_path() -> Path:
    return CONFIG_DIR / "demo.yaml"


# ------------------------------------------------------------------------------------------- records
def run_header(cfg: BenchConfig, prompts: Sequence[Prompt], methods: Sequence[Method]) -> dict:
    """What the records mean: checked equal on --resume."""
    options = {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_OPTIONS}
    return {"options": options, "methods": [m.name for m in methods],
            "prompts": [[p.domain, p.doc, list(p.ids)] for p in prompts]}


def run_prompt(cfg: BenchConfig, decoder: Decoder, prompt: Prompt, methods: Sequence[Method], bar) -> list[dict]:
    """Every method on one prompt (order rotated by the prompt index), then the checks and fidelity scores."""
    outputs: dict[str, tuple[list[int], dict]] = {}
    for method in rotated(methods, prompt.index):
        bar.set_postfix_str(f"prompt {prompt.index} {method.name}")
        outputs[method.name] = method.run(list(prompt.ids), cfg.seed + prompt.index, cfg.max_new_tokens)
        bar.update(1)
    reference = outputs["ar"][0]
    records = []
    for method in methods:
        tokens, stats = outputs[method.name]
        if method.lossless and cfg.check_lossless:
            check_lossless(method.name, tokens, reference,
                           where=f"prompt {prompt.index} ({prompt.domain}, {prompt.doc})")
        fidelity = score_output(decoder.pair.target, prompt.ids, tokens, decoder.pair.vocab_size)
        records.append({"prompt": prompt.index, "domain": prompt.domain, "method": method.name, "tokens": tokens,
                        "stats": stats, "fidelity": fidelity, "rouge_l_vs_ar": rouge_l(tokens, reference),
                        "exact_match_vs_ar": exact_match(tokens, reference)})
    return records


def load_decoder(cfg: BenchConfig, verifiers: dict[str, str]) -> Decoder:
    from sprinter.pairs.build import resolve_pair

    draft, target = resolve_pair(cfg.pair, cfg.draft, cfg.target)
    return Decoder.from_pretrained(draft, target, verifier=verifiers.get("mlp"), device=cfg.device, dtype=cfg.dtype)


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run (or resume) the benchmark and write OUT/results.json, results.md, pareto.png; returns the results.
    OUT is locked for the whole run (a second benchmark into it, fresh or resumed, is refused at once)."""
    with FolderLock(cfg.out, "benchmark"):
        return _run_benchmark(cfg)


def _run_benchmark(cfg: BenchConfig) -> dict:
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # 1. Every check that needs no model, then the models, prompts and rows.
    verifiers = check_verifiers(cfg)
    decoder = load_decoder(cfg, verifiers)
    check_window(cfg.prompt_len, cfg.max_new_tokens, decoder.pair.max_length)
    methods = build_methods(cfg, decoder, verifiers)
    if cfg.compile:
        methods += compiled_methods(cfg, decoder, verifiers)
    prompts = load_prompts(decoder.tokenizer, dataset=cfg.dataset, split=cfg.split, domains=cfg.domains,
                           num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len)
    done = open_records(Path(cfg.out), run_header(cfg, prompts, methods), resume=cfg.resume, overwrite=cfg.overwrite)
    todo = [p for p in prompts if p.index not in done]
    start = time.perf_counter()
    # The pair's cost profile (~2 s, before the timed runs): each row's predicted ms/token (sprinter.bench.latency).
    profile = measure_costs(decoder.pair, name=cfg.pair, gate=decoder.gate, max_n=max(cfg.max_block, *cfg.ks) + 1,
                            context=cfg.prompt_len)
    decoder.profile = profile  # mode auto chooses with the same profile (not measured again)
    # 2. Warm up, then every method on each prompt in turn; each finished prompt is appended to the records.
    if todo:
        first = list(todo[0].ids)
        warm_up(methods, lambda m: m.run(first, cfg.seed, min(cfg.max_new_tokens, 16)), times=cfg.warmup)
        bar = tqdm(total=len(todo) * len(methods), desc="benchmark", unit="gen", disable=not cfg.progress)
        with bar:
            try:
                for prompt in todo:
                    records = run_prompt(cfg, decoder, prompt, methods, bar)
                    append_records(Path(cfg.out), records)
                    done[prompt.index] = records
            except KeyboardInterrupt:
                print(f"\ninterrupted: {len(done)} finished prompt(s) kept in {Path(cfg.out) / RECORDS}; run the same "
                      "command with --resume to continue", file=sys.stderr)
                raise
    # 3. Aggregate and write the reports; store the chosen stop threshold with its verifier if asked.
    results = write_reports(Path(cfg.out), options=to_dict(cfg), decoder=decoder, verifiers=verifiers, prompts=prompts,
                            methods=methods, done=done, seconds=time.perf_counter() - start)
    stop = results["recommended_stop_threshold"]
    if cfg.store_stop_threshold and stop is not None:
        from sprinter.verifier import update_info

        update_info(verifiers["stop"], stop_threshold=stop)
        print(f"stored stop_threshold={stop:g} in {verifiers['stop']} (the default of mode sd-gated with it)",
              file=sys.stderr)
    return results


__all__ = ["BenchConfig", "FAMILIES", "build_methods", "default_config_path", "run_benchmark"]
