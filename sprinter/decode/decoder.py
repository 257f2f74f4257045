"""The decode API: `Decoder.from_pretrained(...)`, then `decoder.generate(prompt, mode=...)`.

Modes (REFERENCES.md §1 and §5):
- "ar": the target alone, one token per forward (the reference every other mode is measured against);
- "draft": the draft alone;
- "sd": standard speculative decoding: draft k tokens, one target forward checks them all with the
  speculative-sampling rule (lossless: the output is distributed as the target's);
- "sprinter": approximate verification: a gate decides from the draft alone whether each drafted
  token needs the target; the target is called only on a flagged token (or after max_block tokens)
  and checks only that token (`strict=True`: every token of the block);
- "sd-gated": lossless speculative decoding whose block length a gate decides (SpecDec++): drafting
  stops once 1 - prod P(accept) over the block exceeds a stop threshold (or at max_block), then the
  target checks every token as in "sd";
- "ngram": lossless speculative decoding without a draft model (SSSD, §4): each sequence drafts a chain
  from n-gram matches in its own text (and a datastore), s tokens long, s from the batch size (sprinter.decode.roofline);
- "async": lossless speculative decoding with the draft running ahead in a thread of its own, maybe on
  another device, while the target verifies (AMUSD, REFERENCES.md §3; sprinter.decode.asynchronous).

A list of prompts is decoded as one batch in modes "ar", "sd" and "ngram" (sprinter.decode.batched, which
also runs "ngram" for a single prompt) and gives a list of results, one per prompt.

Two loops here serve a single prompt in the first five modes: `autoregressive` (one model) and
`speculative` (a drafter, an optional gate and the target); a mode is a few arguments to one of them.
The batched loop (sprinter.decode.batched) and the two-thread loop (sprinter.decode.asynchronous) live beside them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from sprinter.config import check_integers, option
from sprinter.decode.acceptance import correction, flag_then_check
from sprinter.decode.asynchronous import ASYNC_WINDOW, asynchronous, check_async_options
from sprinter.decode.batched import generate_batch
from sprinter.decode.cache import CachedLM
from sprinter.decode.datastore import Datastore
from sprinter.decode.drafters import Drafter, ModelDrafter
from sprinter.decode.emit import Emitter, GenerateOutput
from sprinter.decode.engine import Engine
from sprinter.decode.gates import (
    CONFIDENCE_THRESHOLD,
    AlwaysFlag,
    ConfidenceGate,
    Gate,
    LearnedGate,
    NeverFlag,
    check_threshold,
    load_learned_gate,
)
from sprinter.decode.sampling import Sampler, uniform
from sprinter.decode.stats import DecodeStats
from sprinter.errors import SprinterError
from sprinter.pairs.load import (
    Pair,
    fingerprint,
    load_pair,
    resolve_device,
    resolve_dtype,
)

MODES = ("ar", "draft", "sd", "sprinter", "sd-gated", "ngram", "async")
BATCH_MODES = ("ar", "sd", "ngram")  # the modes that decode a list of prompts together
GATED_MODES = ("sprinter", "sd-gated")  # the modes that consult a gate
STOP_THRESHOLD = 0.5  # sd-gated: stop drafting once P(the block holds a rejection) exceeds this
GATES = ("learned", "confidence", "always", "never")
DEMO_VERIFIER = "checkpoints/verifiers/demo"
NO_VERIFIER = ("modes 'sprinter' and 'sd-gated' need a gate, and this decoder has no verifier: train one with "
               "`python scripts/collect.py` then `python scripts/train.py` (writes checkpoints/verifiers/demo) and "
               "pass verifier=DIR (CLI --verifier DIR), or use the draft's confidence: gate='confidence' "
               "(CLI --gate confidence)")


@dataclass
class GenerateConfig:
    """One generation's options: the single home of their defaults (`Decoder.generate` and
    scripts/generate.py both read them from here). Validated on construction, before any model runs."""

    prompt: str = option("def fibonacci(n):", "text to continue")
    mode: str = option("sprinter", f"one of {MODES}")
    max_new_tokens: int = option(128, "most tokens to generate")
    temperature: float = option(0.0, "0 is greedy; above 0 samples")
    top_k: int = option(0, "sample among the k likeliest tokens only (0: all)")
    top_p: float = option(1.0, "sample from the smallest set with this much probability (1.0: all)")
    seed: int = option(0, "seed of the torch.Generator every random draw comes from")
    k: int = option(4, "tokens drafted per target call in mode 'sd'")
    ngram_n: int = option(3, "ngram: longest suffix (in tokens) looked up in the sequence's own text")
    s: int | None = option(None, "ngram: tokens drafted per sequence and target call; none: from the batch size and "
                                 "I_knee (sprinter.decode.roofline); 0: plain decoding")
    i_knee: float | None = option(None, "ngram: tokens per target forward at the roofline knee; none: measured on the "
                                        "device at start")
    max_batch: int | None = option(None, "batched modes: most prompts decoded at once, the rest queue for the places "
                                         "of finished ones (none: all at once)")
    prompts_file: str | None = option(None, "decode every prompt of this file as one batch (replaces --prompt): one "
                                            "prompt per line, or one JSON string per line in a .jsonl file")
    max_block: int | None = option(20, "sprinter: call the target after this many passed tokens (none: unbounded)")
    gate: str | None = option(None, f"sprinter: one of {GATES}; none: learned when a verifier is loaded")
    threshold: float | None = option(None, "sprinter: the gate's threshold; none: the verifier's calibrated "
                                           f"one, or {CONFIDENCE_THRESHOLD} for the confidence gate. sd-gated: the "
                                           f"stop threshold on 1 - prod P(accept); none: the verifier's recommended one, else {STOP_THRESHOLD}")
    strict: bool = option(False, "sprinter: the target also checks the passed tokens of each block (greedy: lossless)")
    stop: tuple[str, ...] = option((), "stop after any of these strings (kept in the output)")
    window: int | None = option(None, f"async: most drafted tokens awaiting verification; none: {ASYNC_WINDOW}")
    draft_device: str | None = option(None, "async: the draft's device (cpu, cuda:N); none: --device")
    target_device: str | None = option(None, "async: the target's device; none: --device")
    pair: str = option("demo", "a preset pair under checkpoints/pairs/ (built if missing) or a pair folder")
    draft: str | None = option(None, "draft model: Hub name or folder; none: PAIR/draft")
    target: str | None = option(None, "target model: Hub name or folder; none: PAIR/target")
    verifier: str | None = option(None, f"verifier checkpoint; none: {DEMO_VERIFIER} when it exists")
    datastore: str | None = option(None, "ngram: also look up this n-gram datastore (scripts/build_datastore.py)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = option("auto", "float32, bfloat16, float16 or auto: bfloat16 on CUDA, float32 on CPU")
    threads: int = option(0, "CPU threads for torch (0: torch's default)")
    static_cache: bool = option(False, "single-prompt modes: static KV caches written by position (else dynamic ones)")
    compile: bool = option(False, "single-prompt modes: torch.compile the draft step and the target's verify forward "
                                  "(static caches implied; compiling takes seconds to minutes, once per run)")
    json: bool = option(False, "print one JSON object (text, token ids, stats) instead of streaming text")

    def __post_init__(self) -> None:
        check_options(self.mode, self.max_new_tokens, self.k, self.max_block, self.threshold, self.strict,
                      self.gate, self.stop, self.ngram_n, self.s, self.i_knee, self.max_batch)
        if self.prompts_file is not None and self.mode not in BATCH_MODES:
            raise SprinterError(f"prompts_file: got {self.prompts_file!r} with mode={self.mode!r}; expected a mode of "
                                f"{BATCH_MODES} (the modes that decode a batch)")
        if self.datastore is not None and self.mode != "ngram":
            raise SprinterError(f"datastore: got {self.datastore!r} with mode={self.mode!r}; expected it only with "
                                "mode='ngram'")
        check_async_options(self.mode, self.window, self.draft_device, self.target_device)
        Sampler(self.temperature, self.top_k, self.top_p)
        check_integers(self, ("threads",), minimum=0)


def check_options(mode: str, max_new_tokens: int, k: int, max_block: int | None, threshold: float | None,
                  strict: bool, gate: str | Gate | None, stop: Sequence[str], ngram_n: int = 3, s: int | None = None,
                  i_knee: float | None = None, max_batch: int | None = None) -> None:
    """The checks of one generation's options that need no model."""
    if mode not in MODES:
        raise SprinterError(f"mode: got {mode!r}; expected one of {MODES}")
    if not _positive_int(max_new_tokens):
        raise SprinterError(f"max_new_tokens: got {max_new_tokens!r}; expected an integer >= 1")
    if not _positive_int(k):
        raise SprinterError(f"k: got {k!r}; expected an integer >= 1")
    if max_block is not None and not _positive_int(max_block):
        raise SprinterError(f"max_block: got {max_block!r}; expected an integer >= 1, or None (unbounded)")
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise SprinterError(f"stop: got {stop!r}; expected a list of non-empty strings")
    if threshold is not None:
        check_threshold(threshold)
    if mode not in GATED_MODES:
        for name, value in (("gate", gate), ("threshold", threshold)):
            if value is not None:
                raise SprinterError(f"{name}: got {value!r} with mode={mode!r}; expected it only with a mode of "
                                    f"{GATED_MODES}")
    if strict and mode != "sprinter":
        raise SprinterError(f"strict: got True with mode={mode!r}; expected it only with mode='sprinter'")
    if isinstance(gate, str) and gate not in GATES:
        raise SprinterError(f"gate: got {gate!r}; expected one of {GATES} or a Gate object")
    if mode == "sprinter" and threshold is not None and gate not in (None, "learned", "confidence"):
        raise SprinterError(f"threshold: got {threshold!r} with gate={gate!r}; expected it only with the "
                            "learned or the confidence gate")
    if not _positive_int(ngram_n):
        raise SprinterError(f"ngram_n: got {ngram_n!r}; expected an integer >= 1")
    if s is not None and not (_positive_int(s) or s == 0 and not isinstance(s, bool)):
        raise SprinterError(f"s: got {s!r}; expected an integer >= 0 (0: plain decoding), or None (from the batch "
                            "size)")
    if i_knee is not None and not (isinstance(i_knee, (int, float)) and not isinstance(i_knee, bool) and i_knee > 0):
        raise SprinterError(f"i_knee: got {i_knee!r}; expected a number > 0, or None (measured on the device)")
    for name, value in (("s", s), ("i_knee", i_knee)):
        if value is not None and mode != "ngram":
            raise SprinterError(f"{name}: got {value!r} with mode={mode!r}; expected it only with mode='ngram'")
    if s is not None and i_knee is not None:
        raise SprinterError(f"i_knee: got {i_knee!r} with s={s!r}; expected at most one (s fixes the speculation "
                            "length, i_knee derives it from the batch size)")
    if max_batch is not None and not _positive_int(max_batch):
        raise SprinterError(f"max_batch: got {max_batch!r}; expected an integer >= 1, or None (all prompts at once)")
    if max_batch is not None and mode not in BATCH_MODES:
        raise SprinterError(f"max_batch: got {max_batch!r} with mode={mode!r}; expected it only with a mode of "
                            f"{BATCH_MODES}")


