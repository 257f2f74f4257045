"""The offline pair builder: a byte-level BPE tokenizer, a target and a draft causal LM, trained here.

No machine of this project can download models, so the pipeline is exercised on pairs it makes
itself. The recipe, and why (measured on 2 CPU cores; see docs/pairs.md):
1. A byte-level BPE tokenizer (`tokenizers`) on the train split; a small vocabulary (2k-4k) keeps
   the output layer cheap, which is most of a small model's cost.
2. The target: a transformers GPT-2 or Llama, trained with AdamW, a high peak learning rate, warmup
   and cosine decay, on random windows of the train split.
3. The draft, two ways (`draft_init`): `truncate` keeps the trained target's embeddings, first
   `draft_layers` blocks and final norm, then distils briefly on the target's outputs: a weaker model
   that agrees with the target often, for the price of a minute (training both from scratch in this
   budget gave a target no better than its draft). `scratch` builds a narrower model (cheaper per
   step: the `bench` pair needs a >= 6x decode-step gap) and distils it from the target.
   (The training loop, the losses and the figures: sprinter.pairs.train.)
4. Held-out figures in `pair.json`: validation losses, greedy agreement, decode-step latencies.
The pair is written to a temporary folder and renamed into place, so an interrupted build never
leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sprinter.config import (
    CONFIGS,
    DeviceConfig,
    SeedConfig,
    ThreadsConfig,
    check_integers,
    option,
    parse_config,
    to_dict,
)
from sprinter.corpus import load_documents
from sprinter.errors import SprinterError
from sprinter.files import read_json
from sprinter.pairs.load import check_same_vocabulary, resolve_device
from sprinter.pairs.train import (
    Schedule,
    decode_step_ms,
    distill_loss,
    evaluate,
    fixed_windows,
    lm_loss,
    random_windows,
    take_chars,
    token_stream,
    train_loop,
    train_tokenizer,
)

CONFIG_DIR = CONFIGS
ARCHS = ("gpt2", "llama")
PAIR_PRECISIONS = ("auto", "float32", "bfloat16")
# The head sizes vLLM's CPU attention takes (vllm/v1/attention/backends/cpu_attn.py, vLLM 0.32): vLLM on a CPU refuses
# a model with any other (docs/vllm.md). A build says so, and how to choose one, before it trains.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Options that do not change the pair a build makes.
RUNTIME_OPTIONS = ("overwrite", "device", "threads", "out", "target_from")
# Options that fix the tokenizer and the target (what `target_from` must share).
TARGET_OPTIONS = ("arch", "corpus", "seed", "max_train_chars", "vocab_size", "context_length", "seq_len", "batch_size",
                  "target_layers", "target_width", "target_heads", "target_steps", "lr", "warmup_fraction")


@dataclass(frozen=True)
class PairConfig(DeviceConfig, ThreadsConfig, SeedConfig):
    preset: str = option("tiny", "size preset: a YAML under configs/pairs/ (tiny, demo, bench)")
    arch: str = option("gpt2", "transformers architecture of both models: gpt2 or llama")
    corpus: str = option("stdlib", "training text: 'stdlib', a folder, a .jsonl/text file, or a Hub dataset name")
    out: str | None = option(None, "output folder (default: checkpoints/pairs/<preset>)")
    overwrite: bool = option(False, "replace an existing pair in --out")
    seed: int = option(0, "seed for initialisation and batch sampling")
    max_train_chars: int = option(2_000_000, "characters of the train split to tokenize (tokenizer and model)")
    vocab_size: int = option(1024, "BPE vocabulary size")
    context_length: int = option(512, "models' context window (positions)")
    seq_len: int = option(64, "training window in tokens")
    batch_size: int = option(16, "windows per optimizer step")
    target_layers: int = option(2, "target blocks")
    target_width: int = option(64, "target hidden size")
    target_heads: int = option(2, "target attention heads")
    target_steps: int = option(60, "target optimizer steps")
    target_max_seconds: float = option(0.0, "stop the target's training after this many seconds (0: no limit); the "
                                            "learning rate then decays by the clock as well as by the step count")
    lr: float = option(3e-3, "peak learning rate (target)")
    warmup_fraction: float = option(0.05, "fraction of steps with linear warmup")
    draft_init: str = option("truncate", "truncate (target's first blocks) or scratch (a narrower model)")
    draft_layers: int = option(1, "draft blocks")
    draft_width: int = option(64, "draft hidden size (scratch only; truncate keeps the target's)")
    draft_heads: int = option(2, "draft attention heads (scratch only)")
    distill_steps: int = option(30, "draft distillation steps on the target's outputs")
    distill_lr: float = option(2e-3, "peak learning rate (draft distillation)")
    distill_max_seconds: float = option(0.0, "stop the draft's distillation after this many seconds (0: no limit)")
    precision: str = option("auto", "training precision: float32, bfloat16 (autocast; CUDA only) or auto: bfloat16 "
                                    "on CUDA, float32 on CPU (the saved weights are float32 either way)")
    eval_windows: int = option(32, "held-out windows for validation loss and greedy agreement")
    threads: int = option(0, "CPU threads for torch (0: all cores)")
    target_from: str | None = option(None, "reuse the trained target and tokenizer of this pair folder (built with the "
                                           "same target options) and train only the draft")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SprinterError(f"arch: got {self.arch!r}; expected one of {ARCHS}")
        if self.draft_init not in ("truncate", "scratch"):
            raise SprinterError(f"draft_init: got {self.draft_init!r}; expected 'truncate' or 'scratch'")
        if self.draft_init == "truncate" and not 1 <= self.draft_layers < self.target_layers:
            raise SprinterError(f"draft_layers: got {self.draft_layers}; expected 1..{self.target_layers - 1} "
                                "(fewer blocks than the target) with draft_init=truncate")
        check_integers(self, ("vocab_size", "seq_len", "batch_size", "target_layers", "target_width", "target_heads",
                              "target_steps", "draft_layers", "draft_width", "draft_heads", "eval_windows",
                              "max_train_chars"))
        if self.target_width % self.target_heads or self.draft_width % self.draft_heads:
            raise SprinterError("width must be a multiple of heads: got target "
                                f"{self.target_width}/{self.target_heads}, draft {self.draft_width}/{self.draft_heads}")
        if self.seq_len + 1 > self.context_length:
            raise SprinterError(f"seq_len: got {self.seq_len}; expected below context_length={self.context_length}")
        for name in ("target_max_seconds", "distill_max_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise SprinterError(f"{name}: got {value!r}; expected a number of seconds >= 0 (0: no limit)")
        if self.precision not in PAIR_PRECISIONS:
            raise SprinterError(f"precision: got {self.precision!r}; expected one of {PAIR_PRECISIONS}")
        if self.vocab_size < 260:
            raise SprinterError(f"vocab_size: got {self.vocab_size}; expected at least 260 (256 bytes + specials)")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("checkpoints/pairs") / self.preset


def vllm_cpu_note(cfg: PairConfig) -> str | None:
    """A one-paragraph note when a model of this pair has a head size vLLM's CPU attention refuses; None when both
    are served there (with the sprinter proposer only the target runs in vLLM; vLLM's own draft_model method runs
    the draft there too)."""
    shapes = {"target": (cfg.target_width, cfg.target_heads)}
    if cfg.draft_init == "scratch":
        shapes["draft"] = (cfg.draft_width, cfg.draft_heads)
    bad = {role: (w, h) for role, (w, h) in shapes.items() if w // h not in VLLM_CPU_HEAD_SIZES}
    if not bad:
        return None
    width, heads = bad.get("target", shapes["target"])
    fit = -(-width // 32) * 32  # the nearest width >= this one with a head size of 32
    return ("note: " + ", ".join(f"the {role}'s head size is {w // h} ({w} wide / {h} heads)" for role, (w, h)
                                 in bad.items())
            + f"; vLLM's CPU attention takes only {list(VLLM_CPU_HEAD_SIZES)}, so vLLM on a CPU will refuse this pair "
            f"(sprinter's own decoding is unaffected). For one it takes: --target-width {fit} --target-heads "
            f"{fit // 32} (head size 32; docs/vllm.md)")


def presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "pairs").glob("*.yaml"))


def parse_pair_config(argv: Sequence[str] | None) -> PairConfig:
    """`--preset NAME` picks configs/pairs/NAME.yaml as the base; other flags override it."""
    args = list(sys.argv[1:] if argv is None else argv)
    preset = "tiny"
    for i, a in enumerate(args):
        if a == "--preset" and i + 1 < len(args):
            preset = args[i + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    if preset not in presets():
        raise SprinterError(f"preset: got {preset!r}; expected one of {presets()}")
    return parse_config(PairConfig, args, "Build an offline draft/target pair.",
                        CONFIG_DIR / "pairs" / f"{preset}.yaml")


# --------------------------------------------------------------------------------------------- models
def make_config(arch: str, vocab_size: int, layers: int, width: int, heads: int, context_length: int, eos_id: int):
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=context_length, n_embd=width, n_layer=layers, n_head=heads,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
                          tie_word_embeddings=True)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=width,
                       intermediate_size=width * 8 // 3 // 16 * 16 or width * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=context_length, bos_token_id=eos_id, eos_token_id=eos_id,
                       pad_token_id=eos_id, tie_word_embeddings=True)


def reused_tokenizer(cfg: PairConfig):
    """The tokenizer of `cfg.target_from`, after checking that its target was built with the same options."""
    from transformers import AutoTokenizer

    meta_file = Path(cfg.target_from) / "pair.json"
    if not meta_file.is_file():
        raise SprinterError(f"target_from: got {cfg.target_from!r}; expected a pair folder with pair.json")
    old = read_json(meta_file, "pair.json").get("config", {})
    differ = [k for k in TARGET_OPTIONS if old.get(k) != getattr(cfg, k)]
    if differ:
        raise SprinterError(f"target_from {cfg.target_from!r} was built with other target options "
                            f"({', '.join(f'{k}={old.get(k)!r}, not {getattr(cfg, k)!r}' for k in differ)}); "
                            "expected the same, so the pair equals a full build")
    return AutoTokenizer.from_pretrained(Path(cfg.target_from) / "target")


def build_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def truncated_draft(target, layers: int, seed: int):
    """The target's embeddings, first `layers` blocks and final norm, as a model of its own."""
    config = target.config.__class__.from_dict(target.config.to_dict())
    if hasattr(config, "n_layer"):
        config.n_layer = layers
    else:
        config.num_hidden_layers = layers
        config.layer_types = None  # re-derived from num_hidden_layers
    draft = build_model(config, seed)
    missing, unexpected = draft.load_state_dict(target.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"truncated draft is missing weights {missing[:4]}")  # a bug, not bad input
    return draft


