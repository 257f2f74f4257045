"""The benchmark: every decoding mode on the same prompts and hardware, speed and fidelity side by side.

The protocol is sprinter.bench.protocol's (docs/benchmark.md): batch 1, a workload (sprinter.bench.workloads:
`sampled`, the default, `greedy` or `grounded`) that sets the prompts, sampling and length, held-out prompts,
calibration prompts of another split decoded by every row before timing (the latency model's inputs, so its
predictions are made before the measurement), a warm-up per method, then the methods interleaved prompt by
prompt, `repeats` rounds each (their order rotated each round). In greedy runs each lossless method's output is
checked equal to `ar`'s (a difference stops the run with a SprinterError); in sampled runs the lossless rows are
checked in distribution once all prompts ran (sprinter.bench.distribution). Fidelity is scored outside the timed
region by one teacher-forced target forward per output (sprinter.bench.fidelity).

Per-prompt records are appended to OUT/records.jsonl as each prompt finishes; `resume` continues from
them. sprinter.bench.report turns the records into results.json, results.md and pareto.png.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sprinter.bench.distribution import ALPHA
from sprinter.bench.fidelity import exact_match, rouge_l, score_output
from sprinter.bench.latency import flat_acceptance
from sprinter.bench.methods import (
    DEFAULT_METHODS,
    FAMILIES,
    build_methods,
    check_verifiers,
    compiled_methods,
)
from sprinter.bench.protocol import (
    CALIBRATION,
    RECORDS,
    Method,
    PairBenchConfig,
    Prompt,
    append_records,
    check_domains,
    check_lossless,
    check_window,
    open_records,
    rotated,
    save,
    warm_up,
)
from sprinter.bench.report import write_reports
from sprinter.bench.workloads import DEFAULTS as WORKLOAD_DEFAULTS
from sprinter.bench.workloads import WORKLOADS, resolve, workload_prompts
from sprinter.config import (
    CONFIGS,
    check_integers,
    check_runs,
    option,
    parse_config,
    to_dict,
)
from sprinter.decode.costs import Budget, CostProfile, measure_costs
from sprinter.decode.decoder import Decoder
from sprinter.decode.gates import (
    CONFIDENCE_THRESHOLD,
    check_threshold,
)
from sprinter.decode.options import DEMO_VERIFIER, DecodeOptions
from sprinter.decode.sampling import Sampler
from sprinter.errors import SprinterError
from sprinter.files import FolderLock, read_json

CONFIG_DIR = CONFIGS / "bench"
# The cost profile's budget: 100 rounds of calls, or 30 s, at least 10 (a round: ~0.1 s on the demo pair, ~0.35 s
# on the bench pair). 5 s held 3 rounds on the bench pair while the machine was busy: its target forwards came out
# non-monotone in n (20.7 ms at n = 1, 7.4 at n = 5) and ar's prediction +134% (results/bench-greedy, session 7).
PROFILE_BUDGET = Budget(seconds=30.0, min_repeats=10, max_repeats=100)
# Options that may change on --resume without changing what a record means.
RUNTIME_OPTIONS = ("out", "resume", "overwrite", "progress", "threads", "warmup", "store_stop_threshold",
                   "report_only")


@dataclass(frozen=True)
class BenchConfig(PairBenchConfig):
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
    report_only: bool = option(False, "write OUT's reports again from its finished records, calibration prompts and "
                                      "the cost profile its results.json stored (measured before that run's timing); "
                                      "nothing is decoded or timed")
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
    workload: str = option("sampled", f"prompts, sampling and length: one of {tuple(WORKLOADS)} (sprinter.bench."
                                      "workloads; it fills temperature, top_p and max_new_tokens left at their "
                                      "defaults)")
    top_p: float = option(1.0, "nucleus of the sampled rows (hf-assisted too); the workload sets it")
    repeats: int = option(3, "timed runs of each prompt x method (interleaved, the order rotated each round): "
                             "the speedup's median and bootstrap interval are over prompts x repeats")
    calibration_prompts: int = option(12, "prompts of CALIBRATION_SPLIT every row decodes before timing (also its "
                                          "warm-up): the latency model's acceptance inputs (0: predict from the "
                                          "timed run's own counts; 12: results/calibration-count)")
    calibration_split: str = option("val", "corpus split of the calibration prompts (disjoint from SPLIT's)")
    distribution_alpha: float = option(ALPHA, "temperature > 0: the distribution check's significance level "
                                              "(Bonferroni over lossless rows and its two tests)")

    def __post_init__(self) -> None:
        workload = resolve(self.workload)
        for name, default in WORKLOAD_DEFAULTS.items():  # the workload fills what was left at its default
            if getattr(self, name) == default:
                object.__setattr__(self, name, getattr(workload, name))  # frozen: set once, here
        check_integers(self, ("repeats",))
        check_integers(self, ("calibration_prompts",), minimum=0)
        if self.calibration_prompts and self.calibration_split == self.split:
            raise SprinterError(f"calibration_split: got {self.calibration_split!r}, the timed prompts' split; "
                                "expected another (predictions are made on prompts disjoint from the timed ones)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SprinterError(f"top_p: got {self.top_p!r}; expected a number in (0, 1]")
        if not isinstance(self.distribution_alpha, (int, float)) or not 0 < self.distribution_alpha < 1:
            raise SprinterError(f"distribution_alpha: got {self.distribution_alpha!r}; expected a number in (0, 1)")
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


def parse_bench_config(argv: Sequence[str] | None) -> BenchConfig:
    """scripts/benchmark.py's options: defaults < configs/bench/demo.yaml (or --config) < flags."""
    return parse_config(BenchConfig, argv, "Benchmark ar, draft, sd, hf-assisted and sprinter: speed and fidelity.",
                        CONFIG_DIR / "demo.yaml")


