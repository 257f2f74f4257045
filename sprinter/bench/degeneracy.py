"""How much of a text repeats itself: the benchmark's degeneracy figures (issue 24; docs/benchmark.md).

Small targets loop under greedy decoding, and drafting from the output's own n-grams is fast on loops, so
every row of the benchmark says how much of its output is repetition, beside the same figures for the corpus
text (the prompts' true continuations):

- `repeat_output`: the share of emitted tokens that complete an n-gram (n = 4) already seen earlier in the
  output (an n-gram may start in the prompt's last tokens); with an empty prompt this is `loop_share`;
- `repeat_prompt`: the share completing an n-gram not seen earlier in the output but present in the prompt
  (copying, which prompt lookup is for);
- `periodic_tail`: the share inside the output's periodic tail: its longest suffix that repeats with a period
  of at most 8 tokens, counted only when that suffix is at least 32 tokens long.
"""

from __future__ import annotations

from typing import Sequence

NGRAM = 4
MAX_PERIOD = 8
MIN_TAIL = 32
KEYS = ("repeat_prompt", "repeat_output", "periodic_tail")


def repeat_shares(prompt: Sequence[int], output: Sequence[int], n: int = NGRAM) -> tuple[float, float]:
    """(repeat_prompt, repeat_output): the shares of `output`'s tokens that complete an n-gram seen earlier in the
    prompt only, and earlier in the output (0.0, 0.0 for an empty output)."""
    if not output:
        return 0.0, 0.0
    seq = list(prompt) + list(output)
    start = len(prompt)
    in_prompt = {tuple(seq[end - n:end]) for end in range(n, start + 1)}
    in_output: set[tuple[int, ...]] = set()
    from_prompt = from_output = 0
    for end in range(max(n, start + 1), len(seq) + 1):
        gram = tuple(seq[end - n:end])
        if gram in in_output:
            from_output += 1
        elif gram in in_prompt:
            from_prompt += 1
        in_output.add(gram)
    return from_prompt / len(output), from_output / len(output)


def periodic_tail(output: Sequence[int], max_period: int = MAX_PERIOD, min_tail: int = MIN_TAIL) -> int:
    """The length of `output`'s longest suffix that repeats with a period of at most `max_period` tokens
    (x[i] == x[i - p] throughout it, its first period included), or 0 when shorter than `min_tail`."""
    best = 0
    for p in range(1, max_period + 1):
        i = len(output) - 1
        while i - p >= 0 and output[i] == output[i - p]:
            i -= 1
        run = len(output) - 1 - i  # tokens equal to the one p before them
        if run:
            best = max(best, min(run + p, len(output)))
    return best if best >= min_tail else 0


def degeneracy(prompt: Sequence[int], output: Sequence[int]) -> dict[str, float]:
    """The three figures of one output (see the module docstring); shares of len(output)."""
    from_prompt, from_output = repeat_shares(prompt, output)
    tail = periodic_tail(output)
    return {"repeat_prompt": from_prompt, "repeat_output": from_output,
            "periodic_tail": tail / len(output) if output else 0.0}


def pooled(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, float | None]:
    """The figures over many (prompt, output) pairs, pooled over tokens (each output weighs by its length)."""
    tokens = sum(len(out) for _, out in pairs)
    if not tokens:
        return {k: None for k in KEYS}
    sums = dict.fromkeys(KEYS, 0.0)
    for prompt, out in pairs:
        for k, v in degeneracy(prompt, out).items():
            sums[k] += v * len(out)
    return {k: v / tokens for k, v in sums.items()}


__all__ = ["KEYS", "MAX_PERIOD", "MIN_TAIL", "NGRAM", "degeneracy", "periodic_tail", "pooled", "repeat_shares"]
