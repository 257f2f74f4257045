"""Generate text with a draft/target pair in any mode; streams tokens as they are decided.

    python scripts/generate.py                                   # demo pair, mode sprinter, demo verifier
    python scripts/generate.py --compare                         # ar beside sprinter: texts, speeds, speedup
    python scripts/generate.py --prompt "def add(a, b):" --mode sd --k 4
    python scripts/generate.py --mode sprinter --gate confidence --threshold 0.4 --json
    python scripts/generate.py --mode sd-gated --gate confidence --stop-threshold 0.6
    python scripts/generate.py --mode ngram --prompts-file prompts.txt    # one batch: one prompt per line
    python scripts/generate.py --mode sd --prompts-file prompts.jsonl --max-batch 8 --json  # JSON strings per line
    python scripts/generate.py --mode async --window 4 --threads 1      # the draft runs ahead in its own thread
    python scripts/generate.py --mode auto                              # the fastest lossless mode, re-chosen per round
    python scripts/generate.py --mode auto --max-false-accept 0.05      # sprinter at that budget a candidate too

Options and defaults: sprinter.decode.decoder.GenerateConfig, which extends the library's DecodeOptions
(sprinter.decode.options) with the command line's own (or --help).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from sprinter.bench.compare import Comparison, compare
from sprinter.config import parse_config, to_dict
from sprinter.decode.decoder import NO_VERIFIER, Decoder
from sprinter.decode.options import DEMO_VERIFIER, GATED_MODES, GenerateConfig
from sprinter.errors import SprinterError, run_cli
from sprinter.files import read_json, read_text
from sprinter.pairs.build import resolve_pair
from sprinter.pairs.load import resolve_device, resolve_dtype


def pair_paths(cfg: GenerateConfig) -> tuple[str, str]:
    """(draft, target): --draft/--target, else PAIR/draft and PAIR/target (a preset pair is built if missing)."""
    return resolve_pair(cfg.pair, cfg.draft, cfg.target)


def verifier_path(cfg: GenerateConfig) -> str | None:
    """--verifier, else the demo verifier when it exists; none when the mode or gate does not use one. Mode auto
    uses one when given (sd-gated, and sprinter with --max-false-accept, become candidates), and the demo
    verifier only on the demo pair: it needs none, so a verifier trained for another draft must not stop it."""
    if cfg.mode == "auto" and cfg.verifier is None and (cfg.pair != "demo" or cfg.draft is not None):
        return None
    if cfg.mode != "auto" and (cfg.mode not in GATED_MODES or cfg.gate not in (None, "learned")):
        return None
    if cfg.verifier is not None:
        return cfg.verifier
    return DEMO_VERIFIER if Path(DEMO_VERIFIER).exists() else None


def demo_note(draft: str) -> str | None:
    """One line saying what the demo pair is, when `draft` is the demo pair's (its pair.json says preset demo)."""
    meta_path = Path(draft).parent / "pair.json"
    meta = read_json(meta_path, "pair.json") if meta_path.is_file() else {}
    if not isinstance(meta, dict) or meta.get("preset") != "demo":
        return None
    minutes = meta.get("training_seconds", {}).get("total", 0) / 60
    return (f"[demo pair] a toy: a {meta.get('target_params', 0) / 1e6:.1f}M-parameter target and a "
            f"{meta.get('draft_params', 0) / 1e6:.1f}M draft trained here for {minutes:.0f} minutes on the Python "
            f"standard library (held-out loss {meta.get('target_val_loss', float('nan')):.2f} nats/token). Its greedy "
            "text loops, which flatters drafting; --temperature 0.8 --top-p 0.95 is closer to real use, and the "
            "README's 'A real pair next' runs a Hugging Face pair.")


def print_comparison(result: Comparison) -> None:
    """Both texts, then both speeds, the speedup and the identity check (lossless) or the distance (lossy)."""
    mode, ar, fast = result.accelerated.stats.mode, result.ar, result.accelerated
    for name, out in (("ar, the target alone", ar), (mode, fast)):
        print(f"=== {name} ({out.stop_reason}) ===\n{result.prompt}{out.text}")
    print("===")
    width = max(len("ar"), len(mode))
    for name, key, out in (("ar", "ar", ar), (mode, "accelerated", fast)):
        stats = out.stats
        print(f"{name:<{width}}  {stats.new_tokens} tokens in {stats.wall_seconds:.2f} s "
              f"({stats.tokens_per_second:.1f} tokens/s), target calls {stats.target_calls}, "
              f"loop share {result.loop_share[key]:.2f}")
    print(f"speedup: {result.speedup:.2f}x over ar")
    nll = f"target NLL {result.target_nll['accelerated']:.3f} vs ar's {result.target_nll['ar']:.3f} nats/token" + (
        "" if result.nll_ratio is None else f", ratio {result.nll_ratio:.3f}")
    where = "" if result.first_difference is None else f", the first at new token {result.first_difference}"
    differ = f"{result.tokens_differing} of {len(fast.token_ids)} tokens differ{where}"
    if result.lossless and result.temperature == 0:
        why = f"{mode} is lossless: at temperature 0 it must emit ar's very tokens" + (
            "" if result.identical else f"; {differ}: please report")
    elif result.lossless:
        why = f"sampled: {mode} matches ar in distribution, not token for token; {differ}; {nll}"
    else:
        why = f"{mode} is lossy here; {differ}; {nll}"
    print(f"identical to ar's: {'yes' if result.identical else 'no'} ({why})")
    print("(loop share: the share of tokens that complete a 4-gram seen earlier in the same output)")


