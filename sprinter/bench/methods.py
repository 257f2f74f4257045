"""The benchmark's rows: every method family (FAMILIES) as one or more `Method`s, each a runner that decodes one
prompt (sprinter.bench.protocol), built from a BenchConfig (sprinter.bench.benchmark) and the loaded Decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sprinter.bench.protocol import Method, Runner
from sprinter.decode.cache import FlopModel
from sprinter.decode.decoder import Decoder
from sprinter.decode.engine import Engine
from sprinter.decode.gates import LearnedGate, load_learned_gate
from sprinter.errors import SprinterError
from sprinter.pairs.load import cache_argument, fingerprint
from sprinter.verifier import budget_key

if TYPE_CHECKING:
    from sprinter.bench.benchmark import BenchConfig

FAMILIES = ("ar", "draft", "sd", "hf-assisted", "ngram", "ngram-8", "sd-gated", "sd-gated-confidence",
            "sprinter-strict", "sprinter-mlp", "sprinter-linear", "sprinter-confidence", "auto", "async")
DEFAULT_METHODS = tuple(f for f in FAMILIES if f != "async")  # async is asked for by name
AUTO_NGRAM = 8  # the ngram-8 row: auto's longest n-gram candidate, run every round on auto's own loop
# Relaxed acceptance and training-free gates (docs/decoding.md, "Relaxed acceptance"): all lossy, asked for by name
# (configs/bench/pareto-demo.yaml). sd-RULE: sd-k{rule_k} whose target call keeps tokens by RULE, one row per
# threshold; sprinter-mlp+RULE: the verifier at each budget, its target call keeping tokens by RULE; sprinter-GATE:
# a draft-side gate's threshold sweep.
RELAXED = ("sd-ratio", "sd-entropy", "sprinter-mlp+ratio", "sprinter-mlp+entropy", "sprinter-entropy",
           "sprinter-margin")
FAMILIES += RELAXED
CALIBRATED_BUDGETS = (0.02, 0.05, 0.1, 0.2)  # the draft-side gates' budgets with --gate-data and no --budgets
LEARNED = ("sprinter-mlp", "sprinter-linear", "sprinter-strict")
GATED = ("sd-gated", "sd-gated-confidence")  # lossless; the operating point is the stop threshold
COMPILED_FAMILIES = ("ar", "draft", "sd", "sd-gated", "sd-gated-confidence", "sprinter-mlp", "sprinter-linear",
                     "sprinter-confidence", "sprinter-strict")  # --compile: single-prompt loops of ours

class ForwardCounter:
    """Counts a model's forward passes, tokens and analytic FLOPs while active (for hf-assisted, whose
    loop is not ours): a forward pre-hook reads input_ids and the cache length."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.flop_model = model, FlopModel.of(model)
        self.calls = self.tokens = self.flops = 0

    def __enter__(self) -> "ForwardCounter":
        self.handle = self.model.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_argument(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        new = ids.shape[1]
        keep = kwargs.get("logits_to_keep", 0)
        logits = min(keep, new) if isinstance(keep, int) and keep > 0 else new
        self.calls += 1
        self.tokens += new
        self.flops += self.flop_model.forward(past, new, logits)


def hf_assisted_runner(decoder: Decoder, temperature: float, top_p: float = 1.0) -> Runner:
    """Hugging Face assisted generation on the same pair: target.generate(assistant_model=draft)."""
    pair = decoder.pair
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else pair.tokenizer.eos_token_id

    @torch.inference_mode()
    def run(ids: list[int], seed: int, max_new_tokens: int) -> tuple[list[int], dict]:
        inputs = torch.tensor([ids], device=pair.device)  # (1, T)
        sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p} if temperature > 0
                    else {"do_sample": False})
        torch.manual_seed(seed)  # HF samples from the global generator
        with ForwardCounter(pair.target) as target, ForwardCounter(pair.draft) as draft:
            start = time.perf_counter()
            out = pair.target.generate(inputs, attention_mask=torch.ones_like(inputs), assistant_model=pair.draft,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad,
                                       eos_token_id=pair.tokenizer.eos_token_id, **sampling)  # EOS stops ar too
            if pair.device.type == "cuda":
                torch.cuda.synchronize(pair.device)
            seconds = time.perf_counter() - start
        new = out[0, len(ids):].tolist()
        # HF exposes no acceptance counts: each target call emits its accepted tokens plus one of its own.
        return new, {"new_tokens": len(new), "wall_seconds": seconds, "target_calls": target.calls,
                     "target_tokens": target.tokens, "target_flops": target.flops, "draft_calls": draft.calls,
                     "draft_tokens": draft.tokens, "draft_flops": draft.flops, "verifier_flops": 0,
                     "accepted": max(0, len(new) - target.calls)}

    return run


