"""One generation's options: `DecodeOptions`, the single home of their defaults and of their validation.

`Decoder.generate(prompt, options=None, **overrides)` takes one (keywords override its fields), the CLI's
`GenerateConfig` (below) extends it with the fields of a command line, and the decode
loops read the fields they need from it. Everything here is checked on construction, before any model
runs; what needs the models (the context window, a loaded verifier) is checked by the `Decoder`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sprinter.config import ModelsConfig, RuntimeConfig, SeedConfig, check_integers, check_seed, option
from sprinter.decode.acceptance import RULE_THRESHOLDS, RULES
from sprinter.decode.gates import CONFIDENCE_THRESHOLD, Gate, check_threshold
from sprinter.decode.sampling import Sampler
from sprinter.errors import SprinterError
from sprinter.pairs.load import resolve_device

MODES = ("ar", "draft", "sd", "sprinter", "sd-gated", "ngram", "async", "auto")
BATCH_MODES = ("ar", "sd", "ngram")  # the modes that decode a list of prompts together
GATED_MODES = ("sprinter", "sd-gated")  # the modes that consult a gate
GATES = ("learned", "confidence", "always", "never", "entropy", "margin")
THRESHOLD_GATES = (None, "learned", "confidence", "entropy", "margin")  # the gates that read `threshold`
RULE_MODES = ("sd", "sprinter")  # the modes whose target call may keep tokens by a relaxed rule
STOP_THRESHOLD = 0.5  # sd-gated: stop drafting once P(the block holds a rejection) exceeds this
ASYNC_WINDOW = 4  # async: most drafted tokens awaiting verification
DEMO_VERIFIER = "checkpoints/verifiers/demo"  # the verifier scripts/generate.py loads when it exists


@dataclass(frozen=True)
class DecodeOptions(SeedConfig):
    """How to generate: one frozen object that travels from `Decoder.generate` through the decode loops.

    `threshold` and `stop_threshold` are two different numbers:
    - `threshold` is the gate's: a token passes the gate iff its estimated P(accept) >= threshold (mode
      "sprinter"; None: the verifier's calibrated one, or CONFIDENCE_THRESHOLD for the confidence gate);
    - `stop_threshold` is sd-gated's: drafting stops once 1 - prod P(accept) over the block exceeds it
      (None: the loaded verifier's recommended one when it is the gate, else STOP_THRESHOLD).
    Mode "sd-gated" never reads the gate's threshold: `threshold` with it is refused.
    """

    mode: str = option("sprinter", f"one of {MODES}")
    max_new_tokens: int = option(128, "most tokens to generate")
    temperature: float = option(0.0, "0 is greedy; above 0 samples")
    top_k: int = option(0, "sample among the k likeliest tokens only (0: all)")
    top_p: float = option(1.0, "sample from the smallest set with this much probability (1.0: all)")
    stop: tuple[str, ...] = option((), "stop after any of these strings (kept in the output)")
    k: int = option(4, "tokens drafted per target call in mode 'sd'")
    max_block: int | None = option(20, "sprinter, sd-gated: call the target after this many drafted tokens "
                                       "(none: unbounded)")
    gate: str | Gate | None = option(None, f"sprinter, sd-gated: one of {GATES} (or a Gate object); none: learned "
                                           "(a verifier must be loaded)")
    threshold: float | None = option(None, "sprinter: the gate's threshold, a token passes iff P(accept) >= it; "
                                           f"none: the verifier's calibrated one, or {CONFIDENCE_THRESHOLD} for the "
                                           "confidence gate")
    stop_threshold: float | None = option(None, "sd-gated: stop drafting once 1 - prod P(accept) over the block "
                                                "exceeds this; none: the verifier's recommended one, else "
                                                f"{STOP_THRESHOLD}")
    strict: bool = option(False, "sprinter: the target also checks the passed tokens of each block (greedy: "
                                 "lossless)")
    ngram_n: int = option(3, "ngram: longest suffix (in tokens) looked up in the sequence's own text")
    ngram_k: int | None = option(None, "ngram: tokens drafted per sequence and target call; none: from the batch size "
                                 "I_knee (sprinter.decode.roofline); 0: plain decoding")
    i_knee: float | None = option(None, "ngram: tokens per target forward at the roofline knee; none: measured on the "
                                        "device at start")
    max_batch: int | None = option(None, "batched modes: most prompts decoded at once, the rest queue for the places "
                                         "of finished ones (none: all at once)")
    window: int | None = option(None, f"async: most drafted tokens awaiting verification; none: {ASYNC_WINDOW}")
    max_false_accept: float | None = option(None, "auto: also run sprinter at this false-accept budget, one the "
                                                  "verifier was calibrated for (e.g. 0.05); none: lossless modes only. "
                                                  "sprinter: the budget whose calibrated threshold the learned gate "
                                                  "uses (unless threshold is given), and that adapt_threshold holds")
    draft_device: str | None = option(None, "async: the draft's device (cpu, cuda:N); none: the decoder's")
    target_device: str | None = option(None, "async: the target's device; none: the decoder's")
    rule: str = option("exact", f"sd, sprinter: which checked tokens a target call keeps, one of {RULES}: exact "
                                "(lossless), ratio (also x with p(x) >= lambda max p; sampled: u < p(x) / (lambda "
                                "q(x))), entropy (also any x where the target's entropy >= tau nats); all but "
                                "exact are lossy. auto with max_false_accept: ratio sets the lambda of its "
                                "sd-k{k}+ratio candidates (which run while within the budget)")
    rule_threshold: float | None = option(None, "the rule's lambda in (0, 1] (ratio) or tau >= 0 in nats (entropy); "
                                                f"none: {RULE_THRESHOLDS}")
    auto_candidate: str | None = option(None, "auto: run this one candidate every round (e.g. 'ngram-k8', 'sd-k4'): "
                                              "a fixed setting on auto's own loop; none: choose before every round")
    adapt_threshold: bool = option(False, "sprinter: move the gate's threshold during the generation so that the "
                                          "share of passed tokens the target would reject stays within "
                                          "max_false_accept (sprinter.decode.budget; needs max_false_accept)")

    def __post_init__(self) -> None:
        if not isinstance(self.stop, (str, tuple)) and _is_sequence(self.stop):
            object.__setattr__(self, "stop", tuple(self.stop))  # a list is fine; the frozen object keeps a tuple
        self._check()

    def _check(self) -> None:
        mode = self.mode
        if mode not in MODES:
            raise SprinterError(f"mode: got {mode!r}; expected one of {MODES}")
        Sampler(self.temperature, self.top_k, self.top_p)  # checks temperature, top_k, top_p
        check_integers(self, ("max_new_tokens", "k", "ngram_n"))
        check_integers(self, ("max_block",), optional=True, expected="an integer >= 1, or None (unbounded)")
        check_integers(self, ("max_batch",), optional=True, expected="an integer >= 1, or None (all prompts at once)")
        check_integers(self, ("ngram_k",), 0, optional=True,
                       expected="an integer >= 0 (0: plain decoding), or None (from the batch size)")
        check_integers(self, ("window",), optional=True,
                       expected="an integer >= 1 (drafted tokens awaiting verification)")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise SprinterError(f"stop: got {self.stop!r}; expected a list of non-empty strings")
        if self.threshold is not None:
            check_threshold(self.threshold)
        st = self.stop_threshold
        if st is not None and (isinstance(st, bool) or not isinstance(st, (int, float)) or not 0 <= st <= 1):
            raise SprinterError(f"stop_threshold: got {st!r}; expected a number in [0, 1]")
        i_knee = self.i_knee
        if i_knee is not None and (isinstance(i_knee, bool) or not isinstance(i_knee, (int, float))
                                   or not 0 < i_knee < math.inf):
            raise SprinterError(f"i_knee: got {i_knee!r}; expected a finite number > 0, "
                                "or None (measured on the device)")
        # torch.Generator takes a signed 64-bit seed; anything else is refused before any model runs.
        check_seed(self.seed)
        gate = self.gate
        if isinstance(gate, str) and gate not in GATES:
            raise SprinterError(f"gate: got {gate!r}; expected one of {GATES} or a Gate object")
        if gate is not None and not isinstance(gate, str) and not callable(getattr(gate, "accept_prob", None)):
            raise SprinterError(f"gate: got {gate!r}; expected one of {GATES} or a Gate object (with accept_prob)")
        # Each option belongs to some modes; given with another it would be ignored, so it is refused.
        self._only("gate", GATED_MODES)
        self._only("threshold", ("sprinter",))
        self._only("stop_threshold", ("sd-gated",))
        self._only("strict", ("sprinter",))
        self._only("ngram_k", ("ngram",))
        self._only("i_knee", ("ngram",))
        self._only("max_batch", BATCH_MODES)
        for name in ("window", "draft_device", "target_device"):
            self._only(name, ("async",))
        self._only("max_false_accept", ("auto", "sprinter"))
        if not isinstance(self.adapt_threshold, bool):
            raise SprinterError(f"adapt_threshold: got {self.adapt_threshold!r}; expected True or False")
        self._only("adapt_threshold", ("sprinter",))
        if self.adapt_threshold and (self.max_false_accept is None or self.strict):
            raise SprinterError("adapt_threshold: got True with " + ("strict=True (the target checks every token: "
                                "nothing to hold)" if self.strict else "max_false_accept=None") + "; expected a "
                                "false-accept budget to hold (max_false_accept=0.05) and strict=False")
        self._check_rule()
        self._only("auto_candidate", ("auto",))
        fa = self.max_false_accept
        if fa is not None and (isinstance(fa, bool) or not isinstance(fa, (int, float)) or not 0 < fa < 1):
            raise SprinterError(f"max_false_accept: got {fa!r}; expected a false-accept budget in (0, 1) that the "
                                "verifier was calibrated for (e.g. 0.05), or None (lossless modes only)")
        if mode == "sprinter" and fa is not None and not self.adapt_threshold and gate not in (None, "learned"):
            raise SprinterError(f"max_false_accept: got {fa!r} with gate={gate!r} and adapt_threshold=False; expected "
                                "the learned gate (its calibrated threshold for that budget) or adapt_threshold=True")
        if mode == "auto" and self.max_block is None:
            raise SprinterError("max_block: got None with mode='auto'; expected an integer >= 1 (auto prices its "
                                "gated candidates with a bounded block)")
        if self.threshold is not None and gate not in THRESHOLD_GATES:
            raise SprinterError(f"threshold: got {self.threshold!r} with gate={gate!r}; expected it only with one of "
                                f"the gates {THRESHOLD_GATES[1:]}")
        if self.ngram_k is not None and i_knee is not None:
            raise SprinterError(f"i_knee: got {i_knee!r} with ngram_k={self.ngram_k!r}; expected at most one (ngram_k "
                                "fixes the draft length, i_knee derives it from the batch size)")
        for device in (self.draft_device, self.target_device):
            if device is not None:
                resolve_device(device)  # the device must exist on this machine

    def _check_rule(self) -> None:
        rule, value = self.rule, self.rule_threshold
        if rule not in RULES:
            raise SprinterError(f"rule: got {rule!r}; expected one of {RULES}")
        auto_ratio = self.mode == "auto" and rule == "ratio" and self.max_false_accept is not None
        if rule != "exact" and self.mode not in RULE_MODES and not auto_ratio:
            raise SprinterError(f"rule: got {rule!r} with mode={self.mode!r}" + (
                " and max_false_accept=None; expected rule='ratio' with a false-accept budget (auto's lossy "
                "candidates)" if self.mode == "auto" else f"; expected it only with a mode of {RULE_MODES}"))
        if value is None:
            return
        if rule == "exact":
            raise SprinterError(f"rule_threshold: got {value!r} with rule='exact'; expected it only with rule 'ratio' "
                                "(lambda) or 'entropy' (tau)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 < value <= 1 if rule == "ratio" else 0 <= value < math.inf):
            expected = "lambda in (0, 1]" if rule == "ratio" else "tau, a finite number of nats >= 0"
            raise SprinterError(f"rule_threshold: got {value!r} with rule={rule!r}; expected {expected}")

    def _only(self, name: str, modes: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value is not None and value is not False and self.mode not in modes:
            expected = f"mode={modes[0]!r}" if len(modes) == 1 else f"a mode of {modes}"
            raise SprinterError(f"{name}: got {value!r} with mode={self.mode!r}; expected it only with {expected}")

    @property
    def sampler(self) -> Sampler:
        """How logits become a distribution (temperature, top_k, top_p); draft and target share it."""
        return Sampler(self.temperature, self.top_k, self.top_p)

    @property
    def acceptance(self) -> tuple[str, float]:
        """(rule, threshold) at the target's call, the rule's default threshold filled in."""
        if self.rule_threshold is not None:
            return self.rule, float(self.rule_threshold)
        return self.rule, RULE_THRESHOLDS.get(self.rule, 0.0)

    @property
    def async_window(self) -> int:
        return ASYNC_WINDOW if self.window is None else self.window

    def replace(self, **changes: object) -> DecodeOptions:
        """A copy with some fields changed (and checked again); an unknown name is one clear error."""
        names = {f.name for f in dataclasses.fields(DecodeOptions)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise SprinterError(f"options: got unknown option(s) {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **changes)


def _is_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple))



@dataclass(frozen=True)
class GenerateConfig(DecodeOptions, ModelsConfig, RuntimeConfig):
    """scripts/generate.py's options: a generation's (`DecodeOptions`, whose defaults and checks it inherits)
    and the command line's own (what to decode, which models, where). Validated on construction, before any
    model runs; `options()` is the `DecodeOptions` part, as `Decoder.generate` takes it."""

    prompt: str = option("def fibonacci(n):", "text to continue")
    prompts_file: str | None = option(None, "decode every prompt of this file as one batch (replaces --prompt): one "
                                            "prompt per line, or one JSON string per line in a .jsonl file")
    verifier: str | None = option(None, f"verifier checkpoint; none: {DEMO_VERIFIER} when it exists")
    datastore: str | None = option(None, "ngram: also look up this n-gram datastore (scripts/build_datastore.py)")
    static_cache: bool = option(False, "single-prompt modes: static KV caches written by position (else dynamic ones)")
    compile: bool = option(False, "single-prompt modes: torch.compile the draft step and the target's verify forward "
                                  "(static caches implied; compiling takes seconds to minutes, once per run)")
    json: bool = option(False, "print one JSON object (text, token ids, stats) instead of streaming text")
    compare: bool = option(False, "also decode the prompt with ar (the target alone) and print both texts, both "
                                  "speeds, the speedup and whether the texts are identical (lossless modes) or how "
                                  "far they differ (tokens that differ, the target's NLL ratio)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompts_file is not None and self.mode not in BATCH_MODES:
            raise SprinterError(f"prompts_file: got {self.prompts_file!r} with mode={self.mode!r}; expected a mode of "
                                f"{BATCH_MODES} (the modes that decode a batch)")
        if self.datastore is not None and self.mode != "ngram":
            raise SprinterError(f"datastore: got {self.datastore!r} with mode={self.mode!r}; expected it only with "
                                "mode='ngram'")
        if self.compare and (self.prompts_file is not None or self.mode == "ar"):
            raise SprinterError(f"compare: got it with mode={self.mode!r}" + (
                f" and prompts_file={self.prompts_file!r}; expected one --prompt" if self.prompts_file is not None
                else "; expected a mode to compare with ar (sd, sprinter, ngram, ...)"))
        check_integers(self, ("threads",), minimum=0)

    @property
    def engine(self) -> str:
        """`Decoder.from_pretrained`'s engine: "compiled" (--compile), "static" (--static-cache) or "eager"."""
        return "compiled" if self.compile else "static" if self.static_cache else "eager"

    def options(self) -> DecodeOptions:
        """The generation's options alone."""
        return DecodeOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DecodeOptions)})

__all__ = ["ASYNC_WINDOW", "BATCH_MODES", "RULE_MODES", "THRESHOLD_GATES",
           "DEMO_VERIFIER", "GATED_MODES", "GATES", "MODES", "STOP_THRESHOLD",
           "DecodeOptions", "GenerateConfig"]