# ---------------------------------------------------------------------------------------------- build
def _check_out_dir(cfg: PairConfig) -> bool:
    """True when `out` already holds this very pair (nothing to do); refuses a different one."""
    out = cfg.out_dir
    # An --out below a file, or in a folder this user cannot write, fails now (one line), not after the build.
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out.parent))
    if not out.exists() or not any(out.iterdir()):
        return False
    meta = out / "pair.json"
    if not meta.is_file():  # --overwrite replaces a pair, never a folder of other files
        raise SprinterError(f"out: {str(out)!r} is not empty and holds no pair.json; expected an empty or new folder, "
                            "or a pair folder to --overwrite")
    if cfg.overwrite:
        return False
    old = read_json(meta, "pair.json").get("config", {})
    new = {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_OPTIONS}
    # An option missing from an older pair.json did not exist then: that pair was built with its default.
    defaults = to_dict(PairConfig())
    if all(old.get(k, defaults[k]) == v for k, v in new.items()):
        return True
    raise SprinterError(f"out: {str(out)!r} already holds a different pair (preset {old.get('preset')!r}); "
                        "pass --overwrite to replace it, or choose another --out")


def build_pair(cfg: PairConfig) -> dict:
    """Build and save the pair described by `cfg`; returns the contents of pair.json."""
    if _check_out_dir(cfg):
        print(f"{cfg.out_dir} already holds this pair; nothing to do")
        return read_json(cfg.out_dir / "pair.json", "pair.json")
    # A build's floats depend on the thread count (reduction order): fix it, so a seed fixes the pair.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    try:
        return _build(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _build(cfg: PairConfig) -> dict:
    note = vllm_cpu_note(cfg)
    if note:
        print(note)
    device = resolve_device(cfg.device)
    if cfg.precision == "bfloat16" and device.type != "cuda":
        raise SprinterError(f"precision: got 'bfloat16' on {device}; expected CUDA (or precision float32 / auto)")
    autocast = device.type == "cuda" and cfg.precision != "float32"
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)

    train_docs = take_chars(load_documents(cfg.corpus, "train"), cfg.max_train_chars)
    val_docs = load_documents(cfg.corpus, "val")
    print(f"corpus {cfg.corpus!r}: {len(train_docs)} train documents, {len(val_docs)} held-out documents")
    tokenizer = reused_tokenizer(cfg) if cfg.target_from else train_tokenizer(train_docs, cfg.vocab_size)
    train_stream = token_stream(tokenizer, train_docs)
    val_windows = fixed_windows(token_stream(tokenizer, val_docs), cfg.eval_windows, cfg.seq_len).to(device)
    if len(train_stream) < cfg.seq_len + 2:
        raise SprinterError(f"corpus {cfg.corpus!r}: {len(train_stream)} training tokens; "
                            f"expected more than {cfg.seq_len + 1}")
    vocab = len(tokenizer)

    def batch() -> torch.Tensor:
        return random_windows(train_stream, cfg.batch_size, cfg.seq_len, gen).to(device)

    target_cfg = make_config(cfg.arch, vocab, cfg.target_layers, cfg.target_width, cfg.target_heads,
                             cfg.context_length, tokenizer.eos_token_id)
    if cfg.target_from:
        from transformers import AutoModelForCausalLM

        target = AutoModelForCausalLM.from_pretrained(Path(cfg.target_from) / "target", dtype=torch.float32).to(device)
        old_meta = read_json(Path(cfg.target_from) / "pair.json", "pair.json")
        target_run = old_meta.get("steps_run", {}).get("target", cfg.target_steps)
        for _ in range(target_run):  # draw the target's batches, so the draft sees what a full build shows it
            batch()
        target_seconds = old_meta["training_seconds"]["target"]
    else:
        target = build_model(target_cfg, cfg.seed).to(device)
        schedule = Schedule(cfg.target_steps, cfg.lr, cfg.warmup_fraction, cfg.target_max_seconds)
        target_seconds, target_run = train_loop(target, schedule, batch, lm_loss, "target", autocast=autocast)

    if cfg.draft_init == "truncate":
        draft = truncated_draft(target, cfg.draft_layers, cfg.seed + 1).to(device)
    else:
        draft_cfg = make_config(cfg.arch, vocab, cfg.draft_layers, cfg.draft_width, cfg.draft_heads,
                                cfg.context_length, tokenizer.eos_token_id)
        draft = build_model(draft_cfg, cfg.seed + 1).to(device)
    target.requires_grad_(False)
    schedule = Schedule(cfg.distill_steps, cfg.distill_lr, cfg.warmup_fraction, cfg.distill_max_seconds)
    draft_seconds, draft_run = train_loop(draft, schedule, batch, distill_loss(target), "draft (distil)",
                                          autocast=autocast)
    target.requires_grad_(True)

    figures = evaluate(target, draft, val_windows)
    context = val_windows[0, : cfg.seq_len]
    t_ms, d_ms = decode_step_ms(target, context), decode_step_ms(draft, context)
    meta = {
        "preset": cfg.preset, "arch": cfg.arch, "corpus": cfg.corpus, "target_reused_from": cfg.target_from,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "vocab_size": vocab,
        "head_size": {"target": cfg.target_width // cfg.target_heads, "draft": draft.config.hidden_size
                      // draft.config.num_attention_heads},
        "vllm_cpu": note is None,  # whether vLLM's CPU attention takes the head sizes (VLLM_CPU_HEAD_SIZES)
        "steps_run": {"target": target_run, "draft": draft_run},  # fewer than configured when a time budget cut in
        "precision": "bfloat16-autocast" if autocast else "float32",
        "training_tokens": {"target": target_run * cfg.batch_size * cfg.seq_len,
                            "draft": draft_run * cfg.batch_size * cfg.seq_len},
        "training_seconds": {"target": round(target_seconds, 1), "draft": round(draft_seconds, 1),
                             "total": round(time.perf_counter() - started, 1)},
        **{k: round(v, 4) for k, v in figures.items()},
        "decode_step_ms": {"target": round(t_ms, 3), "draft": round(d_ms, 3), "ratio": round(t_ms / d_ms, 2),
                           "device": str(device), "threads": torch.get_num_threads()},
        "config": {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_OPTIONS},
    }
    save_pair(cfg.out_dir, target, draft, tokenizer, meta)
    return meta


def save_pair(out: Path, target, draft, tokenizer, meta: dict) -> None:
    """Write DIR/target, DIR/draft (each with the tokenizer) and DIR/pair.json; rename into place last."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for role, model in (("target", target), ("draft", draft)):
        model.to("cpu").save_pretrained(tmp / role)
        tokenizer.save_pretrained(tmp / role)
    (tmp / "pair.json").write_text(json.dumps(meta, indent=2) + "\n")
    from transformers import AutoTokenizer

    check_same_vocabulary(AutoTokenizer.from_pretrained(tmp / "draft"), AutoTokenizer.from_pretrained(tmp / "target"),
                          str(out / "draft"), str(out / "target"))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)


def ensure_pair(preset: str = "demo") -> Path:
    """The folder of a preset pair under checkpoints/pairs/, built first (with a note) if missing."""
    out = Path("checkpoints/pairs") / preset
    if not (out / "pair.json").is_file():
        print(f"note: {out} not found; building the {preset!r} pair first "
              f"(python scripts/make_pair.py --preset {preset}; minutes on a CPU, a bar per model shows the time "
              "left)")
        build_pair(parse_pair_config(["--preset", preset]))
    return out


def resolve_pair(pair: str, draft: str | None = None, target: str | None = None) -> tuple[str, str]:
    """(draft, target) paths: the explicit ones, else PAIR/draft and PAIR/target, where PAIR is a pair
    folder or a preset name (a preset pair is built first if missing)."""
    if draft is not None and target is not None:
        return draft, target
    if Path(pair).is_dir():
        folder = Path(pair)
    elif pair in presets():
        folder = ensure_pair(pair)
    else:
        raise SprinterError(f"pair: got {pair!r}; expected a pair folder (with draft/ and target/) or a preset "
                            f"of {presets()}")
    return draft or str(folder / "draft"), target or str(folder / "target")


__all__ = ["PairConfig", "build_pair", "ensure_pair", "parse_pair_config", "presets", "resolve_pair"]