def decoder_runner(decoder: Decoder, temperature: float, top_p: float = 1.0, **options) -> Runner:
    """A sprinter mode, timed around the whole call as hf-assisted is (the loop's own time kept as loop_seconds)."""
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {"temperature": temperature}

    def run(ids: list[int], seed: int, max_new_tokens: int) -> tuple[list[int], dict]:
        start = time.perf_counter()
        out = decoder.generate(ids, max_new_tokens=max_new_tokens, seed=seed, **sampling, **options)
        seconds = time.perf_counter() - start  # generate synchronises CUDA before it returns
        stats = out.stats.to_dict()
        stats["loop_seconds"], stats["wall_seconds"] = stats["wall_seconds"], seconds
        return out.token_ids, stats

    return run


def missing_verifier(path: str, role: str) -> SprinterError:
    return SprinterError(
        f"{role}: got {path!r}, which does not exist; make one with `python scripts/collect.py` then "
        "`python scripts/train.py --budgets 0.05 0.02 0.1 0.2` (writes checkpoints/verifiers/demo and its "
        "baselines/linear/), pass --verifier DIR, or leave the learned rows out: "
        "--methods ar draft sd hf-assisted sprinter-confidence")


def check_verifiers(cfg: BenchConfig) -> dict[str, str]:
    """{"mlp": path, "linear": path, "stop": path} for the learned families asked for; refuses a missing checkpoint."""
    paths = {}
    if {"sprinter-mlp", "sprinter-strict", "sprinter-mlp+ratio", "sprinter-mlp+entropy"} & set(cfg.methods):
        if not Path(cfg.verifier).exists():
            raise missing_verifier(cfg.verifier, "verifier")
        paths["mlp"] = cfg.verifier
    if "auto" in cfg.methods and Path(cfg.verifier).exists():  # optional: without it, the lossless auto row only
        paths["mlp"] = cfg.verifier
    if "sd-gated" in cfg.methods:
        stop = cfg.stop_verifier or cfg.verifier
        if not Path(stop).exists():
            raise missing_verifier(stop, "stop verifier" if cfg.stop_verifier else "verifier")
        paths["stop"] = stop
    if cfg.compare_verifier is not None and "sprinter-mlp" in cfg.methods:
        if not Path(cfg.compare_verifier).exists():
            raise missing_verifier(cfg.compare_verifier, "compare verifier")
        paths["compare"] = cfg.compare_verifier
    if "sprinter-linear" in cfg.methods:
        linear = cfg.linear_verifier or str(Path(cfg.verifier) / "baselines" / "linear")
        if not Path(linear).exists():
            raise missing_verifier(linear, "linear verifier")
        paths["linear"] = linear
    return paths


def chosen_budgets(cfg: BenchConfig, thresholds: dict[str, float], path: str) -> list[tuple[float, float]]:
    """[(budget, threshold)] sorted by budget: cfg.budgets, or every budget the checkpoint was calibrated for."""
    if not thresholds:
        raise SprinterError(f"verifier {path!r} has no calibrated thresholds; expected a checkpoint written by "
                            "scripts/train.py (--budgets 0.05 0.02 0.1 0.2)")
    if not cfg.budgets:
        return sorted((float(b), t) for b, t in thresholds.items())
    missing = [b for b in cfg.budgets if budget_key(b) not in thresholds]
    if missing:
        raise SprinterError(f"budgets: got {missing} for verifier {path!r}; expected some of {sorted(thresholds)} "
                            "(retrain with --budgets to add more)")
    return sorted((float(b), thresholds[budget_key(b)]) for b in cfg.budgets)