# ------------------------------------------------------------------------------------------- records
def run_header(cfg: BenchConfig, prompts: Sequence[Prompt], methods: Sequence[Method]) -> dict:
    """What the records mean: checked equal on --resume."""
    options = {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_OPTIONS}
    return {"options": options, "methods": [m.name for m in methods],
            "prompts": [[p.domain, p.doc, list(p.ids)] for p in prompts]}


def run_prompt(cfg: BenchConfig, decoder: Decoder, prompt: Prompt, methods: Sequence[Method], bar) -> list[dict]:
    """Every method on one prompt, `repeats` rounds (the order rotated each round), then the checks and fidelity
    scores. Outputs, checks and fidelity are the first round's; every round's time is kept (`timings`). A greedy
    lossless row must give the same tokens in every round (seeded runs are deterministic)."""
    outputs: dict[str, tuple[list[int], dict]] = {}
    timings: dict[str, list[dict]] = {m.name: [] for m in methods}
    where = f"prompt {prompt.index} ({prompt.domain}, {prompt.doc})"
    for round_ in range(cfg.repeats):
        for method in rotated(methods, prompt.index * cfg.repeats + round_):
            bar.set_postfix_str(f"prompt {prompt.index} {method.name}")
            tokens, stats = method.run(list(prompt.ids), cfg.seed + prompt.index, cfg.max_new_tokens)
            timings[method.name].append({"wall_seconds": stats["wall_seconds"], "new_tokens": stats["new_tokens"]})
            if round_ == 0:
                outputs[method.name] = (tokens, stats)
            elif method.lossless and cfg.temperature == 0 and cfg.check_lossless and tokens != outputs[method.name][0]:
                raise SprinterError(f"{method.name}: repeat {round_} of {where} gave other tokens than repeat 0; "
                                    "expected a seeded greedy run to repeat itself")
            bar.update(1)
    reference = outputs["ar"][0]
    records = []
    for method in methods:
        tokens, stats = outputs[method.name]
        if method.lossless and cfg.check_lossless and cfg.temperature == 0:
            check_lossless(method.name, tokens, reference, where=where)
        fidelity = score_output(decoder.pair.target, prompt.ids, tokens, decoder.pair.vocab_size)
        records.append({"prompt": prompt.index, "domain": prompt.domain, "method": method.name, "tokens": tokens,
                        "stats": stats, "timings": timings[method.name], "fidelity": fidelity,
                        "rouge_l_vs_ar": rouge_l(tokens, reference),
                        "exact_match_vs_ar": exact_match(tokens, reference)})
    return records


def calibrate(cfg: BenchConfig, decoder: Decoder, methods: Sequence[Method]) -> dict[str, list[dict]]:
    """Every method on CALIBRATION_PROMPTS prompts of CALIBRATION_SPLIT (untimed; it warms the methods up too):
    {method name: [stats per prompt]}, the latency model's inputs for the predictions (sprinter.bench.latency).
    Kept in OUT/calibration.json; a resumed run (same options: open_records checked them) reads it back."""
    path = Path(cfg.out) / CALIBRATION
    if not cfg.calibration_prompts:
        path.unlink(missing_ok=True)  # an earlier run's, replaced by --overwrite: not this run's inputs
        return {}
    if (cfg.resume or cfg.report_only) and path.is_file():
        return read_json(path, CALIBRATION)
    prompts = workload_prompts(resolve(cfg.workload), decoder.tokenizer, dataset=cfg.dataset,
                               split=cfg.calibration_split, domains=cfg.domains, num_prompts=cfg.calibration_prompts,
                               prompt_len=cfg.prompt_len, continuation_len=0)
    runs = {m.name: [m.run(list(p.ids), cfg.seed + p.index, cfg.max_new_tokens)[1] for p in prompts]
            for m in methods}
    save(path, json.dumps(runs) + "\n")
    return runs


