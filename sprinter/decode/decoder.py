"""The decode API: `Decoder.from_pretrained(...)`, then `decoder.generate(prompt, mode=...)`.

Modes (docs/references.md §1 and §5):
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
  from n-gram matches in its own text (and a datastore), s tokens long, s from the batch size
  (sprinter.decode.roofline);
- "async": lossless speculative decoding with the draft running ahead in a thread of its own, maybe on
  another device, while the target verifies (AMUSD, docs/references.md §3; sprinter.decode.asynchronous);
- "auto": before every target call, whichever of ar, sd-k{k}, sd-gated, ngram-k{k} (and sprinter at an allowed
  false-accept budget) the latency model predicts fastest for this request (sprinter.decode.auto).

A list of prompts is decoded as one batch in modes "ar", "sd" and "ngram" (sprinter.decode.batched, which
also runs "ngram" for a single prompt) and gives a list of results, one per prompt.

Two loops (sprinter.decode.loops) serve a single prompt in the first five modes: `autoregressive` (one model) and
`speculative` (a drafter, an optional gate and the target). A generation's options are one frozen
`DecodeOptions` (sprinter.decode.options) that each loop reads; drafts come through one interface
(sprinter.decode.drafters), implemented by the draft model and by n-gram drafting. The batched loop
(sprinter.decode.batched) and the two-thread loop (sprinter.decode.asynchronous) live beside them.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from sprinter.decode.asynchronous import asynchronous
from sprinter.decode.auto import AutoController, make_controller, run_auto
from sprinter.decode.batched import generate_batch
from sprinter.decode.cache import CachedLM
from sprinter.decode.costs import CostProfile, cost_profile
from sprinter.decode.datastore import Datastore
from sprinter.decode.drafters import ModelDrafter
from sprinter.decode.emit import Emitter, GenerateOutput
from sprinter.decode.engine import Engine
from sprinter.decode.gates import NO_VERIFIER, Gate, LearnedGate, load_learned_gate, make_gate
from sprinter.decode.loops import GateRule, LoopState, autoregressive, speculative
from sprinter.decode.options import (
    BATCH_MODES,
    GATED_MODES,
    GATES,
    MODES,
    STOP_THRESHOLD,
    DecodeOptions,
    GenerateConfig,
)
from sprinter.decode.prompts import is_batch, prompt_ids
from sprinter.decode.stats import DecodeStats, check_promise
from sprinter.errors import SprinterError, warn
from sprinter.files import read_json
from sprinter.pairs.load import (
    Pair,
    fingerprint,
    load_pair,
    resolve_device,
    resolve_dtype,
)

ENGINES = ("eager", "static", "compiled")  # Decoder.from_pretrained(engine=...): how the single-prompt loops run
# A verifier trained on argmax labels predicts whether the target's argmax is the drafted token; at temperature > 0
# the event that costs fidelity is the speculative-sampling rejection (sprinter.decode.budget), another event.
GREEDY_AT_T = ("verifier {verifier!r} was trained on greedy (argmax) labels and is used at temperature {temperature}, "
               "where the target rejects by speculative sampling: its calibrated false-accept budget does not carry "
               "over. Measure it (stats.false_accept_rate; scripts/budget.py), hold it with adapt_threshold=True, "
               "or train on data collected at this temperature with --label-rule soft (docs/decoding.md)")


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
        self.verifier_dir: Path | None = None  # the learned gate's checkpoint folder (its metrics.json), when known
        # mode "auto": the pair's cost profile by key (pair | device | dtype | threads); `cost_profile` fills it.
        # A caller (or a test) may set `profile` to use that profile whatever the key.
        self.profiles: dict[str, object] = {}
        self.profile = None
        self.predictions: dict[tuple, dict] = {}  # mode "auto": predicted ms/token by setting, shared by its requests
        self.draft_prior: float | None = None  # mode "auto": P(a drafted token is accepted) to start from (the
        # benchmark sets its calibration prompts'); None: the pair's greedy agreement (pair.json)

    @classmethod
    def from_pretrained(cls, draft: str, target: str, verifier: str | Path | None = None, device: str = "auto",
                        dtype: str = "auto", trust_remote_code: bool = False,
                        datastore: str | Path | None = None, engine: str = "eager") -> "Decoder":
        """Load the pair (Hub names or local folders) and, if given, a verifier trained for this draft and an
        n-gram datastore (scripts/build_datastore.py) for mode "ngram". The verifier is checked against the
        draft (fingerprint, hidden size) and the datastore's files before any model is loaded; the datastore's
        tokenizer against the pair's once it is loaded.

        `engine`, one of ENGINES: the single-prompt modes decode with dynamic KV caches ("eager", the reference),
        with static ones written by position ("static"), or also torch.compile the draft's step and the target's
        verify forward ("compiled", static caches implied; sprinter.decode.engine; each generation's
        `stats.compile_seconds` says what compiling cost it, paid once per Decoder)."""
        if engine not in ENGINES:
            raise SprinterError(f"engine: got {engine!r}; expected one of {ENGINES}")
        for name, value in (("draft", draft), ("target", target), ("verifier", verifier), ("datastore", datastore)):
            if not (isinstance(value, (str, Path)) and str(value) != "" or value is None and name in ("verifier",
                                                                                                  "datastore")):
                raise SprinterError(f"{name}: got {value!r}; expected a path or Hub name (a non-empty str or Path)"
                                    f"{', or None' if name in ('verifier', 'datastore') else ''}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        gate = info = None
        if verifier is not None:
            gate, info = load_learned_gate(verifier, fingerprint(draft), _hidden_size(draft, trust_remote_code),
                                           dev, dt)
        store = Datastore.open(datastore) if datastore is not None else None
        pair = load_pair(draft, target, dev, dt, trust_remote_code)
        if info is not None:
            from sprinter.verifier import check_vocabulary

            check_vocabulary(info, pair.vocab_size, verifier)
            if getattr(info, "rates", None) == {}:  # a checkpoint from before the rates: its metrics.json has them
                info.rates = _rates_beside(verifier)
        if store is not None:
            store.check_tokenizer(pair.tokenizer)
        decoder = cls(pair, gate, info, store, Engine(dev, static=engine == "static",
                                                        compile=engine == "compiled"))
        decoder.verifier_dir = Path(verifier) if verifier is not None else None
        return decoder

    @property
    def tokenizer(self):
        return self.pair.tokenizer

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[int] | torch.Tensor | Sequence[str | Sequence[int]],
                 options: DecodeOptions | None = None, *, on_text: Callable[[str], None] | None = None,
                 **overrides: object) -> GenerateOutput | list[GenerateOutput]:
        """Generate after `prompt` (text, or token ids with a batch of 1) as `options` say (a `DecodeOptions`;
        None: the defaults), with any of its fields overridden by keyword:
        `decoder.generate("def f(x):", mode="sd", k=4, max_new_tokens=64)`. DecodeOptions documents each
        option, and which mode reads it (`threshold` is the gate's, `stop_threshold` sd-gated's).

        A list of prompts (texts or token-id lists) is decoded as one batch in modes "ar", "sd" and "ngram" and
        gives a list of results, one per prompt, each with its own stats (`wall_seconds` is the batch's); the
        other modes take a batch of one and give one result. Generation stops at EOS, at any of `stop` (the
        stop string is kept in the output) or after max_new_tokens. `on_text` receives text as it is decided
        (a single prompt only)."""
        # 0. Every check happens before any model runs.
        options = self._options(options, overrides)
        if on_text is not None and not callable(on_text):
            raise SprinterError(f"on_text: got {on_text!r}; expected a function of one str, or None")
        mode = options.mode
        if is_batch(prompt) and len(prompt) == 1 and mode not in BATCH_MODES:
            prompt = prompt[0]  # a batch of one, in a mode that decodes one prompt at a time
        if is_batch(prompt) or mode == "ngram":
            return self._generate_batch(prompt, options, on_text)
        ids = self._prompt_ids(prompt)
        gate = self._check_request(options, len(ids))
        if mode == "sd-gated":
            options = options.replace(stop_threshold=self.stop_threshold(options.stop_threshold, gate))
        device = self.pair.device
        # async may run each model on a device of its own (a copy made once); every other mode on the decoder's
        target_dev, draft_dev = (device if d is None else resolve_device(d)
                                 for d in (options.target_device, options.draft_device))
        out = Emitter(self.tokenizer, options.max_new_tokens, self.tokenizer.eos_token_id, options.stop, on_text)
        state = LoopState(options.sampler, torch.Generator(device=target_dev).manual_seed(int(options.seed)), out,
                          DecodeStats(mode=mode), options.acceptance)
        capacity = len(ids) + options.max_new_tokens  # neither cache ever holds more than the prompt and the budget
        eager = options.mode == "async"  # its draft runs in a thread of its own: no compiled graphs there
        target = self.engine.lm(self.model_on("target", target_dev), self.pair.vocab_size, capacity, not eager)
        draft = self.engine.lm(self.model_on("draft", draft_dev), self.pair.vocab_size, capacity, not eager)

        start = time.perf_counter()
        if mode in ("ar", "draft"):
            tokens = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
            autoregressive(target if mode == "ar" else draft, tokens, state)
        elif mode == "auto":  # its gated rounds use the loaded verifier; never fused (the gate changes by round)
            run_auto(self, target, self._drafter(draft, options, self.gate, fuse=False), ids, options, state)
        elif mode == "async":
            tokens = torch.tensor([ids], dtype=torch.long, device=target_dev)  # (1, T)
            asynchronous(target, self._drafter(draft, options, None), tokens, options=options, state=state,
                         draft_device=draft_dev)
        else:
            speculative(target, self._drafter(draft, options, gate), ids, options=options, gate=gate, state=state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = state.stats
        stats.wall_seconds = time.perf_counter() - start
        stats.compile_seconds = self.engine.report()

        stats.new_tokens = len(out.ids)
        if mode != "auto":
            stats.modes = {mode: stats.new_tokens}
        stats.target_calls, stats.target_tokens, stats.target_flops = target.calls, target.tokens, target.flops
        stats.draft_calls, stats.draft_tokens, stats.draft_flops = draft.calls, draft.tokens, draft.flops
        learned = self.gate if mode == "auto" else gate  # auto's gated rounds use the loaded verifier
        if isinstance(learned, LearnedGate):
            params = sum(w.numel() for w in learned.verifier.parameters())
            stats.verifier_flops = 2 * params * stats.verifier_calls
        if mode == "sprinter" and not options.strict and isinstance(gate, LearnedGate) and self.gate is not None \
                and gate.verifier is getattr(self.gate, "verifier", None) and hasattr(self.verifier_info, "rates_at"):
            check_promise(stats, self.verifier_info.rates_at(gate.threshold), f"verifier {str(self.verifier_dir)!r}")
        return GenerateOutput(text=out.text(), token_ids=out.ids, stats=stats, stop_reason=out.stop_reason)

    def make_controller(self, options: DecodeOptions) -> AutoController:
        """Mode "auto"'s controller for one request (sprinter.decode.auto.make_controller; a test may replace this
        method to drive the rounds itself)."""
        return make_controller(self, options)

    def cost_profile(self, budget_s: float = 2.0) -> CostProfile:
        """The pair's cost profile on this device, dtype and thread count (sprinter.decode.costs.cost_profile)."""
        return cost_profile(self, budget_s)

    @staticmethod
    def _options(options: DecodeOptions | None, overrides: dict[str, object]) -> DecodeOptions:
        """`options` (None: the defaults) with the keyword overrides applied; checked on construction."""
        if options is None:
            return DecodeOptions(**overrides) if overrides else DecodeOptions()
        if not isinstance(options, DecodeOptions):
            raise SprinterError(f"options: got {options!r}; expected a DecodeOptions, or None (the others by keyword, "
                                "e.g. max_new_tokens=64)")
        return options.replace(**overrides) if overrides else options

    def _drafter(self, draft: CachedLM, options: DecodeOptions, gate: Gate | None, *, fuse: bool = True
                 ) -> ModelDrafter:
        """The draft model as a drafter: its steps return the hidden states `gate` reads (none without a gate),
        and with `fuse` (and a compiling engine) the gate runs inside the draft's compiled step."""
        sampler = options.sampler
        fused = self.engine.fused(draft.model, gate, self.pair.vocab_size, sampler.greedy) \
            if fuse and gate is not None else None
        return ModelDrafter(draft, sampler, hidden_layers=0 if gate is None else gate.hidden_layers, fused=fused)

    def stop_threshold(self, threshold: float | None, gate: Gate | None) -> float:
        """sd-gated's stop threshold: the one asked for, else the loaded verifier's recommended one (stored by
        `scripts/benchmark.py --store-stop-threshold`) when it is the gate, else STOP_THRESHOLD."""
        if threshold is not None:
            return threshold
        stored = getattr(self.verifier_info, "stop_threshold", None)
        return stored if stored is not None and gate is self.gate else STOP_THRESHOLD

    def _generate_batch(self, prompt, options: DecodeOptions, on_text: Callable[[str], None] | None
                        ) -> GenerateOutput | list[GenerateOutput]:
        """A list of prompts (a list of results), or one prompt in mode "ngram" (one result):
        sprinter.decode.batched."""
        batch = is_batch(prompt)
        if batch and options.mode not in BATCH_MODES:
            raise SprinterError(f"prompt: got a batch of {len(prompt)} prompts with mode={options.mode!r}; expected a "
                                f"single prompt, or a mode of {BATCH_MODES}")
        if batch and options.rule != "exact":
            raise SprinterError(f"rule: got {options.rule!r} with a batch of {len(prompt)} prompts; expected a single "
                                "prompt (the batched loop keeps tokens by the exact rule only)")
        if batch and on_text is not None:
            raise SprinterError("on_text: got a callback with a batch of prompts; expected streaming only for a single "
                                "prompt")
        ids = [self._prompt_ids(p) for p in prompt] if batch else [self._prompt_ids(prompt)]
        self._check_request(options, max(map(len, ids)))
        outs = generate_batch(self.pair, ids, options, on_text=on_text, datastore=self.datastore)
        for out in outs:
            out.stats.modes = {options.mode: out.stats.new_tokens}
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
        return prompt_ids(prompt, self.tokenizer, self.pair.vocab_size)

    def _check_request(self, options: DecodeOptions, prompt_len: int) -> Gate | None:
        """The checks that need the pair or the verifier (`options` checked itself); returns the gate a gated
        mode will use (None for the other modes)."""
        window, budget = self.pair.max_length, options.max_new_tokens
        if prompt_len + budget > window:
            raise SprinterError(f"prompt: {prompt_len} tokens + max_new_tokens={budget} exceed the context "
                                f"window of {window} tokens; expected a shorter prompt or fewer new tokens")
        if options.mode == "auto" and options.max_false_accept is not None:
            self._check_budget(options.max_false_accept, options.temperature)
        threshold = options.threshold
        if options.mode == "sprinter" and options.max_false_accept is not None and threshold is None \
                and options.gate in (None, "learned"):  # the learned gate at that budget's calibrated threshold
            self._check_budget(options.max_false_accept, options.temperature)
            threshold = self.verifier_info.threshold_for(options.max_false_accept, options.temperature)
        if options.mode == "sprinter" and not options.strict and options.temperature > 0 \
                and options.gate in (None, "learned") and getattr(self.verifier_info, "label_rule", None) == "greedy" \
                and str(float(options.temperature)) not in self.verifier_info.kept_thresholds:  # calibrated there
            warn(GREEDY_AT_T.format(verifier=str(self.verifier_dir), temperature=options.temperature))
        return make_gate(options.gate, threshold, self.gate) if options.mode in GATED_MODES else None

    def _check_budget(self, budget: float, temperature: float) -> None:
        """max_false_accept (auto; sprinter's learned gate) must be a budget the loaded verifier was calibrated for
        (on collected rows, or at this temperature on decode-time rows)."""
        if self.gate is None:
            raise SprinterError(f"max_false_accept: got {budget!r}, and this decoder has no verifier; expected a "
                                "verifier (verifier=DIR, CLI --verifier DIR) calibrated for that budget, or no "
                                "max_false_accept (lossless modes only)")
        budgets = self.verifier_info.budgets_at(temperature)
        if float(budget) not in budgets:
            raise SprinterError(f"max_false_accept: got {budget!r}; expected one of the verifier's calibrated budgets "
                                f"{budgets} (retrain with --budgets, or add one with scripts/calibrate.py --budgets)")


def _rates_beside(verifier: str | Path) -> dict:
    """The calibrated rates in the metrics.json written beside a verifier checkpoint by scripts/train.py ({} when
    there is none, or it has another shape: the decode-time guard then has nothing to compare with)."""
    from sprinter.verifier import calibrated_rates, checkpoint_file

    metrics = checkpoint_file(verifier).parent / "metrics.json"
    try:
        return calibrated_rates(read_json(metrics, "metrics.json")["verifier"])
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: a SprinterError (not UTF-8, not JSON)
        return {}


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
        raise SprinterError(f"could not read the draft's config {draft!r} "
                            f"({str(err).strip().splitlines()[0]})") from None


__all__ = ["BATCH_MODES", "GATED_MODES", "GATES", "MODES", "NO_VERIFIER", "STOP_THRESHOLD", "DecodeOptions", "Decoder",
           "GateRule", "GenerateConfig", "GenerateOutput", "autoregressive", "speculative"]