def autoregressive(lm: CachedLM, tokens: torch.Tensor, sampler: Sampler, gen: torch.Generator, out: Emitter) -> None:
    """Plain decoding with one model ("ar": the target; "draft": the draft). tokens: (1, T) the prompt."""
    while not out.done:
        # 1. Run the model over what its cache lacks (the prompt first, then the last token).
        logits, _ = lm.append(tokens[:, lm.length:])  # (1, V)
        # 2. Draw the next token from its distribution.
        x = sampler.draw(sampler.probs(logits[0]), gen)
        # 3. Emit it.
        tokens = torch.cat([tokens, x.view(1, 1)], 1)
        out.emit([x.item()])


def speculative(target: CachedLM, drafter: Drafter, gate: Gate | None, tokens: torch.Tensor, sampler: Sampler,
                gen: torch.Generator, out: Emitter, stats: DecodeStats, max_block: int | None, check_all: bool,
                stop_threshold: float | None = None) -> None:
    """Draft, (maybe) verify, emit, roll back; until the budget, EOS or a stop string.

    "sd": gate None, max_block = k, check_all. "sprinter": a gate, max_block (None: unbounded),
    check_all = strict. "sd-gated": a gate, check_all, and `stop_threshold`: the block ends once
    1 - prod P(accept) over it exceeds the threshold (SpecDec++), not at the first flagged token. tokens: (1, T) the prompt. The target's cache always covers every emitted
    token but the last; its first forward reads the prompt together with the first block."""
    while not out.done:
        limit = out.remaining if max_block is None else min(max_block, out.remaining)
        # 1. Draft one token at a time. The gate scores each from the draft's state; drafting stops at
        #    the first flagged token, or when the block is full.
        block: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        flagged = False
        survival = 1.0  # sd-gated: estimated P(every token of the block is accepted)
        seq = tokens
        while len(block) < limit and not flagged:
            step = drafter.propose(seq, gen)
            block.append(step.token)
            qs.append(step.q)
            seq = torch.cat([seq, step.token.view(1, 1)], 1)
            if gate is not None:
                stats.verifier_calls += 1
                p_accept = gate.accept_prob(step, len(block) - 1)
                if stop_threshold is None:  # sprinter: this token is checked iff flagged
                    flagged = not bool(p_accept >= gate.threshold)  # one host sync
                else:  # sd-gated: stop drafting once the block probably holds a rejection
                    survival = survival * p_accept
                    flagged = bool(1 - survival > stop_threshold)  # one host sync
        n = len(block)
        x = torch.stack(block)  # (n,)
        stats.drafted += n
        stats.flagged += int(flagged)
        # 2. A block that ends the generation with nothing flagged needs no target (unless every token is checked).
        if not flagged and not check_all and n == out.remaining:
            stats.accepted += n
            out.emit(x.tolist())
            break
        # 3. One target forward over every token it has not seen (the last emitted one(s) and the block);
        #    this also fills its cache. p[i] is the target's distribution for block position i, p[n] after it.
        logits, _ = target.append(seq[:, target.length:], logits=n + 1)
        p, q = sampler.probs(logits), torch.stack(qs)  # (n + 1, V), (n, V)
        # 4. Check the flagged token (strict / SD: every token) with the speculative-sampling rule.
        positions = torch.arange(n, device=x.device)
        n_kept = flag_then_check(p[positions, x], q[positions, x], uniform(n, gen, x.device), flagged, check_all)
        # 5. The target's own token: from the residual after a rejection, else a bonus token from p[n].
        y = sampler.draw(correction(p, q, n_kept), gen)
        kept, *decided = torch.cat([n_kept.view(1), x, y.view(1)]).tolist()  # the one host sync of this round
        decided = decided[:kept] + decided[-1:]
        stats.accepted += kept
        stats.rejected += n - kept
        # 6. Roll both caches back to what was emitted (the target has not read its own token y yet).
        tokens = torch.cat([tokens, x[None, :kept], y.view(1, 1)], 1)
        target.rollback_to(tokens.shape[1] - 1)
        drafter.rollback_to(tokens.shape[1] - 1)
        out.emit(decided)


