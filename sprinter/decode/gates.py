"""Gates: decide, from the draft alone, whether a drafted token may skip the target.

One small interface: `accept_prob(step, position)` estimates P(the target would accept x) and a
token PASSES iff that estimate >= `threshold`; otherwise it is FLAGGED and the target is called.
- `LearnedGate`: the trained verifier (sprinter.verifier), reading the draft's hidden state etc.
- `ConfidenceGate`: the draft's own probability q(x), as Hugging Face assisted generation does
  (`assistant_confidence_threshold`, default 0.4; docs/references.md §2): the baseline to beat.
- `EntropyGate`, `MarginGate`: two more training-free scores of the draft alone, exp(-H(q)) and the top-1 minus
  top-2 probability of q (FLy and the relaxed-acceptance papers gate on the entropy; docs/decoding.md).
- `AlwaysFlag` / `NeverFlag`: the two limits (SPRINTER becomes lossless / becomes the draft alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from sprinter.decode.drafters import DraftStep
from sprinter.errors import SprinterError
from sprinter.features import (
    BLOCK,
    DISTRIBUTION,
    HIDDEN,
    HIDDEN_PREV,
    KNOWN,
    TOKEN,
    block_features,
    distribution_features,
    entropy,
)

CONFIDENCE_THRESHOLD = 0.4  # Hugging Face's default assistant_confidence_threshold
NO_VERIFIER = ("modes 'sprinter' and 'sd-gated' need a gate, and this decoder has no verifier: train one with "
               "`python scripts/collect.py` then `python scripts/train.py` (writes checkpoints/verifiers/demo) and "
               "pass verifier=DIR (CLI --verifier DIR), or use the draft's confidence: gate='confidence' "
               "(CLI --gate confidence)")


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
    hidden_layers: int  # how many of the draft's last layers' states the gate reads: 0, 1 (the last) or 2

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        """() estimated P(target accepts step.token); `position` is its 0-based index in the block."""


class AlwaysFlag:
    """Flags every token: the target checks each one (SPRINTER reduces to a lossless scheme)."""

    threshold = 1.0
    hidden_layers = 0

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return torch.zeros((), device=step.q.device)


class NeverFlag:
    """Passes every token: the target is called only at max_block (SPRINTER reduces to the draft)."""

    threshold = 0.0
    hidden_layers = 0

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return torch.ones((), device=step.q.device)


class ConfidenceGate:
    """Passes x while the draft's own probability q(x) >= threshold."""

    hidden_layers = 0

    def __init__(self, threshold: float = CONFIDENCE_THRESHOLD):
        self.threshold = check_threshold(threshold)

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return prob_of(step.q_soft, step.token)


class EntropyGate:
    """Passes x while exp(-H(q)) >= threshold, H the entropy of the draft's distribution in nats: the draft is sure
    of its position whatever token it drew. exp(-H) is 1/m for q uniform over m tokens, so the threshold reads like
    q(x)'s (a threshold t passes H <= -ln t)."""

    hidden_layers = 0

    def __init__(self, threshold: float = CONFIDENCE_THRESHOLD):
        self.threshold = check_threshold(threshold)

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        return torch.exp(-entropy(step.q_soft))


class MarginGate:
    """Passes x while the draft's top-1 probability minus its top-2 probability >= threshold (a clear favourite)."""

    hidden_layers = 0

    def __init__(self, threshold: float = CONFIDENCE_THRESHOLD):
        self.threshold = check_threshold(threshold)

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        top = step.q_soft.topk(min(2, step.q_soft.shape[-1])).values
        return top[0] - top[1] if len(top) > 1 else top[0]