def stored_run(out: Path) -> dict:
    """--report-only: OUT's results.json, which must hold the cost profile its run measured before timing."""
    path = out / "results.json"
    stored = read_json(path, "results.json") if path.is_file() else {}
    if not isinstance((stored.get("pair") or {}).get("cost_profile"), dict) or not (out / CALIBRATION).is_file():
        raise SprinterError(f"report_only: {str(out)!r} holds no finished run with a cost profile and calibration "
                            f"prompts ({'no results.json' if not stored else 'results.json without them'}); expected "
                            "the --out of a finished benchmark")
    return stored


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
    prompts = workload_prompts(resolve(cfg.workload), decoder.tokenizer, dataset=cfg.dataset, split=cfg.split,
                               domains=cfg.domains, num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len,
                               continuation_len=cfg.max_new_tokens)
    stored = stored_run(Path(cfg.out)) if cfg.report_only else {}
    done = open_records(Path(cfg.out), run_header(cfg, prompts, methods), resume=cfg.resume or cfg.report_only,
                        overwrite=cfg.overwrite)
    todo = [p for p in prompts if p.index not in done]
    if cfg.report_only and todo:
        raise SprinterError(f"report_only: {len(todo)} of {len(prompts)} prompts in {cfg.out!r} are not finished; "
                            "expected a finished run (--resume finishes it)")
    start = time.perf_counter()
    # The pair's cost profile (PROFILE_BUDGET: 30 s, before the timed runs): each row's predicted ms/token
    # (sprinter.bench.latency), its steps timed with the rows' sampler after the generations' mean context (the
    # prompt and half the budget). --report-only: the one that run measured before its timing.
    profile = CostProfile.from_dict(stored["pair"]["cost_profile"]) if stored else measure_costs(
        decoder.pair, name=cfg.pair, gate=decoder.gate, max_n=max(cfg.max_block, *cfg.ks) + 1,
        context=cfg.prompt_len + cfg.max_new_tokens // 2, prompt=cfg.prompt_len,
        sampler=Sampler(cfg.temperature, top_p=cfg.top_p if cfg.temperature > 0 else 1.0), budget=PROFILE_BUDGET)
    decoder.profile = profile  # mode auto chooses with the same profile (not measured again)
    # 2. The calibration prompts (the predictions' acceptance inputs, before anything is timed), a warm-up, then
    # every method on each prompt in turn, `repeats` rounds; each finished prompt is appended to the records.
    calibration = calibrate(cfg, decoder, methods)  # OUT/calibration.json, read by the report
    # mode auto starts from the calibration's acceptance (not pair.json's greedy agreement), as the predictions do
    decoder.draft_prior = flat_acceptance([s for m in methods if m.family == "sd" for s in calibration.get(m.name, [])])
    if todo:
        first = list(todo[0].ids)
        warm_up(methods, lambda m: m.run(first, cfg.seed, min(cfg.max_new_tokens, 16)), times=cfg.warmup)
        bar = tqdm(total=len(todo) * len(methods) * cfg.repeats, desc="benchmark", unit="gen",
                   disable=not cfg.progress)
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
                            methods=methods, done=done,
                            seconds=stored.get("elapsed_seconds") or time.perf_counter() - start)
    failed = {name: c for name, c in (results.get("distribution_check") or {}).items() if not c["passed"]}
    if failed:
        raise SprinterError("distribution check: " + "; ".join(
            f"{name} p_nll={c['p_nll']:.2g}, p_tokens={c['p_tokens']:.2g}" for name, c in failed.items())
            + f" below {next(iter(failed.values()))['threshold']:.2g} (alpha {cfg.distribution_alpha:g}, Bonferroni); "
            f"expected lossless rows to sample ar's distribution (reports kept in {cfg.out})")
    stop = results["recommended_stop_threshold"]
    if cfg.store_stop_threshold and stop is not None:
        from sprinter.verifier import update_info

        update_info(verifiers["stop"], stop_threshold=stop)
        print(f"stored stop_threshold={stop:g} in {verifiers['stop']} (the default of mode sd-gated with it)",
              file=sys.stderr)
    return results


__all__ = ["BenchConfig", "FAMILIES", "build_methods", "parse_bench_config", "run_benchmark"]
