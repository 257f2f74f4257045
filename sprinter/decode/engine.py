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

import contextlib
import shutil
import sys
import time

import torch

from sprinter.decode.cache import CachedLM, last_states, static_cache, static_capacity
from sprinter.decode.drafters import DraftStep
from sprinter.decode.gates import AlwaysFlag, ConfidenceGate, LearnedGate, NeverFlag
from sprinter.pairs.load import cache_keyword

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


def warm_guards():
    """Only the differentiating guards for warm graphs, where this torch has `set_stance(...,
    skip_guard_eval_unsafe=...)` (2.7 and later; the dependency range admits 2.4): else every guard, as before."""
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):
        return contextlib.nullcontext()


def position_window(model: torch.nn.Module) -> int | None:
    """The most positions `model` takes (None: no limit stated): a graph's padding must stay inside it."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


class Graphs:
    """A compiled function and the graphs it has traced (one per key: the shapes and flags it was called with),
    with the seconds compiling them took. On CUDA the graphs replay as CUDA graphs, whose outputs live in memory the
    next replay overwrites: `run` hands out copies, since the loops keep a block's q and logits across steps."""

    def __init__(self, fn, mode: str | None):
        self.fn = torch.compile(fn, mode=mode, dynamic=False)
        self.cuda_graphs = mode == "reduce-overhead"
        self.compiled: set = set()
        self.compile_seconds = 0.0

    def run(self, key, *args):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if key in self.compiled:
            # a warm graph: dynamo evaluates only the guards that tell this code object's graphs apart (shapes,
            # which model), not every guard over the model, its config and the cache object (about a third of a
            # one-block draft's compiled step on CPU: docs/engine.md)
            with warm_guards():
                out = self.fn(*args)
        else:
            # dynamo counts graphs per code object, and every model's step shares one: allow all the buckets of two
            # models, with 0-2 layers' states, and a second cache size (a longer request) before it falls back to
            # eager (patched only here: the patch itself costs ~0.05 ms, and a warm call compiles nothing)
            start = time.perf_counter()
            with torch._dynamo.config.patch(recompile_limit=12 * len(BUCKETS) + 8):
                out = self.fn(*args)  # the first call traces and compiles
            if self.cuda_graphs:
                torch.cuda.synchronize()
            self.compile_seconds += time.perf_counter() - start
            self.compiled.add(key)
        if self.cuda_graphs:
            out = tuple(None if t is None else t.clone() for t in out)
        return out