def read_prompts(path: str) -> list[str]:
    """The prompts of --prompts-file: each non-empty line, or in a .jsonl file each line's JSON string."""
    file = Path(path)
    if not file.is_file():
        raise SprinterError(f"prompts_file: got {path!r}; expected an existing text file, one prompt per line")
    lines = [line for line in read_text(file, "prompts_file").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        prompts = lines
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                prompts.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SprinterError(f"prompts_file {path!r} line {number}: not JSON ({err.msg}); expected one JSON "
                                    "string per line") from None
    bad = [p for p in prompts if not isinstance(p, str) or not p]
    if bad or not prompts:
        raise SprinterError(f"prompts_file {path!r}: got {bad[:1] or 'no prompt'}; expected non-empty prompts, one "
                            "per line")
    return prompts


def print_batch(cfg: GenerateConfig, prompts: list[str], outs: list) -> None:
    """Each prompt and its continuation (or, with --json, one JSON list), then the batch's figures on stderr."""
    if cfg.json:
        print(json.dumps([{"prompt": p, "text": o.text, "token_ids": o.token_ids, "stop_reason": o.stop_reason,
                           "stats": o.stats.to_dict()} for p, o in zip(prompts, outs)], indent=2))
    else:
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            print(f"=== prompt {i} ({out.stop_reason}) ===\n{prompt}{out.text}")
    tokens = sum(o.stats.new_tokens for o in outs)
    seconds = outs[0].stats.wall_seconds
    accepted, calls = sum(o.stats.accepted for o in outs), sum(o.stats.target_calls for o in outs)
    print(f"[{cfg.mode}, batch of {len(prompts)}] {tokens} tokens in {seconds:.2f} s "
          f"({tokens / seconds:.1f} tokens/s); "
          f"drafted {sum(o.stats.drafted for o in outs)}, accepted {accepted}, mean acceptance length "
          f"{1 + accepted / calls:.2f}", file=sys.stderr)


def check_one_prompt_source(argv: Sequence[str]) -> None:
    """--prompt and --prompts-file conflict in every mode: refused first, before any mode's own rule speaks."""
    given = {}
    for i, arg in enumerate(argv):
        for flag in ("--prompt", "--prompts-file"):
            if arg == flag:
                given[flag] = argv[i + 1] if i + 1 < len(argv) else ""
            elif arg.startswith(flag + "="):
                given[flag] = arg[len(flag) + 1:]
    if len(given) == 2:
        raise SprinterError(f"prompt and prompts_file: got --prompt {given['--prompt']!r} and --prompts-file "
                            f"{given['--prompts-file']!r}; expected one of them (they conflict in every mode)")


def main(argv: Sequence[str] | None = None) -> None:
    check_one_prompt_source(sys.argv[1:] if argv is None else list(argv))
    cfg = parse_config(GenerateConfig, argv, "Generate text with a draft/target pair (modes ar, draft, sd, sprinter, "
                                             "sd-gated, ngram, async, auto; a batch of prompts with --prompts-file).")
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file is not None else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    verifier = verifier_path(cfg)
    if cfg.mode in GATED_MODES and cfg.gate in (None, "learned") and verifier is None:
        raise SprinterError(NO_VERIFIER)  # before building or loading any model
    if cfg.max_false_accept is not None and verifier is None:
        raise SprinterError(f"max_false_accept: got {cfg.max_false_accept!r} and no verifier; expected --verifier DIR "
                            f"(one calibrated for that budget; {DEMO_VERIFIER} is used when it exists)")
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))  # fail on a bad device before building a pair
    draft, target = pair_paths(cfg)
    note = demo_note(draft)
    if note is not None:
        print(note, file=sys.stderr)
    decoder = Decoder.from_pretrained(draft=draft, target=target, verifier=verifier, device=cfg.device, dtype=cfg.dtype,
                                      datastore=cfg.datastore, engine=cfg.engine)
    options = cfg.options()
    if cfg.compare:
        result = compare(decoder, cfg.prompt, options)
        if cfg.json:
            print(json.dumps({**result.to_dict(), "config": to_dict(cfg), "draft": draft, "target": target}, indent=2))
        else:
            print_comparison(result)
        return
    if prompts is not None:
        print_batch(cfg, prompts, decoder.generate(prompts, options))
        return

    echoed: list[str] = []  # the prompt is echoed with the first text, so an error is never glued to it

    def stream(piece: str) -> None:
        if not echoed:
            echoed.append(cfg.prompt)
            print(cfg.prompt, end="")
        print(piece, end="", flush=True)

    out = decoder.generate(cfg.prompt, options, on_text=None if cfg.json else stream)
    stats = out.stats.to_dict()
    if cfg.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "stop_reason": out.stop_reason,
                          "stats": stats, "config": to_dict(cfg), "draft": draft, "target": target}, indent=2))
        return
    if not echoed:
        print(cfg.prompt, end="")
    mal = stats["mean_acceptance_length"]
    print(f"\n[{cfg.mode}] {stats['new_tokens']} tokens in {stats['wall_seconds']:.2f} s "
          f"({stats['tokens_per_second']:.1f} tokens/s), stop: {out.stop_reason}; "
          f"target calls {stats['target_calls']}, "
          f"drafted {stats['drafted']}, accepted {stats['accepted']}, flagged {stats['flagged']}, "
          f"mean acceptance length {'-' if mal is None else f'{mal:.2f}'}", file=sys.stderr)
    if cfg.mode == "auto":
        print(f"[auto] tokens per mode: {stats['modes']}", file=sys.stderr)
    if stats["compile_seconds"]:
        print(f"[compile] {stats['compile_seconds']:.1f} s of that compiling graphs (once per run)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main, interrupted="stopped; generate writes no files, so there is nothing to resume"))