class Decoder:
    """A draft/target pair (and optionally a trained verifier) ready to generate in any mode."""

    def __init__(self, pair: Pair, gate: LearnedGate | None = None, verifier_info: object = None,
                 datastore: Datastore | None = None, engine: Engine | None = None):
        self.pair = pair
        self.engine = Engine(pair.device) if engine is None else engine  # single-prompt modes: caches, compiled steps
        self.gate = gate  # the learned verifier, when one was loaded
        self.verifier_info = verifier_info
        self.datastore = datastore  # mode "ngram": the corpus n-gram fallback, when one was loaded
        self.copies: dict[tuple[str, str], torch.nn.Module] = {}  # async: models copied to another device

    @classmethod
    def from_pretrained(cls, draft: str, target: str, verifier: str | Path | None = None, device: str = "auto",
                        dtype: str = "auto", trust_remote_code: bool = False,
                        datastore: str | Path | None = None, static_cache: bool = False,
                        compile: bool = False) -> "Decoder":
        """Load the pair (Hub names or local folders) and, if given, a verifier trained for this draft and an
        n-gram datastore (scripts/build_datastore.py) for mode "ngram". The verifier is checked against the
        draft (fingerprint, hidden size) and the datastore's files before any model is loaded; the datastore's
        tokenizer against the pair's once it is loaded.

        The single-prompt modes decode with dynamic KV caches (the reference), or with static ones written by
        position (`static_cache=True`); `compile=True` also torch.compiles the draft's step and the target's verify
        forward (sprinter.decode.engine; static caches implied; each generation's `stats.compile_seconds` says
        what compiling cost it, paid once per Decoder)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        gate = info = None
        if verifier is not None:
            gate, info = load_learned_gate(verifier, fingerprint(draft), _hidden_size(draft, trust_remote_code), dev, dt)
        store = Datastore.open(datastore) if datastore is not None else None
        pair = load_pair(draft, target, dev, dt, trust_remote_code)
        if store is not None:
            store.check_tokenizer(pair.tokenizer)
        return cls(pair, gate, info, store, Engine(dev, static=static_cache, compile=compile))

    @property
    def tokenizer(self):
        return self.pair.tokenizer

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[int] | torch.Tensor | Sequence[str | Sequence[int]],
                 max_new_tokens: int = GenerateConfig.max_new_tokens,
                 mode: str = GenerateConfig.mode, temperature: float = GenerateConfig.temperature,
                 top_k: int = GenerateConfig.top_k, top_p: float = GenerateConfig.top_p, seed: int = GenerateConfig.seed,
                 k: int = GenerateConfig.k, max_block: int | None = GenerateConfig.max_block,
                 threshold: float | None = None, strict: bool = False, gate: str | Gate | None = None,
                 stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
                 ngram_n: int = GenerateConfig.ngram_n, s: int | None = None, i_knee: float | None = None,
                 max_batch: int | None = None, window: int | None = None, draft_device: str | None = None,
                 target_device: str | None = None) -> GenerateOutput | list[GenerateOutput]:
        """Generate up to `max_new_tokens` after `prompt` (text, or token ids with a batch of 1).

        A list of prompts (texts or token-id lists) is decoded as one batch in modes "ar", "sd" and "ngram" and
        gives a list of results, one per prompt, each with its own stats (`wall_seconds` is the batch's); the
        other modes take a batch of one and give one result;
        at most `max_batch` decode at once, the rest wait for the places of finished ones. "ngram" options:
        `ngram_n` (longest suffix looked up), `s` (tokens drafted per sequence; None: from the batch size and
        `i_knee`, measured on the device when None; see sprinter.decode.roofline).

        temperature 0 is greedy; above 0 tokens are drawn (with top_k / top_p) from a generator seeded
        by `seed`. `k`: tokens drafted per target call in "sd". "sprinter" options: `gate` ("learned",
        the default when a verifier is loaded; "confidence": the draft's q(x); "always"; "never"; or a
        Gate object), `threshold` (overrides the verifier's calibrated one, or the confidence gate's
        0.4), `max_block` (None: unbounded), `strict`. "sd-gated" takes `gate` and `max_block` alike,
        and `threshold` as its stop threshold (default: the verifier's recommended one when its gate is the
        loaded verifier, else STOP_THRESHOLD). Generation stops at EOS, at any of `stop`
        (the stop string is kept in the output) or after max_new_tokens. `on_text` receives text as it
        is decided. "async" takes `window` (most drafted tokens awaiting verification, default
        ASYNC_WINDOW) and `draft_device` / `target_device` (default: the decoder's device; a model is
        copied to another device on first use and the copy kept)."""
        # 0. Every check happens before any model runs.
        sampler = Sampler(temperature, top_k, top_p)
        check_async_options(mode, window, draft_device, target_device)
        if _is_batch(prompt) and len(prompt) == 1 and mode not in BATCH_MODES:
            prompt = prompt[0]  # a batch of one, in a mode that decodes one prompt at a time
        if _is_batch(prompt) or mode == "ngram":
            return self._generate_batch(prompt, mode, max_new_tokens, sampler, seed, k, ngram_n, s, i_knee,
                                        max_batch, threshold, strict, gate, stop, on_text)
        ids = self._prompt_ids(prompt)
        chosen_gate = self._check_request(mode, len(ids), max_new_tokens, k, max_block, threshold, strict, gate, stop,
                                          ngram_n, s, i_knee, max_batch)
        device = self.pair.device
        gen = torch.Generator(device=device).manual_seed(int(seed))
        tokens = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        out = Emitter(self.tokenizer, max_new_tokens, self.tokenizer.eos_token_id, stop, on_text)
        stats = DecodeStats(mode=mode)
        # async may run each model on a device of its own (a copy made once); every other mode on the decoder's
        target_dev, draft_dev = (device if d is None else resolve_device(d) for d in (target_device, draft_device))
        capacity = len(ids) + max_new_tokens  # neither cache ever holds more than the prompt and the budget
        eager = mode == "async"  # its draft runs in a thread of its own: no compiled graphs there
        target = self.engine.lm(self.model_on("target", target_dev), self.pair.vocab_size, capacity, not eager)
        draft = self.engine.lm(self.model_on("draft", draft_dev), self.pair.vocab_size, capacity, not eager)

        start = time.perf_counter()
        if mode in ("ar", "draft"):
            autoregressive(target if mode == "ar" else draft, tokens, sampler, gen, out)
        elif mode == "async":
            asynchronous(target, ModelDrafter(draft, sampler), tokens.to(target_dev), sampler, int(seed), out, stats,
                         ASYNC_WINDOW if window is None else window, draft_dev)
        else:
            drafter = ModelDrafter(draft, sampler, with_hidden=chosen_gate is not None and chosen_gate.needs_hidden)
            speculative(target, drafter, chosen_gate, tokens, sampler, gen, out, stats,
                        max_block=k if mode == "sd" else max_block, check_all=mode != "sprinter" or strict,
                        stop_threshold=self._stop_threshold(threshold, chosen_gate) if mode == "sd-gated" else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.wall_seconds = time.perf_counter() - start
        stats.compile_seconds = self.engine.report()

        stats.new_tokens = len(out.ids)
        stats.target_calls, stats.target_tokens, stats.target_flops = target.calls, target.tokens, target.flops
        stats.draft_calls, stats.draft_tokens, stats.draft_flops = draft.calls, draft.tokens, draft.flops
        if isinstance(chosen_gate, LearnedGate):
            params = sum(w.numel() for w in chosen_gate.verifier.parameters())
            stats.verifier_flops = 2 * params * stats.verifier_calls
        return GenerateOutput(text=out.text(), token_ids=out.ids, stats=stats, stop_reason=out.stop_reason)

    def _stop_threshold(self, threshold: float | None, gate: Gate | None) -> float:
        """sd-gated's stop threshold: the one asked for, else the loaded verifier's recommended one (stored by
        `scripts/benchmark.py --store-stop-threshold`) when it is the gate, else STOP_THRESHOLD."""
        if threshold is not None:
            return threshold
        stored = getattr(self.verifier_info, "stop_threshold", None)
        return stored if stored is not None and gate is self.gate else STOP_THRESHOLD

    def _generate_batch(self, prompt, mode: str, max_new_tokens: int, sampler: Sampler, seed: int, k: int,
                        ngram_n: int, s: int | None, i_knee: float | None, max_batch: int | None,
                        threshold: float | None, strict: bool, gate: str | Gate | None, stop: Sequence[str],
                        on_text: Callable[[str], None] | None) -> GenerateOutput | list[GenerateOutput]:
        """A list of prompts (a list of results), or one prompt in mode "ngram" (one result): sprinter.decode.batched."""
        batch = _is_batch(prompt)
        if batch and mode not in BATCH_MODES:
            raise SprinterError(f"prompt: got a batch of {len(prompt)} prompts with mode={mode!r}; expected a single "
                                f"prompt, or a mode of {BATCH_MODES}")
        if batch and on_text is not None:
            raise SprinterError("on_text: got a callback with a batch of prompts; expected streaming only for a single "
                                "prompt")
        ids = [self._prompt_ids(p) for p in prompt] if batch else [self._prompt_ids(prompt)]
        self._check_request(mode, max(map(len, ids)), max_new_tokens, k, None, threshold, strict, gate, stop, ngram_n,
                            s, i_knee, max_batch)
        outs = generate_batch(self.pair, ids, mode, max_new_tokens, sampler, seed, k, ngram_n, s, i_knee,
                              max_batch, stop, on_text, datastore=self.datastore)
        return outs if batch else outs[0]

    def model_on(self, role: str, device: torch.device) -> torch.nn.Module:
        """The pair's "draft" or "target" on `device`: the model itself on the decoder's device, else a copy
        made there on first use and kept (later changes to the pair's model do not reach the copy)."""
        model = getattr(self.pair, role)
        if _same_device(device, self.pair.device):
            return model
        key = (role, str(device))
        if key not in self.copies:
            self.copies[key] = copy.deepcopy(model).to(device)
        return self.copies[key]

    def _prompt_ids(self, prompt: str | Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise SprinterError("prompt: got ''; expected a non-empty text or a list of token ids")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else \
            [t.item() if isinstance(t, torch.Tensor) and t.dim() == 0 else t for t in prompt]
        if ids and isinstance(ids[0], list):  # a batch dimension
            if len(ids) != 1:
                raise SprinterError(f"prompt: got a batch of {len(ids)} sequences in one tensor; expected a batch "
                                    "of 1 (for a batch: a list of prompts)")
            ids = ids[0]
        if not ids:
            raise SprinterError("prompt: got no token ids; expected a non-empty text or a list of token ids")
        vocab = self.pair.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise SprinterError(f"prompt: got token id(s) {bad[:4]}; expected integers in [0, {vocab})")
        return ids

    def _check_request(self, mode: str, prompt_len: int, max_new_tokens: int, k: int, max_block: int | None,
                       threshold: float | None, strict: bool, gate: str | Gate | None, stop: Sequence[str],
                       ngram_n: int, s: int | None, i_knee: float | None, max_batch: int | None) -> Gate | None:
        """Validate one `generate` call; returns the gate "sprinter" will use (None for other modes)."""
        check_options(mode, max_new_tokens, k, max_block, threshold, strict, gate, stop, ngram_n, s, i_knee, max_batch)
        window = self.pair.max_length
        if prompt_len + max_new_tokens > window:
            raise SprinterError(f"prompt: {prompt_len} tokens + max_new_tokens={max_new_tokens} exceed the context "
                                f"window of {window} tokens; expected a shorter prompt or fewer new tokens")
        if mode == "sd-gated":  # `threshold` is the stop threshold here, not the gate's
            return self._gate(gate, None)
        return self._gate(gate, threshold) if mode == "sprinter" else None

    def _gate(self, gate: str | Gate | None, threshold: float | None) -> Gate:
        if gate is None or gate == "learned":
            if self.gate is None:
                raise SprinterError(NO_VERIFIER)
            return self.gate if threshold is None else LearnedGate(self.gate.verifier, self.gate.features, threshold)
        if gate == "confidence":
            return ConfidenceGate(CONFIDENCE_THRESHOLD if threshold is None else threshold)
        if gate == "always":
            return AlwaysFlag()
        if gate == "never":
            return NeverFlag()
        return gate


def _is_batch(prompt: object) -> bool:
    """A list of prompts (texts or token-id lists), not one prompt's token ids."""
    first = prompt[0] if isinstance(prompt, (list, tuple)) and len(prompt) > 0 else None
    return isinstance(first, (str, list, tuple)) or (isinstance(first, torch.Tensor) and first.dim() >= 1)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _same_device(a: torch.device, b: torch.device) -> bool:
    def index(d: torch.device) -> int | None:  # "cuda" means the current CUDA device; "cpu:0" is "cpu"
        if d.type == "cpu":
            return None
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return a.type == b.type and index(a) == index(b)


def _hidden_size(draft: str, trust_remote_code: bool) -> int:
    """The draft's hidden size from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(draft, trust_remote_code=trust_remote_code).hidden_size
    except (OSError, ValueError) as err:
        raise SprinterError(f"could not read the draft's config {draft!r} ({str(err).strip().splitlines()[0]})") from None


__all__ = ["BATCH_MODES", "GATES", "MODES", "STOP_THRESHOLD", "Decoder", "GenerateConfig", "GenerateOutput", "check_options", "autoregressive", "speculative"]
