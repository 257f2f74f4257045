"""One prompt, plain decoding beside a chosen mode: what `scripts/generate.py --compare` prints.

`compare` warms both up, then decodes the prompt with `ar` (the target alone) and with the mode, and
scores both outputs with the target. A lossless mode at temperature 0 must give `ar`'s very tokens,
so the check is identity; a lossy one (sprinter with its learned gate, `draft`, auto with a
false-accept budget) is measured by how many tokens differ and by the target's NLL of its output over
the target's NLL of `ar`'s (docs/references.md §5). At temperature > 0 lossless modes match `ar` in
distribution, not token for token: the NLL ratio is then the figure to read.

`loop_share` says how much of an output repeats itself: the toy pairs' greedy text loops, which
flatters drafting from the output's own n-grams (README, Quickstart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sprinter.bench.fidelity import first_difference, score_output
from sprinter.bench.protocol import PromptLenConfig
from sprinter.config import PairSourceConfig, ThreadsConfig, check_integers, option
from sprinter.decode.options import DecodeOptions
from sprinter.errors import SprinterError

WARMUP_TOKENS = 8  # a short run of each mode first, so neither timed run pays for first-call allocations
LOSSLESS_MODES = ("ar", "sd", "sd-gated", "ngram", "async")
SHARED_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")  # ar's run takes these


def is_lossless(options: DecodeOptions) -> bool:
    """Whether the mode keeps the target's output distribution (at temperature 0: its very tokens). sprinter is
    lossless only when every passed token is checked (`strict`) or its gate flags every token (`always`); auto
    only without a false-accept budget. A relaxed rule at the target's call (`rule` other than "exact") is lossy in
    every mode."""
    if options.rule != "exact":
        return False
    if options.mode in LOSSLESS_MODES:
        return True
    if options.mode == "sprinter":
        return bool(options.strict) or options.gate == "always"
    if options.mode == "auto":
        return options.max_false_accept is None
    return False  # draft: the draft model alone


def tokens_differing(candidate: Sequence[int], reference: Sequence[int]) -> int:
    """Positions where the two sequences differ, counting each token one has beyond the other's end."""
    return sum(x != y for x, y in zip(candidate, reference)) + abs(len(candidate) - len(reference))


def loop_share(output: Sequence[int], n: int = 4) -> float:
    """The share of `output`'s tokens that complete an n-gram already seen earlier in `output` (0.0 for an output
    shorter than n + 1 tokens). Text that loops scores near 1; held-out stdlib source, in 128-token windows,
    about 0.1 at n = 4."""
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for end in range(n, len(output) + 1):
        gram = tuple(output[end - n:end])
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(output) if len(output) > n else 0.0


@dataclass
class Comparison:
    """`ar` and the mode on one prompt: both outputs (sprinter.decode.emit.GenerateOutput) and the figures."""

    prompt: str
    ar: object
    accelerated: object
    lossless: bool
    temperature: float  # 0: greedy, where a lossless mode must give ar's very tokens
    target_nll: dict[str, float]  # mean NLL per token of each output under the target, keyed "ar" and "accelerated"
    loop_share: dict[str, float]  # loop_share of each output, same keys

    @property
    def speedup(self) -> float:
        """ar's seconds per token over the mode's (> 1: the mode is faster)."""
        ar, fast = self.ar.stats, self.accelerated.stats
        return (ar.wall_seconds / max(ar.new_tokens, 1)) / max(fast.wall_seconds / max(fast.new_tokens, 1), 1e-12)

    @property
    def identical(self) -> bool:
        return self.ar.token_ids == self.accelerated.token_ids

    @property
    def tokens_differing(self) -> int:
        return tokens_differing(self.accelerated.token_ids, self.ar.token_ids)

    @property
    def first_difference(self) -> int | None:
        return first_difference(self.accelerated.token_ids, self.ar.token_ids)

    @property
    def nll_ratio(self) -> float | None:
        """The mode's target NLL per token over ar's (None when ar's is 0: nothing to compare with)."""
        ar = self.target_nll["ar"]
        return self.target_nll["accelerated"] / ar if ar > 0 else None

    def to_dict(self) -> dict:
        def run(out) -> dict:
            return {"text": out.text, "token_ids": out.token_ids, "stop_reason": out.stop_reason,
                    "stats": out.stats.to_dict()}

        return {"prompt": self.prompt, "mode": self.accelerated.stats.mode, "ar": run(self.ar),
                "accelerated": run(self.accelerated), "speedup": round(self.speedup, 4), "lossless": self.lossless,
                "temperature": self.temperature,
                "identical": self.identical, "tokens_differing": self.tokens_differing,
                "first_difference": self.first_difference,
                "target_nll": {k: round(v, 4) for k, v in self.target_nll.items()},
                "nll_ratio": None if self.nll_ratio is None else round(self.nll_ratio, 4),
                "loop_share": {k: round(v, 4) for k, v in self.loop_share.items()}}


