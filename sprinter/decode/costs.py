"""A pair's cost profile: what each step of the decode loops costs on the device at hand.

Measured in about two seconds (`measure_costs`), the way the loops run the models (sprinter.decode.cache.CachedLM,
`append` then `rollback`, after a prefill of `context` tokens):
- `draft_step_ms`: one draft step as `ModelDrafter.propose` makes it (a one-token forward, the sampler's
  distribution and draw); `draft_hidden_step_ms` the same with the last hidden state (what a learned gate reads);
- `target_ms[n - 1]`: one target forward over n new tokens with the logits of all n, and their distribution:
  a verification call over a block of n - 1 drafted tokens and the last emitted one (n = 1: a plain decode step);
- `gate_ms`: one gate decision: "learned" (the verifier's MLP on one hidden state, sigmoid, the host sync of
  the threshold test), "confidence" (the draft's q(x) and the same test);
- `round_ms`: what a verification round costs besides the forwards: the acceptance check, the correction,
  the host sync and both caches' rollbacks;
- `draft_run_ms`: the "draft" mode's step: the draft's plain decode step, the mean of a run of DRAFT_RUN;
  `target_run_ms` the same for the target (mode "ar"), after one untimed step of the run;
- `target_prefill_ms` / `draft_prefill_ms`: what a generation pays once: a fresh cache and a forward over its
  `prompt` tokens (with the last token's distribution and draw).

The steps are timed with the run's sampler (`temperature`, `top_p`: at temperature > 0 every distribution is a
softmax, a top-p sort and a draw, several times a greedy argmax's cost on a small model), after a cache of
`context` tokens (the benchmark: the prompt and half the new tokens, the generation's mean context).
Each figure is the median of repeated calls (the first round of calls warms up and is dropped; on a loaded
machine the median of a short profile predicted the run better than the mean, which a single stall moves:
docs/latency.md); the calls of every figure take turns, so machine drift hits them alike. A profile is keyed
by (pair, device, dtype, threads): a cost profile file (`cost_profile.json`, written atomically) holds one
profile per key.
sprinter.decode.latency turns a profile and a run's acceptance statistics into predicted ms/token.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from sprinter.decode.acceptance import correction, flag_then_check
from sprinter.decode.cache import CachedLM
from sprinter.decode.drafters import DraftStep
from sprinter.decode.gates import ConfidenceGate, LearnedGate
from sprinter.decode.sampling import Sampler, uniform
from sprinter.errors import SprinterError
from sprinter.files import read_json, write_json
from sprinter.pairs.load import Pair

if TYPE_CHECKING:
    from sprinter.decode.decoder import Decoder

FORMAT = "sprinter-costs/1"
FILE_NAME = "cost_profile.json"
SEED = 0  # the random token ids the calls read (timing needs no text)
DRAFT_CHAIN = 4  # draft steps timed in a row (draft_step_ms is their mean): what a block of the loops drafts
DRAFT_RUN = 32  # plain decode steps of the draft timed in a row (draft_run_ms): what the "draft" mode runs
TARGET_RUN = 8  # plain decode steps of the target timed in a row (target_run_ms), after one untimed: mode "ar"
NOISY = 0.2  # a profile whose timings spread more than this (relative interquartile range) is flagged
STAND_IN_FEATURES = ("hidden", "token_id", "draft_prob", "draft_entropy")  # the trained verifier's default inputs


@dataclass(frozen=True)
class CostProfile:
    """Milliseconds per call of each step of the decode loops, for one pair on one device."""

    pair: str  # the pair folder (or "DRAFT | TARGET" names)
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", ...
    threads: int  # torch intra-op threads while measuring
    context: int  # tokens in the caches before each timed call
    draft_step_ms: float
    draft_hidden_step_ms: float
    target_ms: tuple[float, ...]  # [n - 1]: a target forward over n new tokens (n = 1 .. len)
    gate_ms: dict[str, float]  # "learned", "confidence"
    round_ms: float
    # Added later (a profile file without them loads with these defaults: what its figures were measured as).
    target_prefill_ms: float = 0.0  # once per generation: a fresh target cache and its forward over `prompt` tokens
    draft_prefill_ms: float = 0.0  # the same for the draft
    prompt: int = 0  # tokens of the prefills (0: not measured)
    draft_run_ms: float = 0.0  # one plain decode step of the draft in a run of DRAFT_RUN (0: not measured)
    target_run_ms: float = 0.0  # one plain decode step of the target in a run of TARGET_RUN (0: not measured)
    temperature: float = 0.0  # the sampler the steps were timed with (0: greedy; older files were all greedy)
    top_p: float = 1.0
    repeats: int = 0  # timed calls behind each median
    noise: float = 0.0  # the median over figures of (upper - lower quartile) / median: above ~0.2, a busy machine
    seconds: float = 0.0  # how long the measurement took
    created: str = ""

    def __post_init__(self) -> None:
        if not self.target_ms or any(not (isinstance(t, (int, float)) and t > 0) for t in self.target_ms):
            raise SprinterError(f"cost profile target_ms: got {self.target_ms!r}; expected one or more times > 0")
        for name in ("draft_step_ms", "draft_hidden_step_ms", "round_ms", "target_prefill_ms", "draft_prefill_ms",
                     "draft_run_ms", "target_run_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise SprinterError(f"cost profile {name}: got {value!r}; expected a time >= 0 (ms)")
        object.__setattr__(self, "target_ms", tuple(float(t) for t in self.target_ms))

    @property
    def key(self) -> str:
        """The profile's key in a cost profile file: pair | device | dtype | threads."""
        return profile_key(self.pair, self.device, self.dtype, self.threads)

    @property
    def target_step_ms(self) -> float:
        """One plain decode step of the target (n = 1)."""
        return self.target_ms[0]

    @property
    def cost_ratio(self) -> float:
        """Draft step over target step: c in docs/references.md §1."""
        return self.draft_step_ms / self.target_step_ms

    def target(self, n: float) -> float:
        """ms of a target forward over n new tokens: the measured figure, linear between integers, and beyond the
        last measured n the line through the last two points (one point: flat)."""
        if n < 1:
            raise SprinterError(f"target forward: got n={n!r} new tokens; expected n >= 1")
        t = self.target_ms
        if n >= len(t):
            slope = t[-1] - t[-2] if len(t) > 1 else 0.0
            return t[-1] + slope * (n - len(t))
        i = int(n)  # 1 <= i < len(t): between t[i - 1] (n = i) and t[i] (n = i + 1)
        return t[i - 1] + (t[i] - t[i - 1]) * (n - i)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CostProfile":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise SprinterError(f"cost profile: missing {missing}; expected a profile written by "
                                "scripts/profile_pair.py")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Budget:
    """How long `measure_costs` times: rounds of every figure's calls until about `seconds` have passed (at least
    `min_repeats` timed rounds), or `max_repeats` rounds (None: the whole time)."""

    seconds: float = 2.0
    min_repeats: int = 3
    max_repeats: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, (int, float)) and self.seconds > 0):
            raise SprinterError(f"budget seconds: got {self.seconds!r}; expected a time > 0")
        if self.max_repeats is not None and not (isinstance(self.max_repeats, int) and self.max_repeats >= 1):
            raise SprinterError(f"max_repeats: got {self.max_repeats!r}; expected an integer >= 1, or None")

    def done(self, rounds: int, spent: float) -> bool:
        """After `rounds` rounds (the warm-up one included) and `spent` seconds: stop?"""
        return rounds > self.min_repeats and (spent * (rounds + 1) / rounds > self.seconds
                                              or self.max_repeats is not None and rounds > self.max_repeats)