def build_methods(cfg: BenchConfig, decoder: Decoder, verifiers: dict[str, str]) -> list[Method]:
    """The rows of the table, in the order of FAMILIES. A row is `lossless` when its mode keeps the target's
    distribution (greedy: its very tokens), whatever the temperature."""
    runner = functools.partial(decoder_runner, decoder, cfg.temperature, cfg.top_p)
    gates: dict[str, tuple[LearnedGate, dict[str, float]]] = {}
    if "mlp" in verifiers:
        gates["mlp"] = (decoder.gate, decoder.verifier_info.thresholds_at(cfg.temperature))  # decode-time first
    for name in ("linear", "stop", "compare"):
        if name in verifiers and not (name == "stop" and verifiers["stop"] == verifiers.get("mlp")):
            pair = decoder.pair
            gate, info = load_learned_gate(verifiers[name], fingerprint(pair.draft_name), pair.draft.config.hidden_size,
                                           pair.device, pair.dtype)
            gates[name] = (gate, info.thresholds_at(cfg.temperature))
    if "stop" in verifiers and "stop" not in gates:
        gates["stop"] = gates["mlp"]
    methods: list[Method] = []
    for family in FAMILIES:
        if family not in cfg.methods:
            continue
        if family in ("ar", "draft"):
            methods.append(Method(family, family, family == "ar", runner(mode=family)))
        elif family == "sd":
            methods += [Method(f"sd-k{k}", family, True, runner(mode="sd", k=k), k)
                        for k in sorted(set(cfg.ks))]
        elif family == "async":
            methods += [Method(f"async-w{w}", family, True, runner(mode="async", window=w), w)
                        for w in sorted(set(cfg.windows))]
        elif family == "hf-assisted":
            methods.append(Method(family, family, True, hf_assisted_runner(decoder, cfg.temperature, cfg.top_p)))
        elif family in GATED:
            gate = gates["stop"][0] if family == "sd-gated" else "confidence"
            methods += [Method(f"{family}@{c:g}", family, True,
                               runner(mode="sd-gated", gate=gate, stop_threshold=c, max_block=cfg.max_block), c)
                        for c in sorted(set(cfg.stop_thresholds))]
        elif family == "ngram":  # batch 1: s from the device's I_knee (sprinter.decode.roofline)
            methods.append(Method(family, family, True, runner(mode="ngram")))
        elif family == "ngram-8":  # the fixed rival auto must beat: its n-gram candidate on its single-prompt loop
            methods.append(Method(family, family, True, runner(mode="auto", max_block=cfg.max_block,
                                                           auto_candidate=f"ngram-k{AUTO_NGRAM}"), AUTO_NGRAM))
        elif family == "auto":  # lossless, and with a verifier one row per budget: sprinter at it is a candidate
            methods.append(Method(family, family, True, runner(mode="auto", max_block=cfg.max_block)))
            if "mlp" in gates:
                methods += [Method(f"auto@{budget:g}", family, False,
                                   runner(mode="auto", max_block=cfg.max_block, max_false_accept=budget), budget)
                            for budget, _ in chosen_budgets(cfg, gates["mlp"][1], verifiers["mlp"])]
        elif family in RELAXED:
            methods += relaxed_methods(cfg, decoder, family, gates, verifiers)
        elif family == "sprinter-confidence":
            methods += [Method(f"{family}@{c:g}", family, False,
                               runner(mode="sprinter", gate="confidence", threshold=c, max_block=cfg.max_block), c)
                        for c in sorted(set(cfg.confidence_thresholds))]
        else:
            name = "linear" if family == "sprinter-linear" else "mlp"
            gate, thresholds = gates[name]
            budgets = chosen_budgets(cfg, thresholds, verifiers[name])
            if family == "sprinter-strict":  # lossless: the default budget is enough to show its cost
                budgets = budgets[:1]
            for budget, threshold in budgets:
                methods.append(Method(f"{family}@{budget:g}", family, family == "sprinter-strict",
                                      runner(mode="sprinter", max_block=cfg.max_block,
                                             strict=family == "sprinter-strict",
                                             gate=LearnedGate(gate.verifier, gate.features, threshold)),
                                      budget))
            if family == "sprinter-mlp" and "compare" in gates:  # the other verifier at the same budgets
                other, other_thresholds = gates["compare"]
                for budget, _ in budgets:
                    threshold = other_thresholds.get(budget_key(budget))
                    if threshold is None:
                        continue  # not calibrated for this budget
                    methods.append(Method(f"sprinter-mlp-compare@{budget:g}", family, False,
                                          runner(mode="sprinter", max_block=cfg.max_block,
                                                 gate=LearnedGate(other.verifier, other.features, threshold)),
                                          budget))
    return methods


