"""Declared vs measured false-accept budget at decode time (scripts/budget.py).

For each temperature and each budget F the verifier was calibrated for, mode "sprinter" decodes held-out
prompts (the `test` split, as the benchmark's: sprinter.bench.protocol.load_prompts) at F, once with the
calibrated threshold fixed ("static") and once with it adapted online ("adapted": DecodeOptions
adapt_threshold, sprinter.decode.budget), each prompt starting from the threshold the one before it ended
with: the prompts are one stream, as a server's requests are. Each row pools the prompts' counts: the
measured decode-time false-accept rate (the share of passed tokens the target would have rejected: greedy,
not its argmax; sampling, the speculative-sampling rejection probability), its 90% Wilson interval, the flag
rate, ms/token, and whether the budget holds: the interval's upper end within F + tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from sprinter.bench.protocol import PairBenchConfig, check_domains
from sprinter.config import check_integers, option, parse_config, to_dict
from sprinter.decode.stats import wilson_interval
from sprinter.errors import SprinterError
from sprinter.files import FolderLock, write_atomic, write_json

VARIANTS = ("static", "adapted")


@dataclass(frozen=True)
class BudgetConfig(PairBenchConfig):
    """scripts/budget.py's options: the budgets, temperatures and threshold variants to measure, and the prompts."""

    verifier: str = option("checkpoints/verifiers/demo", "the verifier checkpoint, calibrated for every budget")
    out: str = option("results/budget", "output folder for results.json and results.md")
    budgets: tuple[float, ...] = option((0.02, 0.05, 0.1), "declared false-accept budgets (each one the verifier "
                                                           "was calibrated for)")
    temperatures: tuple[float, ...] = option((0.0, 0.8), "decode temperatures (0: greedy)")
    top_p: float = option(0.95, "top-p at temperature > 0")
    variants: tuple[str, ...] = option(VARIANTS, f"threshold variants, some of {VARIANTS}")
    num_prompts: int = option(8, "held-out prompts per row")
    max_new_tokens: int = option(64, "tokens generated per prompt")
    max_block: int = option(20, "sprinter: call the target after this many drafted tokens")
    tolerance: float = option(0.01, "the budget holds when the interval's upper end is <= F + this")
    seed: int = option(0, "seed of the sampling (prompt i uses seed + i)")

    def __post_init__(self) -> None:
        for name in ("budgets", "temperatures", "variants"):  # frozen: a YAML list becomes a tuple, once, here
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_integers(self, ("num_prompts", "prompt_len", "max_new_tokens", "max_block"))
        check_domains(self.domains)
        check_integers(self, ("threads",), 0)
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
                raise SprinterError(f"budgets: got {b!r}; expected false-accept budgets in (0, 1)")
        for t in self.temperatures:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
                raise SprinterError(f"temperatures: got {t!r}; expected finite numbers >= 0")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise SprinterError(f"variants: got {list(self.variants)}; expected some of {VARIANTS}")
        if not 0 <= self.tolerance < 1:
            raise SprinterError(f"tolerance: got {self.tolerance!r}; expected a number in [0, 1)")
        if (self.draft is None) != (self.target is None):
            raise SprinterError(f"draft/target: got draft={self.draft!r}, target={self.target!r}; expected both or "
                                "neither (neither: PAIR/draft and PAIR/target)")


def parse_budget_config(argv: Sequence[str] | None) -> BudgetConfig:
    return parse_config(BudgetConfig, argv, "Declared vs measured decode-time false-accept rate of a verifier.")


def pooled_row(budget: float, temperature: float, variant: str, stats: Sequence[dict], tolerance: float) -> dict:
    """One table row from the per-prompt DecodeStats.to_dict() of one (budget, temperature, variant)."""
    total = lambda name: sum(s[name] for s in stats)  # noqa: E731
    passed, events, calls = total("passed_unchecked"), total("false_accepts"), total("verifier_calls")
    interval = wilson_interval(events, passed)
    tokens, seconds = total("new_tokens"), total("wall_seconds")
    thresholds = [s["adapted_threshold"] for s in stats if s.get("adapted_threshold") is not None]
    return {"budget": budget, "temperature": temperature, "variant": variant, "prompts": len(stats),
            "passed_unchecked": passed, "false_accepts": round(events, 4),
            "false_accept_rate": events / passed if passed else None,
            "false_accept_lower90": interval[0] if interval else None,
            "false_accept_upper90": interval[1] if interval else None,
            "flag_rate": total("flagged") / calls if calls else None,
            "ms_per_token": 1000 * seconds / tokens if tokens else None,
            "mean_final_threshold": sum(thresholds) / len(thresholds) if thresholds else None,
            # no token passed: nothing was risked, the budget holds trivially
            "holds": interval is None or interval[1] <= budget + tolerance}


