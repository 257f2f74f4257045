"""Gates: decide, from the draft alone, whether a drafted token may skip the target.

One small interface: `accept_prob(step, position)` estimates P(the target would accept x) and a
token PASSES iff that estimate >= `threshold`; otherwise it is FLAGGED and the target is called.
- `LearnedGate`: the trained verifier (sprinter.verifier), reading the draft's hidden state etc.
- `ConfidenceGate`: the draft's own probability q(x), as Hugging Face assisted generation does
  (`assistant_confidence_threshold`, default 0.4; docs/references.md §2): the baseline to beat.
- `AlwaysFlag` / `NeverFlag`: the two limits (SPRINTER becomes lossless / becomes the draft alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from sprinter.decode.drafters import DraftStep
from sprinter.decode.sampling import entropy
from sprinter.errors import SprinterError

CONFIDENCE_THRESHOLD = 0.4  # Hugging Face's default assistant_confidence_threshold


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise SprinterError(f"threshold: got {threshold!r}; expected a number in [0, 1]")
    return float(threshold)


def prob_of(q: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """q(x) as a 0-d tensor. A gather, not `q[token]`: indexing by a tensor reads its value on the host, which
    would break the fused draft step's graph in two (sprinter.decode.engine).  # (V,), () -> ()"""
    return q.gather(-1, token.reshape(1)).reshape(())


class Gate(Protocol):
    threshold: float
    needs_hidden: bool  # whether the drafter must return its hidden state

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        """() estimated P(target accepts step.token); `position` is its 0-based index in the block."""


class AlwaysFlag:
    """Flags every token: the target checks each one (SPRINTER reduces to a lossless scheme)."""

    threshold = 1.0
    needs_hidden = False

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return torch.zeros((), device=step.q.device)


class NeverFlag:
    """Passes every token: the target is called only at max_block (SPRINTER reduces to the draft)."""

    threshold = 0.0
    needs_hidden = False

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return torch.ones((), device=step.q.device)


class ConfidenceGate:
    """Passes x while the draft's own probability q(x) >= threshold."""

    needs_hidden = False

    def __init__(self, threshold: float = CONFIDENCE_THRESHOLD):
        self.threshold = check_threshold(threshold)

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return prob_of(step.q_soft, step.token)


class LearnedGate:
    """A trained verifier: sigmoid(verifier(features)) is P(accept). Features follow the verifier
    contract: hidden (N, H), token_id (N,) long, draft_prob, draft_entropy, position (N,) float."""

    def __init__(self, verifier: torch.nn.Module, features: tuple[str, ...], threshold: float):
        self.verifier = verifier
        self.features = tuple(features)
        self.threshold = check_threshold(threshold)
        self.needs_hidden = "hidden" in self.features
        weight = next(verifier.parameters(), None)
        self.dtype = weight.dtype if weight is not None else torch.float32  # features are fed in its dtype

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        inputs = {name: self._feature(name, step, position)[None] for name in self.features}
        return torch.sigmoid(self.verifier(inputs).float()).reshape(())

    def _feature(self, name: str, step: DraftStep, position: int) -> torch.Tensor:
        device = step.q.device
        if name == "hidden":
            return step.hidden.to(self.dtype)
        if name == "token_id":
            return step.token
        if name == "draft_prob":
            return prob_of(step.q_soft, step.token).to(self.dtype)
        if name == "draft_entropy":
            return entropy(step.q_soft).to(self.dtype)
        if name == "position":  # an int, or a 0-d tensor inside a fused draft step (sprinter.decode.engine)
            return torch.as_tensor(position, device=device).to(self.dtype)
        raise SprinterError(f"verifier feature: got {name!r}; expected some of "
                            "('hidden', 'token_id', 'draft_prob', 'draft_entropy', 'position')")


def load_learned_gate(path: str | Path, draft_fingerprint: str, hidden_size: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[LearnedGate, object]:
    """Load a verifier checkpoint for this draft, refusing one trained for another draft."""
    if not Path(path).exists():
        raise SprinterError(f"verifier: got {str(path)!r}, which does not exist; train one with "
                            "`python scripts/collect.py` then `python scripts/train.py` "
                            "(which writes checkpoints/verifiers/demo), "
                            "or decode with the draft's confidence instead (gate='confidence', CLI --gate confidence)")
    from sprinter.verifier import load_verifier  # imported here: the decode path works without it

    verifier, info = load_verifier(path)
    trained_for = (info.draft or {}).get("fingerprint") or "unknown"
    if "unknown" not in (trained_for, draft_fingerprint) and trained_for != draft_fingerprint:
        raise SprinterError(f"verifier {str(path)!r} was trained for draft {info.draft.get('name')!r} "
                            f"(fingerprint {trained_for}); this draft's fingerprint is {draft_fingerprint}: "
                            "expected a verifier trained on this draft")
    if info.hidden_size != hidden_size:
        raise SprinterError(f"verifier {str(path)!r} reads hidden states of size {info.hidden_size}; this draft's "
                            f"hidden size is {hidden_size}: expected a verifier trained on this draft")
    return LearnedGate(verifier.to(device, dtype).eval(), info.features, info.default_threshold), info


__all__ = ["AlwaysFlag", "ConfidenceGate", "Gate", "LearnedGate", "NeverFlag", "check_threshold", "load_learned_gate"]
