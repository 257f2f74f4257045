"""How far an output is from the target's own: the fidelity half of the benchmark (docs/references.md §5).

Pure functions on token sequences and on the target's teacher-forced logits, plus `score_output`,
which runs the target once over prompt + output to feed them:
- `target_consistency`: the share of output tokens the target itself would have chosen greedily
  given the output's own prefix (1.0 for greedy `ar`; what an ideal lossless method keeps at 1.0);
- `mean_nll`: the target's mean negative log-likelihood of the output tokens;
- `rouge_l`: token-level ROUGE-L F1 (longest common subsequence) against a reference output;
- `exact_match`: the two token sequences are equal.
"""

from __future__ import annotations

from typing import Sequence

import torch


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row, O(len(a) len(b)))."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 = 2 P R / (P + R) with P = LCS / len(candidate), R = LCS / len(reference).
    Two empty sequences agree fully (1.0); one empty and one not share nothing (0.0)."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: Sequence[int], reference: Sequence[int]) -> bool:
    return list(candidate) == list(reference)


def first_difference(candidate: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first position where the sequences differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(candidate, reference)):
        if x != y:
            return i
    return None if len(candidate) == len(reference) else min(len(candidate), len(reference))


def target_consistency(logits: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
    """(tokens the target's argmax agrees with, tokens) for logits (N, V) predicting output (N,)."""
    return int((logits.argmax(-1) == output).sum()), int(output.numel())


def total_nll(logits: torch.Tensor, output: torch.Tensor) -> float:
    """Sum over the N output tokens of -log p(token) under logits (N, V) (computed in float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    return float(-logp.gather(-1, output.view(-1, 1)).sum())


@torch.inference_mode()
def score_output(target: torch.nn.Module, prompt: Sequence[int], output: Sequence[int], vocab_size: int) -> dict:
    """One teacher-forced target forward over prompt + output. Returns the counts that pool over prompts:
    {"tokens", "consistent", "nll_sum"} (an empty output scores nothing)."""
    if not output:
        return {"tokens": 0, "consistent": 0, "nll_sum": 0.0}
    device = next(target.parameters()).device
    ids = torch.tensor([list(prompt) + list(output)], dtype=torch.long, device=device)  # (1, T + N)
    n = len(output)
    logits = target(input_ids=ids).logits[0, -n - 1:-1, :vocab_size]  # (N, V): position i predicts output[i]
    out = ids[0, -n:]
    consistent, tokens = target_consistency(logits, out)
    return {"tokens": tokens, "consistent": consistent, "nll_sum": total_nll(logits, out)}


__all__ = ["exact_match", "first_difference", "lcs_length", "rouge_l", "score_output", "target_consistency",
           "total_nll"]
