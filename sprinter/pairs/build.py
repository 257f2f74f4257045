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
4. Held-out figures in `pair.json`: validation losses, greedy agreement, decode-step latencies.
The pair is written to a temporary folder and renamed into place, so an interrupted build never
leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sprinter.config import CONFIGS, check_integers, option, parse_config, to_dict
from sprinter.corpus import Document, load_documents
from sprinter.errors import SprinterError
from sprinter.pairs.load import check_same_vocabulary, resolve_device, run_with_cache

CONFIG_DIR = CONFIGS
EOS = "<|endoftext|>"
ARCHS = ("gpt2", "llama")
PRECISIONS = ("auto", "float32", "bfloat16")
# The head sizes vLLM's CPU attention takes (vllm/v1/attention/backends/cpu_attn.py, vLLM 0.32): vLLM on a CPU refuses
# a model with any other (docs/vllm.md). A build says so, and how to choose one, before it trains.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Options that do not change the pair a build makes.
RUNTIME_OPTIONS = ("overwrite", "device", "threads", "out", "target_from")
# Options that fix the tokenizer and the target (what `target_from` must share).
TARGET_OPTIONS = ("arch", "corpus", "seed", "max_train_chars", "vocab_size", "context_length", "seq_len", "batch_size",
                  "target_layers", "target_width", "target_heads", "target_steps", "lr", "warmup_fraction")


@dataclass
class PairConfig:
    preset: str = option("tiny", "size preset: a YAML under configs/pairs/ (tiny, demo, bench)")
    arch: str = option("gpt2", "transformers architecture of both models: gpt2 or llama")
    corpus: str = option("stdlib", "training text: 'stdlib', a folder, a .jsonl/text file, or a Hub dataset name")
    out: str | None = option(None, "output folder (default: checkpoints/pairs/<preset>)")
    overwrite: bool = option(False, "replace an existing pair in --out")
    seed: int = option(0, "seed for initialisation and batch sampling")
    device: str = option("auto", "cpu, cuda or auto")
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
        if self.precision not in PRECISIONS:
            raise SprinterError(f"precision: got {self.precision!r}; expected one of {PRECISIONS}")
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


# ---------------------------------------------------------------------------------------------- data
def train_tokenizer(docs: list[Document], vocab_size: int):
    """A byte-level BPE tokenizer as a transformers fast tokenizer (EOS doubles as BOS and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, clean_up_tokenization_spaces=False)


def take_chars(docs: list[Document], max_chars: int) -> list[Document]:
    """Documents up to `max_chars`, in an order fixed by a hash of their ids (not alphabetical, so
    one package does not fill the budget)."""
    out, total = [], 0
    for doc in sorted(docs, key=lambda d: hashlib.sha256(d.id.encode()).hexdigest()):
        out.append(doc)
        total += len(doc.text)
        if total >= max_chars:
            break
    return out


def token_stream(tokenizer, docs: list[Document]) -> torch.Tensor:
    """All documents as one stream of ids, EOS between documents."""
    ids: list[int] = []
    for enc in tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + length + 1] for s in starts.tolist()])  # (B, length + 1)


def fixed_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` windows spread evenly over the stream (not just its first documents)."""
    n = (len(stream) - 1) // (length + 1)
    if n < 1:
        raise SprinterError(f"the held-out split has {len(stream)} tokens; expected at least {length + 2}")
    rows = torch.linspace(0, n - 1, min(count, n)).long()
    return stream[: n * (length + 1)].view(n, length + 1)[rows]  # (count, length + 1)


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
    old = json.loads(meta_file.read_text()).get("config", {})
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