def measure(cfg: BudgetConfig) -> dict:
    """Decode every (temperature, budget, variant) row over the held-out prompts; returns the results."""
    from sprinter.bench.protocol import check_window, hardware, load_prompts
    from sprinter.decode.decoder import Decoder
    from sprinter.pairs.build import resolve_pair
    from sprinter.verifier import budget_key

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    draft, target = resolve_pair(cfg.pair, cfg.draft, cfg.target)
    decoder = Decoder.from_pretrained(draft, target, verifier=cfg.verifier, device=cfg.device, dtype=cfg.dtype)
    info = decoder.verifier_info
    for t in cfg.temperatures:
        missing = [b for b in cfg.budgets if float(b) not in info.budgets_at(t)]
        if missing:
            raise SprinterError(f"budgets: got {missing}, which verifier {cfg.verifier!r} was not calibrated for at "
                                f"temperature {t}; expected some of {info.budgets_at(t)}")
    check_window(cfg.prompt_len, cfg.max_new_tokens, decoder.pair.max_length)
    prompts = load_prompts(decoder.tokenizer, dataset=cfg.dataset, split=cfg.split, domains=cfg.domains,
                           num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len)
    cells = [(t, b, v) for t in cfg.temperatures for b in cfg.budgets for v in cfg.variants]
    decoder.generate(list(prompts[0].ids), mode="sprinter", max_new_tokens=8)  # warm-up: allocation, first kernels
    rows = []
    with tqdm(total=len(cells) * len(prompts), unit="generation", desc="budget", disable=not cfg.progress) as bar:
        for temperature, budget, variant in cells:
            sampling = {"temperature": temperature, "top_p": cfg.top_p} if temperature > 0 else {}
            per_prompt, threshold = [], None  # None: the verifier's calibrated threshold for the budget
            for prompt in prompts:
                out = decoder.generate(list(prompt.ids), mode="sprinter", max_new_tokens=cfg.max_new_tokens,
                                       max_block=cfg.max_block, max_false_accept=budget, threshold=threshold,
                                       adapt_threshold=variant == "adapted", seed=cfg.seed + prompt.index, **sampling)
                per_prompt.append(out.stats.to_dict())
                threshold = out.stats.adapted_threshold  # adapted: the next prompt continues the controller's stream
                bar.update()
            kept = budget_key(budget) in info.kept_thresholds.get(budget_key(temperature), {})
            rows.append({**pooled_row(budget, temperature, variant, per_prompt, cfg.tolerance),
                         "calibration": "decode-time" if kept else "collected",
                         "start_threshold": info.threshold_for(budget, temperature)})
    return {"config": to_dict(cfg), "verifier": {"path": cfg.verifier, "label_rule": info.label_rule,
                                                 "context_source": info.context_source,
                                                 "thresholds": dict(info.thresholds),
                                                 "kept_thresholds": dict(info.kept_thresholds),
                                                 "kept_calibration": dict(info.kept_calibration)},
            "prompts": len(prompts), "cpu": hardware(decoder.pair.device, decoder.pair.dtype)["cpu"],
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}


def markdown(results: dict) -> str:
    """results.md: one row per (temperature, budget, variant)."""
    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    cfg = results["config"]
    lines = [f"# Decode-time false-accept budget: {cfg['pair']} + {cfg['verifier']} "
             f"(label {results['verifier']['label_rule']})", "",
             f"{results['prompts']} held-out prompts ({cfg['split']} split), {cfg['max_new_tokens']} new tokens each, "
             f"max_block {cfg['max_block']}; top-p {cfg['top_p']} at T > 0; {results['cpu']}, "
             f"torch {results['torch']}, "
             f"{cfg['threads']} thread(s). Holds: the 90% interval's upper end <= F + {cfg['tolerance']}.", "",
             "| T | F | calibrated on (threshold) | variant | passed | measured FA | 90% interval | flag rate | "
             "ms/token | holds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['temperature']} | {r['budget']} | {r.get('calibration', 'collected')} rows "
                     f"({num(r.get('start_threshold'))}) | {r['variant']} | {r['passed_unchecked']} | "
                     f"{num(r['false_accept_rate'])} | [{num(r['false_accept_lower90'])}, "
                     f"{num(r['false_accept_upper90'])}] | {num(r['flag_rate'])} | {num(r['ms_per_token'], 2)} | "
                     f"{'yes' if r['holds'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def run(cfg: BudgetConfig) -> dict:
    """measure, then write OUT/results.json and OUT/results.md atomically (OUT locked throughout)."""
    out = Path(cfg.out)
    with FolderLock(out, "budget"):
        results = measure(cfg)
        write_json(out / "results.json", results)
        write_atomic(out / "results.md", markdown(results))
    return results


__all__ = ["BudgetConfig", "markdown", "measure", "parse_budget_config", "pooled_row", "run"]