def relaxed_methods(cfg: BenchConfig, decoder: Decoder, family: str, gates: dict, verifiers: dict[str, str]
                    ) -> list[Method]:
    """The rows of one RELAXED family (every one lossy: never checked against ar)."""
    t, rule = cfg.temperature, family.rsplit("+", 1)[-1].rsplit("-", 1)[-1]
    if family in ("sd-ratio", "sd-entropy"):
        values = cfg.ratio_lambdas if rule == "ratio" else cfg.entropy_taus
        return [Method(f"{family}@{v:g}", family, False, decoder_runner(decoder, t, mode="sd", k=cfg.rule_k, rule=rule,
                                                                       rule_threshold=v), v)
                for v in sorted(set(values))]
    if family in ("sprinter-entropy", "sprinter-margin"):
        if cfg.gate_data is not None:  # calibrated: (budget, threshold) from collected rows
            from sprinter.train.calibrate import draft_gate_thresholds

            label = "accept_greedy" if t == 0 else "accept_sprinter"
            budgets = sorted(set(cfg.budgets)) or list(CALIBRATED_BUDGETS)
            points = sorted(draft_gate_thresholds(cfg.gate_data, rule, budgets, label).items())
            print(f"{family}: thresholds {dict(points)} at false-accept budgets on {cfg.gate_data!r} ({label})",
                  file=sys.stderr)
        else:  # swept: the threshold is the operating point
            values = cfg.entropy_gate_thresholds if rule == "entropy" else cfg.margin_thresholds
            points = [(v, v) for v in sorted(set(values))]
        return [Method(f"{family}@{point:g}", family, False,
                       decoder_runner(decoder, t, mode="sprinter", gate=rule, threshold=threshold,
                                      max_block=cfg.max_block), point)
                for point, threshold in points]
    gate, thresholds = gates["mlp"]  # sprinter-mlp+RULE
    value = cfg.gated_ratio_lambda if rule == "ratio" else cfg.gated_entropy_tau
    return [Method(f"{family}@{budget:g}", family, False,
                   decoder_runner(decoder, t, mode="sprinter", max_block=cfg.max_block, rule=rule, rule_threshold=value,
                                  gate=LearnedGate(gate.verifier, gate.features, threshold)), budget)
            for budget, threshold in chosen_budgets(cfg, thresholds, verifiers["mlp"])]


def compiled_methods(cfg: BenchConfig, decoder: Decoder, verifiers: dict[str, str]) -> list[Method]:
    """The compilable rows again, on a Decoder that shares the models but compiles its steps: NAME+compiled.
    Every graph is compiled here, so the timed runs pay none of it (the seconds go to stderr)."""

    pair = decoder.pair
    compiled = Decoder(pair, decoder.gate, decoder.verifier_info, decoder.datastore, Engine(pair.device, compile=True))
    capacity = cfg.prompt_len + cfg.max_new_tokens
    layers = decoder.gate.hidden_layers if decoder.gate is not None else 1  # the draft's states a gate reads
    seconds = sum(compiled.engine.warm(model, pair.vocab_size, capacity, hidden=layers if model is pair.draft else 0)
                  for model in (pair.target, pair.draft))
    print(f"compile: {seconds:.1f} s for {len(compiled.engine.steps)} models' graphs", file=sys.stderr)
    return [dataclasses.replace(m, name=f"{m.name}+compiled") for m in build_methods(cfg, compiled, verifiers)
            if m.family in COMPILED_FAMILIES]


__all__ = ["COMPILED_FAMILIES", "DEFAULT_METHODS", "FAMILIES", "GATED", "LEARNED", "RELAXED", "ForwardCounter",
           "build_methods", "check_verifiers", "compiled_methods", "decoder_runner", "hf_assisted_runner",
           "relaxed_methods"]