class CompiledForward(Graphs):
    """One model's forward, compiled, over a static cache: a graph per bucket of appended tokens (and whether the
    hidden state is read). Remembers how long each graph took to compile."""

    def __init__(self, model: torch.nn.Module, mode: str | None):
        self.model = model
        self.window = position_window(model)

        keyword = cache_keyword(type(model))  # read here: dynamo cannot trace the cached signature lookup

        def forward(ids: torch.Tensor, cache, hidden: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            out = model(input_ids=ids, **{keyword: cache}, use_cache=True, output_hidden_states=bool(hidden))
            return out.logits[0], last_states(out.hidden_states, hidden, 0)  # (T, V), (T, hidden, H) | None

        super().__init__(forward, mode)

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
        # Padding goes after the real tokens: causal attention keeps it from them, so any id will do. A fresh
        # tensor each time: a slice of a longer one has other strides, and dynamo would recompile for each.
        padded = ids.new_zeros(1, size)
        padded[:, : ids.shape[1]] = ids
        # keyed by the cache too: a longer request's new cache compiles its graphs again (counted as such)
        return self.run((size, int(hidden), id(cache)), padded, cache, int(hidden))


class FusedDraftStep(Graphs):
    """The draft's greedy step with the gate fused into it: one graph for the forward over 1-2 tokens, q, the gate's
    features, the verifier and P(accept), so a gated mode pays one graph launch and one host sync (the pass/flag
    decision, made by the loop) per drafted token. Greedy only: a draw at temperature > 0 takes the loop's
    generator, which a graph cannot; those steps run the compiled forward and the gate apart.

    Keyed by the gate's scoring (its class and verifier), not its threshold: the threshold is applied outside."""

    def __init__(self, model: torch.nn.Module, gate, vocab_size: int, mode: str | None):
        keyword = cache_keyword(type(model))
        layers = gate.hidden_layers  # 2: the gate also reads the layer before the last
        self.window = position_window(model)

        def step(ids: torch.Tensor, cache, position: torch.Tensor):
            out = model(input_ids=ids, **{keyword: cache}, use_cache=True, output_hidden_states=bool(layers),
                        logits_to_keep=1)
            logits = out.logits[0, -1, :vocab_size].float()  # (V,)
            x = logits.argmax(-1)
            q = torch.nn.functional.one_hot(x, vocab_size).float()  # greedy: what Sampler.probs gives
            q_soft = logits.softmax(-1)  # what Sampler.soft_probs gives when greedy
            hidden = out.hidden_states[-1][0, -1] if layers else None
            hidden_prev = out.hidden_states[-2][0, -1] if layers > 1 else None
            p_accept = gate.accept_prob(DraftStep(token=x, q=q, q_soft=q_soft, hidden=hidden, hidden_prev=hidden_prev),
                                        position)
            return x, q, q_soft, hidden, p_accept

        super().__init__(step, mode)
        self.positions: dict[int, torch.Tensor] = {}

    def fits(self, past: int, new: int, capacity: int) -> bool:
        """Whether a step over `new` tokens after `past` can run here (the draft reads 1, or 2 after a fully kept
        block; the first read of a prompt runs eagerly)."""
        end = past + new
        return (capacity is not None and past > 0 and new <= 2 and end <= capacity
                and (self.window is None or end <= self.window))

    def __call__(self, ids: torch.Tensor, cache, position: int):
        fresh = ids.new_empty(ids.shape)  # standard strides (see CompiledForward)
        fresh.copy_(ids)
        if position not in self.positions:  # made once per position: no host-to-device copy per step
            self.positions[position] = torch.tensor(float(position), device=ids.device)
        return self.run((ids.shape[1], id(cache)), fresh, cache, self.positions[position])


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
                print(f"note: compiling skipped: {problem}; decoding eagerly", file=sys.stderr)
                self.compile = False
        self.static = static or self.compile
        # CUDA graphs replay a step without launching its kernels one by one; on CPU there is nothing to replay
        self.mode = "reduce-overhead" if device.type == "cuda" else None
        self.caches: dict[int, object] = {}  # id(model) -> its StaticCache
        self.steps: dict[int, CompiledForward] = {}  # id(model) -> its compiled forward
        self.fused_steps: dict[tuple, FusedDraftStep] = {}  # (id(model), the gate's scoring) -> its fused step
        self.reported = 0.0  # compile seconds already reported

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far (each graph is compiled once per Decoder)."""
        return sum(step.compile_seconds for step in (*self.steps.values(), *self.fused_steps.values()))

    def fused(self, model: torch.nn.Module, gate, vocab_size: int, greedy: bool) -> FusedDraftStep | None:
        """The draft step with `gate` fused into it, when compiling and greedy (else None: the loop runs the
        forward and the gate apart). A learned gate is keyed by its verifier, so a new threshold reuses the graph."""
        if not self.compile or not greedy or not isinstance(gate, (LearnedGate, ConfidenceGate, AlwaysFlag, NeverFlag)):
            return None  # a gate of the caller's own may not trace: it runs apart
        if isinstance(gate, LearnedGate) and gate.wants["block"]:
            return None  # its block features keep Python state between tokens: it runs apart
        scoring = (type(gate), id(getattr(gate, "verifier", None)), tuple(getattr(gate, "features", ())))
        key = (id(model), scoring)
        if key not in self.fused_steps:
            self.fused_steps[key] = FusedDraftStep(model, gate, vocab_size, self.mode)
        return self.fused_steps[key]

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
            for layers in {0, hidden}:
                lm.append(ids.expand(1, size), hidden=layers)
                lm.rollback(size)
        return self.report()

    def report(self) -> float:
        """Compile seconds since the last report (0 once every graph in use is compiled)."""
        new = self.compile_seconds - self.reported
        self.reported = self.compile_seconds
        return new


__all__ = ["BUCKETS", "CompiledForward", "Engine", "FusedDraftStep", "compiler_problem"]
