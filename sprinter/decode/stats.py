"""What one generation cost and how the drafted tokens fared (names as in Spec-Bench and vLLM,
docs/references.md §5)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    """Counts for one `Decoder.generate` call.

    Every drafted token is either accepted (emitted without being replaced; in SPRINTER this
    includes tokens the verifier passed, which the target never checks) or rejected (replaced by
    the target, or discarded after a rejection): drafted = accepted + rejected. Each target call
    adds one token of its own (a replacement or a bonus) unless the generation ends first.
    """

    mode: str
    new_tokens: int = 0
    wall_seconds: float = 0.0  # batched modes: the whole batch's time, the same for each of its prompts
    batch_size: int = 1  # prompts decoded together (batched modes: the number given to generate)
    compile_seconds: float = 0.0  # compiling graphs (included in wall_seconds): paid once per Decoder and graph
    draft_seconds: float = 0.0  # batched modes: time spent drafting (n-gram lookups or the draft model), batch-wide
    target_calls: int = 0  # target forward passes (the first one also reads the prompt)
    target_tokens: int = 0  # positions the target processed, prompt included
    draft_calls: int = 0
    draft_tokens: int = 0
    verifier_calls: int = 0  # gate decisions
    flagged: int = 0  # blocks that ended at the gate: sprinter's flagged tokens (sent to the target), sd-gated's stops
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    target_flops: int = 0
    draft_flops: int = 0
    verifier_flops: int = 0
    # async: drafted tokens the target never checked (run-ahead after a rejection, or made redundant by the
    # target's own token); they count as rejected. And each side's busy time: wall time minus its waits.
    discarded: int = 0
    draft_busy_seconds: float = 0.0
    target_busy_seconds: float = 0.0
    # Modes whose target checks every drafted token (sd, sd-gated, strict sprinter, ngram): per block position i,
    # the blocks that drafted an i-th token after accepting the i before it (reached), and those that accepted it
    # too. accepted_by_position[i] / reached_by_position[i] is the acceptance at position i given the earlier
    # ones were accepted: the shape the latency model (sprinter.decode.latency) reads.
    reached_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    # The tokens each mode emitted: one entry ({"sd": 128}) except in mode "auto", whose rounds name their
    # candidate: {"ar": 12, "sd-k4": 40, "ngram-k8": 76}.
    modes: dict[str, int] = field(default_factory=dict)

    def count_block(self, drafted: int, kept: int) -> None:
        """Add one checked block of `drafted` tokens whose first `kept` were accepted to the by-position counts."""
        reached = min(kept + 1, drafted)
        grow = reached - len(self.reached_by_position)
        if grow > 0:
            self.reached_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(reached):
            self.reached_by_position[i] += 1
        for i in range(kept):
            self.accepted_by_position[i] += 1

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def mean_acceptance_length(self) -> float | None:
        """vLLM's definition, 1 + accepted / target calls (plain decoding: 1.0); None without a target call."""
        return 1 + self.accepted / self.target_calls if self.target_calls else None

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted (vLLM's draft acceptance rate); None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def overlap(self) -> float | None:
        """async: how much of the less busy side's work ran while the other side worked:
        (draft_busy + target_busy - wall) / min(draft_busy, target_busy). 1: hidden entirely behind the
        busier side; 0: the sides took turns; below 0: waiting and handover cost more than any overlap.
        None for the other modes."""
        shorter = min(self.draft_busy_seconds, self.target_busy_seconds)
        if shorter <= 0 or self.wall_seconds <= 0:
            return None
        return (self.draft_busy_seconds + self.target_busy_seconds - self.wall_seconds) / shorter

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tokens_per_second"] = round(self.tokens_per_second, 3)
        out["mean_acceptance_length"] = self.mean_acceptance_length
        out["acceptance_rate"] = self.acceptance_rate
        out["overlap"] = self.overlap
        out["wall_seconds"] = round(self.wall_seconds, 6)
        return out


__all__ = ["DecodeStats"]
