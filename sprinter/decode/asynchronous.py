"""mode="async": asynchronous speculative decoding (AMUSD, docs/references.md §3). The draft drafts in a
thread of its own, ahead of the target, while the target (in the caller's thread) verifies what the
draft has published so far.

Protocol. A `Channel` (one lock) is all the two sides share, and only new tokens cross it:
1. The draft drafts the token at position j from its sequence (the verified tokens, then its own
   unverified run-ahead) and publishes Entry(j, token, q). It blocks while `window` of its tokens are
   unverified, after drafting EOS and at the end of the budget.
2. The target takes every entry published since its last verification (at least 1, at most `window`),
   runs one forward over them, keeps the leading ones the speculative-sampling rule accepts
   (sprinter.decode.acceptance) and draws its own token y: from the residual after a rejection, else a bonus
   token. It publishes Verdict(length, y): the verified sequence is now the old one, the kept entries
   and y (`length` tokens, prompt included).
3. The draft applies each verdict. When its own token at position length - 1 is y, its run-ahead was
   drafted from the verified prefix and stays. Otherwise it truncates its sequence and rolls its KV
   cache back to exactly length - 1 tokens, appends y (its next forward reads y) and drafts on. An entry
   drafted from a prefix that a verdict has since overruled is never seen by the target: each verdict
   that empties the channel bumps an epoch, and the draft publishes only under the epoch it drafted in.

Why it is lossless. Every entry the target checks was drawn from the draft's q given exactly the
verified prefix before it, with the draft's own generator; the target's acceptance draws and its own
tokens come from a second generator. Each position is therefore decided by the speculative-sampling
rule on a fresh draw from q (or, when nothing was drafted there, by a draw from p), so it is
distributed as the target's p; at temperature 0 the output is exactly `ar`'s. How many entries a
verification takes depends on timing, not on their values: at temperature > 0 the output has the
target's distribution, but one seed need not always give the same tokens (window=1 does: the draft then
waits for every verdict).

Concurrency: threads, not processes. torch releases the GIL inside every op, so two threads overlap the
two models' forwards on two cores or two devices, with no copies of models or caches between processes
and shutdown is a flag and a join. The draft side runs on its own CUDA stream; the target side runs on
another. Both sides use the caller's torch intra-op thread count: on a 2-core CPU call
torch.set_num_threads(1) first (CLI --threads 1) and the two sides use one core each.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sprinter.decode.acceptance import correction, leading_true, speculative_accept
from sprinter.decode.cache import CachedLM
from sprinter.decode.drafters import Drafter
from sprinter.decode.options import DecodeOptions
from sprinter.decode.sampling import Sampler, uniform

if TYPE_CHECKING:
    from sprinter.decode.emit import Emitter
    from sprinter.decode.loops import LoopState

WAIT_SECONDS = 0.05  # the longest either side sleeps before it looks at the stop flag again
JOIN_SECONDS = 60.0  # the longest the caller waits for the draft thread to finish its current forward
DRAFT_SEED_OFFSET = 0x5DEECE66D  # the draft's generator is seeded apart from the target's (independent draws)


@dataclass(frozen=True)
class Entry:
    """One drafted token, as the draft publishes it."""

    position: int  # its index in the sequence, prompt included
    token: int
    q: torch.Tensor  # (V,) the draft distribution it was drawn from, on the draft's device


@dataclass(frozen=True)
class Verdict:
    """One verification's outcome, as the target publishes it."""

    length: int  # verified tokens, prompt included
    token: int  # the target's own token, at position length - 1


class Channel:
    """The state the two sides share, guarded by `cond`: published entries (draft -> target), verdicts
    (target -> draft), the verified length, and the stop flag and error of either side."""

    def __init__(self, start: int, window: int):
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.window = window
        self.verified = start  # tokens verified so far, prompt included
        self.entries: deque[Entry] = deque()  # published, not yet taken by the target
        self.verdicts: deque[Verdict] = deque()  # published, not yet applied by the draft
        self.next_position = start  # the position of the next entry the channel accepts
        self.epoch = 0  # bumped by each verdict that empties the channel
        self.error: BaseException | None = None  # what stopped the draft side

    def publish_entry(self, entry: Entry, epoch: int) -> bool:
        """Draft side: add an entry unless a verdict overruled the prefix it was drafted from."""
        with self.cond:
            if epoch != self.epoch or self.stop.is_set():
                return False
            if entry.position != self.next_position:
                raise RuntimeError(f"entry at {entry.position}, channel expects {self.next_position}")  # a bug
            self.entries.append(entry)
            self.next_position += 1
            self.cond.notify_all()
            return True

    def publish_verdict(self, verdict: Verdict) -> None:
        """Target side. Entries published since the take stay when the first is at the verdict's last
        position and holds the target's own token (the draft ran ahead from the right prefix); otherwise
        they were drafted from an overruled prefix and are dropped."""
        with self.cond:
            self.verified = verdict.length
            self.verdicts.append(verdict)
            head = self.entries[0] if self.entries else None
            if head is not None and head.position == verdict.length - 1 and head.token == verdict.token:
                self.entries.popleft()
            else:
                self.entries.clear()
                self.next_position = verdict.length
                self.epoch += 1
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.stop.set()
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stop.set()
            self.cond.notify_all()