def compare(decoder, prompt: str, options: DecodeOptions) -> Comparison:
    """Decode `prompt` with `ar` and with `options.mode` (same options otherwise, same seed), each after a short
    warm-up, and score both outputs with the target."""
    if options.mode == "ar":
        raise SprinterError("compare: got mode='ar'; expected a mode to compare with ar (sd, sprinter, ngram, ...)")
    # ar reads only what and how to sample; the mode's own options (gate, k, ...) would be refused with it
    plain = DecodeOptions(mode="ar", **{name: getattr(options, name) for name in SHARED_OPTIONS})
    for opts in (plain, options):
        decoder.generate(prompt, opts.replace(max_new_tokens=min(WARMUP_TOKENS, options.max_new_tokens)))
    ar, fast = decoder.generate(prompt, plain), decoder.generate(prompt, options)
    ids = decoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    nll, loops = {}, {}
    for key, out in (("ar", ar), ("accelerated", fast)):
        scored = score_output(decoder.pair.target, ids, out.token_ids, decoder.pair.vocab_size)
        nll[key] = scored["nll_sum"] / scored["tokens"] if scored["tokens"] else 0.0
        loops[key] = loop_share(out.token_ids)
    return Comparison(prompt=prompt, ar=ar, accelerated=fast, lossless=is_lossless(options),
                      temperature=float(options.temperature), target_nll=nll,
                      loop_share=loops)


__all__ = ["Comparison", "LOSSLESS_MODES", "compare", "is_lossless", "loop_share", "tokens_differing"]


@dataclass(frozen=True)
class LoopShareConfig(PromptLenConfig, PairSourceConfig, ThreadsConfig):
    """scripts/loop_share.py's options: how much of a pair's `ar` output loops, greedy and sampled, beside the
    held-out text itself (README, Quickstart)."""

    num_prompts: int = option(20, "held-out prompts of SPLIT (code and prose taking turns)")
    max_new_tokens: int = option(128, "tokens `ar` generates per prompt; also the held-out text's window length")
    temperature: float = option(0.8, "the sampled run's temperature (the greedy run is temperature 0)")
    top_p: float = option(0.95, "the sampled run's nucleus")
    threads: int = option(1, "CPU threads for torch")
    split: str = option("val", "corpus split of the prompts and the text (val: where the benchmark's workload "
                               "lengths are chosen; test: where they are reported)")

    def __post_init__(self) -> None:
        check_integers(self, ("num_prompts", "prompt_len", "max_new_tokens", "threads"))


def measure_loop_share(cfg: LoopShareConfig) -> dict:
    """The mean `loop_share` of `ar`'s output over held-out prompts, greedy and sampled (seed = prompt index), with
    the number of outputs over 0.5, and the same figure for the SPLIT text cut into windows of
    max_new_tokens tokens."""
    import statistics

    import torch

    from sprinter.bench.protocol import load_prompts
    from sprinter.corpus import load_documents
    from sprinter.decode.decoder import Decoder
    from sprinter.pairs.build import resolve_pair

    torch.set_num_threads(cfg.threads)
    draft, target = resolve_pair(cfg.pair)
    dec = Decoder.from_pretrained(draft=draft, target=target, device="cpu", dtype="float32")
    prompts = load_prompts(dec.tokenizer, split=cfg.split, num_prompts=cfg.num_prompts, prompt_len=cfg.prompt_len)
    result: dict = {"pair": cfg.pair, "split": cfg.split, "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens}
    for name, sampling in (("greedy", {"temperature": 0.0}),
                           ("sampled", {"temperature": cfg.temperature, "top_p": cfg.top_p})):
        shares = [loop_share(dec.generate(list(p.ids), mode="ar", max_new_tokens=cfg.max_new_tokens, seed=i,
                                          **sampling).token_ids) for i, p in enumerate(prompts)]
        result[name] = {**sampling, "mean": round(statistics.mean(shares), 4),
                        "outputs_over_half": sum(s > 0.5 for s in shares)}
    n = cfg.max_new_tokens
    windows = [ids[s:s + n] for doc in load_documents("stdlib", cfg.split)
               for ids in [dec.tokenizer(doc.text, add_special_tokens=False)["input_ids"]]
               for s in range(0, len(ids) - n, n)]
    result["held_out_text"] = {"mean": round(statistics.mean(map(loop_share, windows)), 4), "windows": len(windows)}
    return result
