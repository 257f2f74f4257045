"""How many calibration prompts the benchmark's predictions need, chosen on `val` prompts only.

The benchmark predicts each row's ms/token before timing, from the pair's cost profile and the statistics of
CALIBRATION_PROMPTS prompts of the `val` split that every row decodes first (sprinter.bench.latency). Those
statistics (acceptance by block position, the n-gram rows' counts, the gates' flags) vary from prompt to prompt,
most under greedy decoding, where some outputs fall into a loop that the draft follows and others do not. This
script decodes POOL `val` prompts with every row (as the benchmark's calibration does, same options), prices
the rows with the benchmark run's own profile (results/P-W/results.json, so only the acceptance inputs vary),
and bootstraps: for n prompts drawn with replacement, how far each row's prediction falls from the POOL-prompt
prediction (90th percentile of |relative deviation| over DRAWS draws). The `test` prompts the benchmark times are
not read.

    python results/calibration-count/analyse.py bench greedy     # about 5 minutes a pair and workload
    python results/calibration-count/analyse.py report           # the table over every P-W.json here
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from sprinter.bench.benchmark import calibrate, load_decoder, parse_bench_config
from sprinter.bench.latency import load_verifier_rates, predictions
from sprinter.bench.methods import build_methods, check_verifiers
from sprinter.decode.costs import CostProfile

POOL, DRAWS, SIZES = 24, 300, (4, 8, 12, 16, 24)
METHODS = ["ar", "draft", "sd", "hf-assisted", "ngram", "ngram-8", "sd-gated", "sprinter-strict", "sprinter-mlp",
           "auto"]
HERE = Path(__file__).parent


def decode(pair: str, workload: str) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_bench_config(["--config", f"configs/bench/{pair}.yaml", "--verifier",
                                  f"checkpoints/verifiers/{pair}-kept", "--methods", *METHODS, "--budgets", "0.05",
                                  "--stop-thresholds", "0.3", "0.5", "--workload", workload, "--threads", "1",
                                  "--calibration-prompts", str(POOL), "--out", tmp])
        verifiers = check_verifiers(cfg)
        decoder = load_decoder(cfg, verifiers)
        methods = build_methods(cfg, decoder, verifiers)
        bench = json.loads((HERE.parent / f"{pair}-{workload}" / "results.json").read_text())
        decoder.profile = CostProfile.from_dict(bench["pair"]["cost_profile"])
        runs = calibrate(cfg, decoder, methods)
    rows = {m.name: (m.family, m.operating_point) for m in methods}
    out = {"pair": pair, "workload": workload, "split": cfg.calibration_split, "prompts": POOL, "rows": rows,
           "options": {"prompt_len": cfg.prompt_len, "max_block": cfg.max_block, "temperature": cfg.temperature,
                       "verifiers": verifiers},
           "cost_profile": bench["pair"]["cost_profile"], "runs": runs}
    (HERE / f"{pair}-{workload}.json").write_text(json.dumps(out) + "\n")


def spread(data: dict) -> dict[int, dict[str, float]]:
    """{n: {row: 90th percentile of |prediction from n prompts / prediction from POOL - 1|}}."""
    profile = CostProfile.from_dict(data["cost_profile"])
    rows = {k: tuple(v) for k, v in data["rows"].items()}
    opts = data["options"]
    rates = load_verifier_rates(opts["verifiers"], opts["temperature"])

    def predict(runs):
        return predictions(profile, runs, rows, prompt_len=opts["prompt_len"], max_block=opts["max_block"],
                           rates=rates)[0]

    runs = data["runs"]
    pool = len(next(iter(runs.values())))  # the split may hold fewer than POOL prompts (grounded's val)
    full = predict(runs)
    rng = random.Random(0)
    out = {}
    for n in SIZES:
        devs: dict[str, list[float]] = {k: [] for k, v in full.items() if v}
        for _ in range(DRAWS):
            idx = [rng.randrange(pool) for _ in range(n)]
            pred = predict({k: [v[i] for i in idx] for k, v in runs.items()})
            for k in devs:
                if pred.get(k):
                    devs[k].append(abs(pred[k] / full[k] - 1))
        out[n] = {k: statistics.quantiles(v, n=10)[-1] for k, v in devs.items() if len(v) > 10}
    return out


def report() -> None:
    print("| pair, workload (val prompts) | " + " | ".join(f"n={n}: median row, worst row" for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for path in sorted(HERE.glob("*-*.json")):
        data = json.loads(path.read_text())
        s = spread(data)
        cells = [f"{100 * statistics.median(s[n].values()):.0f}%, {100 * max(s[n].values()):.0f}% "
                 f"({max(s[n], key=s[n].get)})" for n in SIZES]
        pool = len(next(iter(data["runs"].values())))
        print(f"| {data['pair']}, {data['workload']} ({pool}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1:] == ["report"]:
        report()
    else:
        decode(*sys.argv[1:3])