class DraftSide:
    """The draft's loop (run in its own thread): apply verdicts, draft one token, publish it."""

    def __init__(self, drafter: Drafter, channel: Channel, prompt: list[int], end: int, eos_id: int | None,
                 device: torch.device, seed: int, threads: int):
        self.drafter, self.channel, self.device = drafter, channel, device
        self.ids = list(prompt)  # the draft's sequence: verified tokens, then its unverified run-ahead
        self.start, self.end, self.eos_id, self.threads = len(prompt), end, eos_id, threads
        self.gen = torch.Generator(device=device).manual_seed((seed + DRAFT_SEED_OFFSET) % 2**63)
        self.drafted = 0
        self.busy_seconds = 0.0

    def run(self) -> None:
        try:
            torch.set_num_threads(self.threads)  # this thread's intra-op threads: the caller's count
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            with torch.inference_mode(), _on_stream(stream):  # inference mode is per thread
                self._loop()
        except BaseException as err:  # whatever stops this thread is handed to the caller, which re-raises it
            self.channel.fail(err)

    def _loop(self) -> None:
        ch = self.channel
        while True:
            # 1. Apply the verdicts, then wait for room in the window.
            with ch.cond:
                while True:
                    if ch.stop.is_set():
                        return
                    if ch.verdicts:
                        start = time.perf_counter()
                        while ch.verdicts:
                            self._apply(ch.verdicts.popleft())
                        self._drop_unpublished(ch.next_position)
                        self.busy_seconds += time.perf_counter() - start
                    if self._may_draft():
                        break
                    ch.cond.wait(WAIT_SECONDS)
                epoch = ch.epoch
            # 2. Draft the next token (the lock is free meanwhile: the target can take and verify).
            start = time.perf_counter()
            draft = self.drafter.propose([self.ids], [1], self.gen)
            token = draft.x[0, 0].item()  # the host sync that makes q ready for the target's stream too
            # 3. Publish it; a verdict that arrived meanwhile may have overruled its prefix (then the
            #    next round's _apply rolls it back).
            ch.publish_entry(Entry(len(self.ids), token, draft.q[0, 0]), epoch)
            self.ids.append(token)
            self.drafted += 1
            self.busy_seconds += time.perf_counter() - start

    def _may_draft(self) -> bool:
        n = len(self.ids)
        after_eos = n > self.start and self.ids[-1] == self.eos_id
        return n < self.end and n - self.channel.verified < self.channel.window and not after_eos

    def _apply(self, verdict: Verdict) -> None:
        """Make the sequence agree with a verdict; the cache keeps exactly the tokens that still agree."""
        ids, last = self.ids, verdict.length - 1
        if len(ids) < last:
            raise RuntimeError(f"verdict of length {verdict.length} on a draft of {len(ids)} tokens")  # a bug
        if len(ids) > last and ids[last] == verdict.token:
            return  # the target's token is the draft's own: the run-ahead stays
        del ids[last:]
        self.drafter.keep([0], [last])
        ids.append(verdict.token)

    def _drop_unpublished(self, next_position: int) -> None:
        """Tokens past what the channel holds were drafted under an older epoch: drafted again from here."""
        if len(self.ids) > next_position:
            del self.ids[next_position:]
            self.drafter.keep([0], [next_position - 1])  # the next forward reads the last kept token


