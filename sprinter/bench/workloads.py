"""Benchmark workloads: which prompts, how to sample, how long (issue 24; docs/benchmark.md, "Workloads").

- `sampled` (the headline): windows of held-out code and prose, temperature 0.8, top-p 0.95 (what chat users
  run); lossless rows are checked in distribution against `ar` (sprinter.bench.distribution);
- `greedy`: the same windows at temperature 0; lossless rows are checked token for token;
- `grounded`: held-out stdlib functions cut at a line near their middle, so the prompt holds the first half
  with the names it uses and the continuation legitimately copies from it (where prompt lookup is expected to
  pay); greedy, as code is usually decoded. Its rows are labelled as such in the report.

A workload fills the benchmark options still at their defaults (temperature 0, top_p 1, max_new_tokens 128);
an option set to anything else keeps its value, and the results record both. The lengths are chosen on the
`val` split (scripts/loop_share.py --split val) so that ar's loop share in `sampled` stays under 0.15: on the
demo pair it is 0.003 at 64 tokens and 0.007 at 128 (20 val prompts; greedy: 0.66 and 0.81), so `sampled`
keeps the benchmark's 128; `grounded` stops at 64, about the length of a function's second half.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Sequence

from sprinter.bench.protocol import Prompt
from sprinter.corpus import load_documents
from sprinter.errors import SprinterError


@dataclass(frozen=True)
class Workload:
    name: str
    temperature: float
    top_p: float
    max_new_tokens: int
    prompts: str  # "windows" (code and prose, load_prompts) or "functions" (function_prompts)
    note: str  # one line for the report


WORKLOADS = {
    "sampled": Workload("sampled", 0.8, 0.95, 128, "windows",
                        "sampled at temperature 0.8, top-p 0.95 (chat settings): the headline"),
    "greedy": Workload("greedy", 0.0, 1.0, 128, "windows", "greedy decoding of held-out windows"),
    "grounded": Workload("grounded", 0.0, 1.0, 64, "functions",
                         "grounded: the continuation of a stdlib function whose first half is in the prompt; it may "
                         "copy from the prompt, so prompt lookup is expected to pay here"),
}
DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 128}  # the options a workload fills


def resolve(name: str) -> Workload:
    if name not in WORKLOADS:
        raise SprinterError(f"workload: got {name!r}; expected one of {tuple(WORKLOADS)}")
    return WORKLOADS[name]


def split_functions(text: str) -> list[tuple[str, int, int, int]]:
    """[(name, start, middle, end)] character offsets of every function of a Python source with at least 6
    lines: `middle` is the start of the line halfway through its body. [] when the text does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines >= 6:
                middle = first + lines // 2
                out.append((node.name, starts[first - 1], starts[middle - 1], starts[node.end_lineno]))
    return out


def function_prompts(tokenizer, *, dataset: str = "stdlib", split: str = "test", num_prompts: int, prompt_len: int,
                     continuation_len: int) -> list[Prompt]:
    """One prompt per source file of the split (in order) that has a fitting function: the prompt_len tokens
    ending halfway through the function (its first half, with the file's text before it when the half is
    shorter), the function's second half the continuation. A function fits when its first half has at most
    prompt_len tokens and its second half at least 16; the longest fitting function of a file is taken."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts: list[Prompt] = []
    for doc in load_documents(dataset, split):
        best = None
        for name, start, middle, end in sorted(split_functions(doc.text), key=lambda f: f[1] - f[3]):  # longest first
            if len(encode(doc.text[start:middle])) <= prompt_len and len(rest := encode(doc.text[middle:end])) >= 16:
                best = (name, middle, rest)
                break
        before = encode(doc.text[:best[1]]) if best is not None else []
        if len(before) >= prompt_len:
            prompts.append(Prompt(len(prompts), "code", f"{doc.id}:{best[0]}", tuple(before[-prompt_len:]),
                                  tuple(best[2][:continuation_len])))
            if len(prompts) == num_prompts:
                break
    if not prompts:
        raise SprinterError(f"dataset {dataset!r} ({split!r} split) has no function whose first half fits in "
                            f"{prompt_len} tokens with a second half of 16 or more; expected some (workload grounded)")
    return prompts


def workload_prompts(workload: Workload, tokenizer, *, dataset: str, split: str, domains: Sequence[str],
                     num_prompts: int, prompt_len: int, continuation_len: int) -> list[Prompt]:
    from sprinter.bench.protocol import load_prompts

    if workload.prompts == "functions":
        return function_prompts(tokenizer, dataset=dataset, split=split, num_prompts=num_prompts,
                                prompt_len=prompt_len, continuation_len=continuation_len)
    return load_prompts(tokenizer, dataset=dataset, split=split, domains=domains, num_prompts=num_prompts,
                        prompt_len=prompt_len, continuation_len=continuation_len)


__all__ = ["DEFAULTS", "WORKLOADS", "Workload", "function_prompts", "resolve", "split_functions", "workload_prompts"]
