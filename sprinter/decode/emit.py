"""What a generation returns (`GenerateOutput`) and the object that decides when it ends (`Emitter`):
shared by every decode loop (sprinter.decode.decoder, sprinter.decode.batched, sprinter.decode.asynchronous)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from sprinter.decode.stats import DecodeStats


@dataclass
class GenerateOutput:
    """What `Decoder.generate` returns: the new tokens only (the prompt is not repeated)."""

    text: str
    token_ids: list[int]
    stats: DecodeStats
    stop_reason: str  # "eos", "stop_string" or "max_new_tokens"


class Emitter:
    """The emitted tokens: enforces the budget, EOS and stop strings, and streams text as it is decided."""

    def __init__(self, tokenizer, max_new_tokens: int, eos_id: int | None, stop: Sequence[str],
                 on_text: Callable[[str], None] | None):
        self.tokenizer, self.max_new_tokens, self.eos_id = tokenizer, max_new_tokens, eos_id
        self.stop, self.on_text = tuple(stop), on_text
        self._stop_tokens = 4 * max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.stop_reason: str | None = None
        self._streamed = 0

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.ids)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _tail_text(self) -> str:
        """The text of the last tokens that can hold a stop string (each character is at most 4 byte tokens)."""
        return self.tokenizer.decode(self.ids[-self._stop_tokens:], skip_special_tokens=True)

    def emit(self, ids: list[int]) -> None:
        """Append decided tokens, up to the first that ends the generation."""
        for token in ids:
            self.ids.append(token)
            if token == self.eos_id:
                self.stop_reason = "eos"
            elif self.stop and any(s in self._tail_text() for s in self.stop):
                self.stop_reason = "stop_string"
            elif len(self.ids) >= self.max_new_tokens:
                self.stop_reason = "max_new_tokens"
            if self.done:
                break
        if self.on_text is not None:
            text = self.text()
            end = len(text) if self.done else len(text.rstrip("\ufffd"))  # hold back a split multi-byte character
            if end > self._streamed:
                self.on_text(text[self._streamed:end])
                self._streamed = end


__all__ = ["Emitter", "GenerateOutput"]