def lr_at(step: int, steps: int, peak: float, warmup_fraction: float, clock: float = 0.0) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak. `clock` (the share of a time budget spent, 0
    without one) moves the decay on when it is further along than the step count, so a run cut by its time
    budget still ends at the low learning rate."""
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup and clock < warmup_fraction:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(1, steps - warmup), clock)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_loop(model, steps: int, peak_lr: float, warmup_fraction: float, batch_fn, loss_fn, desc: str, *,
               max_seconds: float = 0.0, autocast: bool = False) -> tuple[float, int]:
    """A plain AdamW loop with a progress bar; returns (seconds spent, steps run). It stops after `steps`,
    or once `max_seconds` (> 0) have passed; `autocast`: bfloat16 autocast on CUDA (weights stay float32)."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start = time.perf_counter()
    # In a log file (not a terminal), a line every 15 s instead of one per step.
    bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15)
    ema, run = None, 0
    for step in bar:
        elapsed = time.perf_counter() - start
        if max_seconds and elapsed >= max_seconds:
            print(f"{desc}: time budget of {max_seconds:g} s reached after {step} of {steps} steps")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup_fraction, elapsed / max_seconds if max_seconds else 0.0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, batch_fn())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)  # drawn at the bar's own pace (mininterval)
        run = step + 1
    model.eval()
    return time.perf_counter() - start, run


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def distill_loss(target):
    def loss(draft, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p_log = F.log_softmax(target(batch[:, :-1]).logits, -1)
        q_log = F.log_softmax(draft(batch[:, :-1]).logits, -1)
        return F.kl_div(q_log.flatten(0, 1), p_log.flatten(0, 1), log_target=True, reduction="batchmean")

    return loss


@torch.no_grad()
def evaluate(target, draft, windows: torch.Tensor) -> dict[str, float]:
    """Held-out loss of both, and how often the draft's argmax is the target's."""
    t_loss = d_loss = agree = count = 0.0
    for chunk in windows.split(8):
        t_logits, d_logits = target(chunk[:, :-1]).logits, draft(chunk[:, :-1]).logits
        labels = chunk[:, 1:].flatten()
        t_loss += F.cross_entropy(t_logits.flatten(0, 1), labels, reduction="sum").item()
        d_loss += F.cross_entropy(d_logits.flatten(0, 1), labels, reduction="sum").item()
        agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        count += labels.numel()
    return {"target_val_loss": t_loss / count, "draft_val_loss": d_loss / count, "greedy_agreement": agree / count}


@torch.no_grad()
def decode_step_ms(model, context: torch.Tensor, steps: int = 40, repeats: int = 3) -> float:
    """Median milliseconds of one cached one-token decode step at batch 1 (after a prefill)."""
    from transformers import DynamicCache

    times = []
    for _ in range(repeats):
        cache = DynamicCache()
        out = run_with_cache(model, cache, input_ids=context[None])
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = run_with_cache(model, cache, input_ids=token).logits[:, -1:].argmax(-1)
        if token.device.type == "cuda":  # the steps were only queued: wait for them before reading the clock
            torch.cuda.synchronize(token.device)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return sorted(times)[len(times) // 2]


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
    old = json.loads(meta.read_text()).get("config", {})
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
        return json.loads((cfg.out_dir / "pair.json").read_text())
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
        old_meta = json.loads((Path(cfg.target_from) / "pair.json").read_text())
        target_run = old_meta.get("steps_run", {}).get("target", cfg.target_steps)
        for _ in range(target_run):  # draw the target's batches, so the draft sees what a full build shows it
            batch()
        target_seconds = old_meta["training_seconds"]["target"]
    else:
        target = build_model(target_cfg, cfg.seed).to(device)
        target_seconds, target_run = train_loop(target, cfg.target_steps, cfg.lr, cfg.warmup_fraction, batch, lm_loss,
                                                "target", max_seconds=cfg.target_max_seconds, autocast=autocast)

    if cfg.draft_init == "truncate":
        draft = truncated_draft(target, cfg.draft_layers, cfg.seed + 1).to(device)
    else:
        draft_cfg = make_config(cfg.arch, vocab, cfg.draft_layers, cfg.draft_width, cfg.draft_heads,
                                cfg.context_length, tokenizer.eos_token_id)
        draft = build_model(draft_cfg, cfg.seed + 1).to(device)
    target.requires_grad_(False)
    draft_seconds, draft_run = train_loop(draft, cfg.distill_steps, cfg.distill_lr, cfg.warmup_fraction, batch,
                                          distill_loss(target), "draft (distil)", max_seconds=cfg.distill_max_seconds,
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
