"""How the single-prompt loops run their models: which KV cache, and whether the steps are compiled.

On a CPU a Hugging Face eager forward costs ~0.7 ms per layer whatever the width, so a small draft's step
is mostly Python and dispatch overhead. Two ideas from gpt-fast remove most of it:
- a static KV cache (sprinter.decode.cache: preallocated, written by position, a rollback moves a length),
  whose fixed shapes let
- `torch.compile` turn each short forward into one graph (on CUDA with CUDA graphs: mode "reduce-overhead").
The draft's step (one token) is one graph; the target's verify forward over a block of n + 1 tokens is padded
to the next bucket of BUCKETS, so a run compiles a bounded number of graphs. The prefill stays eager.

`Engine` owns the static caches (reused across generations, so the compiled graphs keep their inputs) and
the compiled forwards of one Decoder, and the seconds spent compiling them. The eager dynamic-cache path
stays the reference: every way of running must give the same tokens at temperature 0 in float32.
"""

from __future__ import annotations

import shutil
import sys
import time

import torch

from sprinter.decode.cache import CachedLM, last_states, static_cache, static_capacity
from sprinter.pairs.load import run_with_cache

BUCKETS = (1, 2, 4, 8, 16, 32)  # token counts a compiled forward is traced for; longer appends run eagerly
CAPACITY_STEP = 64  # static caches are allocated in multiples of this (fewer shapes, so fewer recompiles)


def compiler_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot work here (None when it can): dynamo on this Python, and inductor's
    backend for the device (a C++ compiler on CPU, Triton on CUDA)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} in torch {torch.__version__}"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) on PATH for inductor's CPU backend"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (inductor's CUDA backend)"
    return None


class CompiledForward:
    """One model's forward, compiled, over a static cache: a graph per bucket of appended tokens (and whether the
    hidden state is read). Remembers how long each graph took to compile."""

    def __init__(self, model: torch.nn.Module, mode: str | None):
        self.model = model
        self.window = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions",
                                                                                        None)

        def forward(ids: torch.Tensor, cache, hidden: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            out = run_with_cache(model, cache, input_ids=ids, output_hidden_states=bool(hidden))
            return out.logits[0], last_states(out.hidden_states, hidden, 0)  # (T, V), (T, hidden, H) | None

        self.forward = torch.compile(forward, mode=mode, dynamic=False)
        self.compiled: set[tuple[int, bool]] = set()
        self.compile_seconds = 0.0

    @staticmethod
    def bucket(new: int) -> int:
        return next(b for b in BUCKETS if b >= new)

    def fits(self, past: int, new: int, capacity: int) -> bool:
        """Whether `new` tokens after `past` cached ones can go through a graph: a bucket holds them, and the
        padding stays inside the cache and the model's positions."""
        if new > BUCKETS[-1]:
            return False
        end = past + self.bucket(new)
        return end <= capacity and (self.window is None or end <= self.window)

    def __call__(self, ids: torch.Tensor, cache, hidden: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (and the last `hidden` layers' states) of every position of `ids` (1, T) padded to its bucket.
        # -> (bucket, V), (bucket, hidden, H) | None. The caller moves the cache's length back over the padding."""
        size = self.bucket(ids.shape[1])
        # Padding goes after the real tokens: causal attention keeps it from them, so any id will do.
        padded = torch.nn.functional.pad(ids, (0, size - ids.shape[1]))
        hidden = int(hidden)
        key = (size, hidden)
        # dynamo counts graphs per code object, and every model's step shares this one: allow all the buckets
        # of two models (with and without the hidden state) before it would fall back to eager
        with torch._dynamo.config.patch(recompile_limit=4 * len(BUCKETS) + 8):
            if key in self.compiled:
                return self.forward(padded, cache, hidden)
            start = time.perf_counter()
            out = self.forward(padded, cache, hidden)  # the first call traces and compiles
        if padded.device.type == "cuda":
            torch.cuda.synchronize(padded.device)
        self.compile_seconds += time.perf_counter() - start
        self.compiled.add(key)
        return out


class Engine:
    """The caches and compiled steps of one Decoder's single-prompt loops.

    static: decode with static KV caches (else dynamic ones, the reference). compile: torch.compile the short
    forwards (needs the static cache; skipped, with one message, where the platform has no working compiler)."""

    def __init__(self, device: torch.device, static: bool = False, compile: bool = False):
        self.device = device
        self.compile = compile
        if compile:
            problem = compiler_problem(device)
            if problem is not None:
                print(f"note: compile=True skipped: {problem}; decoding eagerly", file=sys.stderr)
                self.compile = False
        self.static = static or self.compile
        # CUDA graphs replay a step without launching its kernels one by one; on CPU there is nothing to replay
        self.mode = "reduce-overhead" if device.type == "cuda" else None
        self.caches: dict[int, object] = {}  # id(model) -> its StaticCache
        self.steps: dict[int, CompiledForward] = {}  # id(model) -> its compiled forward
        self.reported = 0.0  # compile seconds already reported

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far (each graph is compiled once per Decoder)."""
        return sum(step.compile_seconds for step in self.steps.values())

    def lm(self, model: torch.nn.Module, vocab_size: int, capacity: int, compiled: bool = True) -> CachedLM:
        """A CachedLM for one generation that may hold `capacity` tokens (the prompt, the budget and the longest
        block); `compiled=False` keeps this one eager (a loop that runs it from another thread)."""
        if not self.static:
            return CachedLM(model, vocab_size)
        key = id(model)
        needed = capacity + (BUCKETS[-1] if self.compile else 0)  # room for a bucket's padding
        cache = self.caches.get(key)
        if cache is None or static_capacity(cache) < needed:
            cache = static_cache(model, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
            self.caches[key] = cache
        else:
            cache.reset()
        step = None
        if self.compile and compiled:
            step = self.steps.setdefault(key, CompiledForward(model, self.mode))
        return CachedLM(model, vocab_size, cache, step)

    def warm(self, model: torch.nn.Module, vocab_size: int, capacity: int, hidden: int = 0) -> float:
        """Compile every bucket's graph of `model` now, for generations of this `capacity` (so none is compiled
        while a benchmark times them). Returns the seconds it took (0 when not compiling)."""
        if not self.compile:
            return 0.0
        lm = self.lm(model, vocab_size, capacity)
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        lm.append(ids)  # eager: a step needs a cached token before it
        for size in BUCKETS:
            for with_hidden in {0, int(hidden)}:
                lm.append(ids.expand(1, size), hidden=with_hidden)
                lm.rollback(size)
        return self.report()

    def report(self) -> float:
        """Compile seconds since the last report (0 once every graph in use is compiled)."""
        new = self.compile_seconds - self.reported
        self.reported = self.compile_seconds
        return new


__all__ = ["BUCKETS", "CompiledForward", "Engine", "compiler_problem"]
