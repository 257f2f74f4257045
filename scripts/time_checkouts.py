"""Time a few decode modes on one pair for two or more checkouts, side by side in one run (one thread).

    python scripts/time_checkouts.py /tmp/before . --pair checkpoints/pairs/demo --repeats 5 --rounds 2

Each checkout runs in a subprocess of its own (its `sprinter` first on PYTHONPATH), the checkouts take
turns round by round so machine noise falls on all of them alike, and the medians over every repeat are
printed per mode. The same subprocess also checks that the outputs (greedy token ids, and the data stage's
decode rows at temperature 0 and 0.8) are identical across checkouts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {  # name -> generate() keywords, each spelling a checkout may know, the newest first
    "ar": [{"mode": "ar"}],
    "sd-k4": [{"mode": "sd", "k": 4}],
    "sprinter-confidence": [{"mode": "sprinter", "gate": "confidence", "threshold": 0.4}],
    "sd-gated-confidence": [{"mode": "sd-gated", "gate": "confidence", "stop_threshold": 0.5},
                            {"mode": "sd-gated", "gate": "confidence", "threshold": 0.5}],
    "ngram-k4": [{"mode": "ngram", "ngram_k": 4}, {"mode": "ngram", "s": 4}],
}
PROMPT = "def fibonacci(n):\n    "


def spelled(spellings: list[dict]) -> dict:
    """The first spelling of a mode's keywords that this checkout's DecodeOptions accepts."""
    from sprinter.decode.options import DecodeOptions

    for kwargs in spellings:
        try:
            DecodeOptions(**kwargs)
        except (TypeError, ValueError):  # an unknown name (TypeError), or refused (SprinterError)
            continue
        return kwargs
    raise SystemExit(f"this checkout accepts none of {spellings}")


def worker(pair: str, repeats: int, max_new_tokens: int) -> dict:
    """Runs inside one checkout: seconds per repeat per mode, and digests of what was produced."""
    import torch

    torch.set_num_threads(1)
    from sprinter.data.contexts import decode_rows
    from sprinter.decode.decoder import Decoder

    dec = Decoder.from_pretrained(draft=f"{pair}/draft", target=f"{pair}/target", device="cpu", dtype="float32")
    seconds, digests = {}, {}
    for name, spellings in MODES.items():
        kwargs = spelled(spellings)
        dec.generate(PROMPT, max_new_tokens=max_new_tokens, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = dec.generate(PROMPT, max_new_tokens=max_new_tokens, **kwargs)
            times.append(time.perf_counter() - start)
        seconds[name], digests[name] = times, out.token_ids
    ids = dec.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    prompts = torch.tensor([ids, ids[::-1]])
    for temperature in (0.0, 0.8):
        with torch.inference_mode():
            gen = torch.Generator().manual_seed(0)
            try:  # the signature since the pair is passed whole
                rows, paths = decode_rows(dec.pair, prompts, max_new_tokens=24, k=4, temperature=temperature,
                                          gen=gen, pad_id=0, eos_id=None)
            except TypeError:  # an older checkout: the models and the sizes one by one
                rows, paths = decode_rows(dec.pair.draft, dec.pair.target, prompts, 24, 4, dec.pair.vocab_size,
                                          temperature, gen, 0, None, dec.pair.max_length)
        h = hashlib.sha256(json.dumps(paths).encode())
        for key in sorted(rows):
            h.update(rows[key].cpu().contiguous().numpy().tobytes())
        digests[f"decode_rows T={temperature}"] = h.hexdigest()[:16]
    return {"seconds": seconds, "digests": digests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="*")
    parser.add_argument("--pair", default="checkpoints/pairs/demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.pair, args.repeats, args.max_new_tokens)))
        return
    pair = str(Path(args.pair).resolve())
    results: dict[str, list[dict]] = {c: [] for c in args.checkouts}
    for _ in range(args.rounds):
        for checkout in args.checkouts:
            env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve()), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, __file__, "--worker", "--pair", pair, "--repeats",
                                   str(args.repeats), "--max-new-tokens", str(args.max_new_tokens)],
                                  env=env, capture_output=True, text=True, cwd=checkout)
            if proc.returncode:
                sys.exit(f"{checkout}: the worker failed:\n{proc.stderr[-3000:]}")
            results[checkout].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"median ms per generation of {args.max_new_tokens} tokens, {args.rounds} x {args.repeats} repeats, "
          "1 thread")
    print(f"{'mode':<22}" + "".join(f"{c:>16}" for c in args.checkouts) + "   ratio (last / first)")
    for name in MODES:
        medians = [1000 * statistics.median(t for r in results[c] for t in r["seconds"][name]) for c in args.checkouts]
        print(f"{name:<22}" + "".join(f"{m:16.1f}" for m in medians) + f"   {medians[-1] / medians[0]:.3f}")
    digests = {c: results[c][0]["digests"] for c in args.checkouts}
    first = digests[args.checkouts[0]]
    same = all(d == first for d in digests.values())
    print("outputs identical across checkouts:", same)
    if not same:
        for key in first:
            print(key, [digests[c][key] for c in args.checkouts])


if __name__ == "__main__":
    main()