def profile_key(pair: str, device: str, dtype: str, threads: int) -> str:
    return f"{pair} | {device} | {dtype} | {threads} thread(s)"


# ------------------------------------------------------------------------------------------- the file
def read_profiles(path: str | Path) -> dict[str, CostProfile]:
    """Every profile in a cost profile file, by key ({} when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = read_json(path, "cost profile")
    if data.get("format") != FORMAT:
        raise SprinterError(f"cost profile file {str(path)!r}: format {data.get('format')!r}; expected {FORMAT!r}")
    return {key: CostProfile.from_dict(p) for key, p in data["profiles"].items()}


def save_profile(path: str | Path, profile: CostProfile) -> Path:
    """Add (or replace) `profile` under its key in the file at `path`, written atomically."""
    profiles = read_profiles(path)
    profiles[profile.key] = profile
    return write_json(path, {"format": FORMAT, "profiles": {k: p.to_dict() for k, p in sorted(profiles.items())}})


def find_profile(path: str | Path, pair: str, device: str, dtype: str, threads: int) -> CostProfile | None:
    return read_profiles(path).get(profile_key(pair, device, dtype, threads))


# ------------------------------------------------------------------------------------------- measuring
def stand_in_verifier(hidden_size: int, vocab_size: int) -> torch.nn.Module:
    """An untrained verifier of the default shape: it costs what a trained one costs."""
    from sprinter.verifier import Verifier, VerifierInfo, default_arch

    info = VerifierInfo(features=STAND_IN_FEATURES, hidden_size=hidden_size, arch=default_arch(vocab_size=vocab_size))
    return Verifier(info).eval()



def timing_noise(samples: Iterable[Sequence[float]]) -> float:
    """The median over figures of (upper - lower quartile) / median, rounded to 4 places (0.0 with none): how
    much a busy machine spreads the timings (CostProfile.noise)."""
    quartiles = (statistics.quantiles(values, n=4) for values in samples)
    spread = [(q[2] - q[0]) / q[1] for q in quartiles if q[1] > 0]
    return round(statistics.median(spread), 4) if spread else 0.0


@torch.inference_mode()
def measure_costs(pair: Pair, *, name: str, gate: LearnedGate | None = None, max_n: int = 21, context: int = 64,
                  prompt: int | None = None, sampler: Sampler | None = None, budget: Budget = Budget()) -> CostProfile:
    """Time every step of the decode loops (see the module docstring) with `pair`'s models for `budget`
    (about two seconds); the profile is keyed by `name` (the pair's folder, or its models' names) and this device.

    `max_n`: the longest target forward timed (sprinter's blocks: max_block drafted tokens and the last emitted
    one, 21 by default). `gate`: the learned gate to time; None: an untrained verifier of the default shape.
    `context`: the tokens in the caches before each step; `prompt`: the prefills' length (None: `context`);
    `sampler`: how the loops turn logits into distributions and draws (None: greedy)."""
    prompt = context if prompt is None else prompt
    if not all(isinstance(v, int) and v >= 1 for v in (max_n, context, prompt)):
        raise SprinterError(f"max_n / context / prompt: got {max_n!r} / {context!r} / {prompt!r}; expected integers "
                            ">= 1")
    started = time.perf_counter()
    draft, target, vocab_size = pair.draft, pair.target, pair.vocab_size
    weight = next(target.parameters())
    device, dtype = weight.device, weight.dtype
    gen = torch.Generator(device=device).manual_seed(SEED)
    longest = max(max_n, DRAFT_RUN, TARGET_RUN + 1)  # the most tokens a timed call (or run) adds to a cache
    ids = torch.randint(0, vocab_size, (1, max(context, prompt) + longest + 1), generator=gen,
                        device=device)  # timing needs no text
    sampler = Sampler() if sampler is None else sampler
    if gate is None:
        gate = LearnedGate(stand_in_verifier(draft.config.hidden_size, vocab_size).to(device), STAND_IN_FEATURES, 0.5)
    confidence = ConfidenceGate()
    hidden_layers = max(1, gate.hidden_layers)  # a gate that reads the layer before the last: 2

    # The caches, each holding `context` tokens; every timed call adds tokens and the next rolls them back.
    draft_lms = {hidden: CachedLM(draft, vocab_size) for hidden in (False, True)}
    for lm in draft_lms.values():
        lm.append(ids[:, :context])
    target_lm = CachedLM(target, vocab_size)
    target_lm.append(ids[:, :context])

    def propose(hidden: bool, i: int = 0) -> DraftStep:
        """One draft step as ModelDrafter.propose makes it: a one-token forward, the sampler's probabilities, a draw;
        with a gate (`hidden`) also the states and the soft probabilities the gate reads (no host sync: the gate's
        threshold test syncs, timed in gate_ms; without a gate the round's one sync is in round_ms)."""
        layers = hidden_layers if hidden else 0
        logits, h = draft_lms[hidden].append(ids[:, context + i: context + i + 1], hidden=layers)  # (1, V), (1, L, H)
        q = sampler.probs(logits[0])
        return DraftStep(token=sampler.draw(q, gen), q=q, q_soft=sampler.soft_probs(logits[0]) if hidden else q,
                         hidden=None if h is None else h[0, 0], hidden_prev=h[0, 1] if layers > 1 else None)

    step = propose(True)  # a draft step with a hidden state, for the gates
    draft_lms[True].rollback(1)
    n_check = 4  # the acceptance check and correction of a four-token block: their cost barely depends on k
    p = sampler.probs(torch.randn(n_check + 1, vocab_size, generator=gen, device=device))  # (n + 1, V)
    q = sampler.probs(torch.randn(n_check, vocab_size, generator=gen, device=device))  # (n, V)
    x = q.argmax(-1)  # (n,)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def draft_steps(hidden: bool, chain: int, read: bool = False) -> Callable[[], float]:
        """A draft step's share of a chain of `chain` steps in a row. DRAFT_CHAIN: as a block drafts them (one step
        alone, between the other figures' calls, found the draft's weights out of the CPU caches: ~1.4x a block's
        step). DRAFT_RUN with `read`: the "draft" mode's loop (sprinter.decode.loops.autoregressive), each token read
        on the host; a run of one model keeps its weights in the CPU caches (the 4-step chains read that mode 12-41%
        slow)."""
        def run() -> float:
            sync()
            start = time.perf_counter()
            for i in range(chain):
                step = propose(hidden, i)
                if read:
                    step.token.item()
            sync()
            seconds = (time.perf_counter() - start) / chain
            draft_lms[hidden].rollback(chain)
            return seconds
        return run

    def target_forward(n: int) -> Callable[[], float]:
        def run() -> float:
            sync()
            start = time.perf_counter()
            logits, _ = target_lm.append(ids[:, context: context + n], logits=n)
            sampler.probs(logits)[-1, 0].item()
            seconds = time.perf_counter() - start
            target_lm.rollback(n)
            return seconds
        return run

    def target_run() -> float:
        """Mode "ar"'s step: the target's plain decode step (a forward, the sampler's draw, the token read on the
        host), the mean of TARGET_RUN in a row after one untimed step. The run's first step finds the target's
        weights out of the CPU caches (the figures before it ran the draft); ar's steps follow one another, and
        a lone one-token forward, target_ms[0], read mode ar 16-20% slow on the bench pair."""
        start = 0.0
        for i in range(TARGET_RUN + 1):
            if i == 1:
                sync()
                start = time.perf_counter()
            logits, _ = target_lm.append(ids[:, context + i: context + i + 1])
            sampler.draw(sampler.probs(logits[0]), gen).item()
        sync()
        seconds = (time.perf_counter() - start) / TARGET_RUN
        target_lm.rollback(TARGET_RUN + 1)
        return seconds

    def gate_call(g) -> Callable[[], float]:
        def run() -> float:
            sync()
            start = time.perf_counter()
            bool(g.accept_prob(step, 0) >= g.threshold)  # the loop's one host sync per decision
            return time.perf_counter() - start
        return run

    def prefill(model: torch.nn.Module) -> Callable[[], float]:
        """A generation's first forward: a fresh cache, the prompt read, the last token's distribution and draw."""
        def run() -> float:
            sync()
            start = time.perf_counter()
            logits, _ = CachedLM(model, vocab_size).append(ids[:, :prompt])
            sampler.draw(sampler.probs(logits[0]), gen).item()
            return time.perf_counter() - start
        return run

    def round_rest() -> float:
        """A round's acceptance check, correction, host sync and the two rollbacks (of one token each)."""
        target_lm.append(ids[:, context: context + 1])
        draft_lms[False].append(ids[:, context: context + 1])
        sync()
        start = time.perf_counter()
        kept = flag_then_check(p[torch.arange(n_check), x], q[torch.arange(n_check), x], uniform(n_check, gen, device),
                               True, True)
        y = sampler.draw(correction(p, q, kept), gen)
        torch.cat([kept.view(1), x, y.view(1)]).tolist()
        target_lm.rollback(1)
        draft_lms[False].rollback(1)
        return time.perf_counter() - start

    # the target's run first: after the last round's longest forward, before the draft's chains (as in the loops)
    tasks: dict[str, Callable[[], float]] = {"target_run": target_run, "draft": draft_steps(False, DRAFT_CHAIN),
                                             "draft_hidden": draft_steps(True, DRAFT_CHAIN),
                                             "gate_learned": gate_call(gate), "gate_confidence": gate_call(confidence),
                                             "round": round_rest, "target_prefill": prefill(target),
                                             "draft_prefill": prefill(draft),
                                             "draft_run": draft_steps(False, DRAFT_RUN, read=True)}
    tasks = {**tasks, **{f"target_{n}": target_forward(n) for n in range(1, max_n + 1)}}
    times: dict[str, list[float]] = {task: [] for task in tasks}
    rounds = 0
    while True:
        for task, run in tasks.items():
            seconds = run()
            if rounds:  # round 0 warms up
                times[task].append(seconds)
        rounds += 1
        spent = time.perf_counter() - started
        if budget.done(rounds, spent):
            break
    ms = {task: 1e3 * statistics.median(values) for task, values in times.items()}
    noise = timing_noise(times.values())
    return CostProfile(pair=name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                       threads=torch.get_num_threads(), context=context, draft_step_ms=ms["draft"],
                       draft_hidden_step_ms=ms["draft_hidden"],
                       target_ms=tuple(ms[f"target_{n}"] for n in range(1, max_n + 1)),
                       gate_ms={"learned": ms["gate_learned"], "confidence": ms["gate_confidence"]},
                       round_ms=ms["round"], target_prefill_ms=ms["target_prefill"],
                       draft_prefill_ms=ms["draft_prefill"], prompt=prompt, draft_run_ms=ms["draft_run"],
                       target_run_ms=ms["target_run"],
                       temperature=sampler.temperature,
                       top_p=sampler.top_p, repeats=rounds - 1, noise=noise,
                       seconds=round(time.perf_counter() - started, 3),
                       created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def cost_profile(decoder: Decoder, budget_s: float = 2.0) -> CostProfile:
    """The pair's cost profile (sprinter.decode.costs) on this device, dtype and thread count: `decoder.profile`
    when set; else the one kept in memory by the decoder; else the one in cost_profile.json beside the pair
    (scripts/profile_pair.py writes it); else measured now in about `budget_s` seconds, kept in memory, and saved
    beside the pair when its folder is writable (measuring works for any model, random test ones too)."""
    if decoder.profile is not None:
        return decoder.profile
    pair, folder = decoder.pair, Path(decoder.pair.draft_name).parent
    name = str(folder) if (folder / "pair.json").is_file() else f"{pair.draft_name} | {pair.target_name}"
    dtype = str(pair.dtype).removeprefix("torch.")
    key = profile_key(name, str(pair.device), dtype, torch.get_num_threads())
    if key not in decoder.profiles:
        saved = find_profile(folder / FILE_NAME, name, str(pair.device), dtype, torch.get_num_threads()) \
            if name == str(folder) else None
        if saved is None:
            saved = measure_costs(pair, name=name, gate=decoder.gate, budget=Budget(budget_s))
            if name == str(folder) and os.access(folder, os.W_OK):
                save_profile(folder / FILE_NAME, saved)
        decoder.profiles[key] = saved
    return decoder.profiles[key]


__all__ = ["FILE_NAME", "FORMAT", "NOISY", "Budget", "CostProfile", "cost_profile", "find_profile", "measure_costs",
           "profile_key", "read_profiles", "save_profile", "stand_in_verifier", "timing_noise"]