def asynchronous(target: CachedLM, drafter: Drafter, tokens: torch.Tensor, *, options: DecodeOptions,
                 state: LoopState, draft_device: torch.device) -> None:
    """Decode with the draft in a thread of its own until the budget, EOS or a stop string; the target
    verifies in the caller's thread. tokens: (1, T) the prompt, on the target's device. `options` gives the
    seed (the draft thread's generator is seeded from it) and the window; `state.gen` is on the target's device.

    Shutdown: whatever ends the generation (done, an error on either side, KeyboardInterrupt) sets the
    stop flag and joins the draft thread before returning; an error raised in the draft thread is
    re-raised here, as itself (type and traceback kept)."""
    prompt, seed, sampler, gen, out = tokens[0].tolist(), int(options.seed), state.sampler, state.gen, state.out
    channel = Channel(len(prompt), options.async_window)
    draft = DraftSide(drafter, channel, prompt, len(prompt) + out.remaining, out.eos_id, draft_device, seed,
                      torch.get_num_threads())
    for device in {tokens.device, draft_device}:  # weights and prompt are ready before other streams read them
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    thread = threading.Thread(target=draft.run, name="sprinter-draft", daemon=True)
    thread.start()
    try:
        stream = torch.cuda.Stream(tokens.device) if tokens.device.type == "cuda" else None
        with _on_stream(stream):
            checked, accepted, busy = verify(target, channel, thread, tokens, sampler, gen, out)
    finally:
        channel.close()
        thread.join(JOIN_SECONDS)
        if thread.is_alive():
            raise RuntimeError(f"the draft thread did not stop within {JOIN_SECONDS} s")
    if channel.error is not None:  # the draft failed after the target had finished
        raise channel.error
    stats = state.stats
    stats.drafted, stats.accepted, stats.rejected = draft.drafted, accepted, draft.drafted - accepted
    stats.discarded = draft.drafted - checked
    stats.draft_busy_seconds, stats.target_busy_seconds = draft.busy_seconds, busy


def verify(target: CachedLM, channel: Channel, thread: threading.Thread, tokens: torch.Tensor, sampler: Sampler,
           gen: torch.Generator, out: Emitter) -> tuple[int, int, float]:
    """The target's loop; returns (entries checked, entries accepted, busy seconds). tokens: (1, T).
    The target's cache covers every verified token but the last, as in `speculative`."""
    checked = accepted = 0
    start = time.perf_counter()
    # 0. Read the prompt but its last token while the draft reads it and drafts its first token.
    if tokens.shape[1] > 1:
        target.append(tokens[:, :-1])
    busy = time.perf_counter() - start
    while not out.done:
        # 1. Take every entry published since the last verification (at least one).
        with channel.cond:
            while not channel.entries:
                if channel.error is not None:
                    raise channel.error
                if not thread.is_alive():
                    raise RuntimeError("the draft thread ended without an error")  # a bug
                channel.cond.wait(WAIT_SECONDS)
            taken = [channel.entries.popleft() for _ in range(min(len(channel.entries), out.remaining))]
        start = time.perf_counter()
        n = len(taken)
        if taken[0].position != tokens.shape[1]:
            raise RuntimeError(f"took an entry at {taken[0].position}; {tokens.shape[1]} tokens are verified")  # a bug
        x = torch.tensor([e.token for e in taken], device=tokens.device)  # (n,)
        q = torch.stack([e.q.to(tokens.device) for e in taken])  # (n, V)
        seq = torch.cat([tokens, x.view(1, n)], 1)
        # 2. One target forward over what it has not read: the last verified token and the entries.
        logits, _ = target.append(seq[:, target.length:], logits=n + 1)
        p = sampler.probs(logits)  # (n + 1, V)
        # 3. Keep the leading entries the speculative-sampling rule accepts; the target's own token y
        #    comes from the residual after a rejection, else it is a bonus token from p[n].
        positions = torch.arange(n, device=x.device)
        n_kept = leading_true(speculative_accept(p[positions, x], q[positions, x], uniform(n, gen, x.device)))
        y = sampler.draw(correction(p, q, n_kept), gen)
        kept, y = torch.stack([n_kept, y]).tolist()  # the one host sync of this round
        # 4. Publish the verdict first (the draft rolls back while the target emits), then emit.
        tokens = torch.cat([tokens, x[None, :kept], torch.tensor([[y]], device=x.device)], 1)
        target.rollback_to(tokens.shape[1] - 1)
        channel.publish_verdict(Verdict(tokens.shape[1], y))
        checked += n
        accepted += kept
        out.emit([e.token for e in taken[:kept]] + [y])
        busy += time.perf_counter() - start
    return checked, accepted, busy


def _on_stream(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


__all__ = ["Channel", "DraftSide", "Entry", "Verdict", "asynchronous"]