class LearnedGate:
    """A trained verifier: sigmoid(verifier(features)) is P(accept). Each feature is computed by the function
    the data stage used for it (sprinter.features), from the DraftStep and the block so far.

    The block features (prev_draft_prob, block_cum_prob) read the draft probabilities of the earlier tokens
    of the block, which the gate keeps between calls: the decode loops consult it on every drafted token in
    order, position 0 starting a new block (so one gate serves one decode loop at a time)."""

    def __init__(self, verifier: torch.nn.Module, features: tuple[str, ...], threshold: float):
        self.verifier = verifier
        self.features = tuple(features)
        unknown = [f for f in self.features if f not in KNOWN]
        if unknown:
            raise SprinterError(f"verifier feature(s): got {unknown}; expected some of {list(KNOWN)}")
        self.threshold = check_threshold(threshold)
        # the draft's last layers the gate reads: 2 with the layer before the last, 1 with the last alone
        self.hidden_layers = 2 if HIDDEN_PREV in self.features else int(HIDDEN in self.features)
        self.wants = {"distribution": bool(set(self.features) & set(DISTRIBUTION)),
                      "block": bool(set(self.features) & set(BLOCK))}
        weight = next(verifier.parameters(), None)
        self.dtype = weight.dtype if weight is not None else torch.float32  # features are fed in its dtype
        self.block_probs: list[torch.Tensor] = []  # q(x) of the block's tokens so far, in drafting order

    def accept_prob(self, step: DraftStep, position: int) -> torch.Tensor:
        values = self.step_features(step, position)
        inputs = {name: values[name][None] for name in self.features}
        return torch.sigmoid(self.verifier(inputs).float()).reshape(())

    def step_features(self, step: DraftStep, position: int) -> dict[str, torch.Tensor]:
        """Every feature this verifier reads, of one drafted token at 0-based `position` in its block (an int, or
        a 0-d tensor inside a fused draft step, sprinter.decode.engine, which takes only gates without block
        features: those keep the block's q(x) here between calls)."""
        if self.wants["block"]:
            if position == 0:
                self.block_probs = []
            elif position != len(self.block_probs):
                raise SprinterError(f"LearnedGate: got position {position} after {len(self.block_probs)} token(s) "
                                    "of this block; expected every drafted token in order, the block's first at "
                                    "position 0")
            self.block_probs.append(prob_of(step.q_soft, step.token))
        out: dict[str, torch.Tensor] = {}
        if HIDDEN in self.features:
            out[HIDDEN] = step.hidden.to(self.dtype)
        if HIDDEN_PREV in self.features:
            if step.hidden_prev is None:
                raise SprinterError("LearnedGate: the verifier reads hidden_prev_layer and the drafter gave none; "
                                    "expected a ModelDrafter made with hidden_layers=gate.hidden_layers")
            out[HIDDEN_PREV] = step.hidden_prev.to(self.dtype)
        if TOKEN in self.features:
            out[TOKEN] = step.token
        if self.wants["distribution"]:
            wanted = tuple(f for f in self.features if f in DISTRIBUTION)
            out.update({k: v.to(self.dtype) for k, v in distribution_features(step.q_soft, step.token, wanted).items()})
        if self.wants["block"]:
            out.update({k: v[-1].to(self.dtype) for k, v in block_features(torch.stack(self.block_probs)).items()})
        if "position" in self.features:
            out["position"] = torch.as_tensor(position, device=step.q.device).to(self.dtype)
        return out


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


def make_gate(gate: "str | Gate | None", threshold: float | None, learned: LearnedGate | None) -> Gate:
    """The gate a request names ("learned" or None: `learned`, the decoder's verifier, at `threshold` when given;
    "confidence", "entropy", "margin" at `threshold` or CONFIDENCE_THRESHOLD; "always"; "never"; or a Gate itself)."""
    if gate is None or gate == "learned":
        if learned is None:
            raise SprinterError(NO_VERIFIER)
        return learned if threshold is None else LearnedGate(learned.verifier, learned.features, threshold)
    if gate in ("confidence", "entropy", "margin"):
        kind = {"confidence": ConfidenceGate, "entropy": EntropyGate, "margin": MarginGate}[gate]
        return kind(CONFIDENCE_THRESHOLD if threshold is None else threshold)
    if gate == "always":
        return AlwaysFlag()
    if gate == "never":
        return NeverFlag()
    return gate


__all__ = ["NO_VERIFIER", "AlwaysFlag", "ConfidenceGate", "EntropyGate", "Gate", "LearnedGate", "MarginGate",
           "NeverFlag", "check_threshold", "load_learned_gate", "make_gate"]
