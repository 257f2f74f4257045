"""Training a pair's models (sprinter.pairs.build): the tokenizer and the windows of text they train on, the AdamW
loop and its schedule, the language-model and distillation losses, and the held-out figures written to pair.json
(losses, greedy agreement, decode-step ms).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sprinter.corpus import Document
from sprinter.errors import SprinterError
from sprinter.pairs.load import run_with_cache
from sprinter.schedule import warmup_cosine

EOS = "<|endoftext|>"  # the pairs' end of text, also their BOS and padding


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


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Schedule:
    """How one model of a pair trains: `steps` AdamW steps at a peak learning rate `lr`, warmup over the first
    `warmup_fraction` of them, or fewer once `max_seconds` (> 0) have passed."""

    steps: int
    lr: float
    warmup_fraction: float
    max_seconds: float = 0.0


def train_loop(model, schedule: Schedule, batch_fn, loss_fn, desc: str, *, autocast: bool = False
               ) -> tuple[float, int]:
    """A plain AdamW loop with a progress bar; returns (seconds spent, steps run). It stops after the schedule's
    steps, or once its `max_seconds` (> 0) have passed; `autocast`: bfloat16 autocast on CUDA (weights stay
    float32)."""
    steps, peak_lr, warmup_fraction, max_seconds = schedule.steps, schedule.lr, schedule.warmup_fraction, \
        schedule.max_seconds
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
            # warmup (at least one step), then cosine decay to a tenth of the peak, on the clock when it runs ahead
            group["lr"] = warmup_cosine(step, steps, warmup_fraction, peak=peak_lr, floor=0.1, min_warmup=1,
                                        clock=elapsed / max_seconds if max_seconds else 0.0)
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


__all__ = ["Schedule", "decode_step_ms", "distill_loss", "evaluate", "fixed_windows", "lm_loss", "random_windows",
           "take_chars", "token_stream", "train_loop", "train_tokenizer"]
