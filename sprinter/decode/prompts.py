"""What `Decoder.generate` accepts as a prompt: a text, token ids (a list, or a tensor with a batch of 1), or a
list of prompts (a batch); every bad prompt is one SprinterError naming it."""

from __future__ import annotations

from typing import Sequence

import torch

from sprinter.errors import SprinterError


def prompt_ids(prompt: str | Sequence[int] | torch.Tensor, tokenizer, vocab: int) -> list[int]:
    """One prompt's token ids: a text tokenized, or token ids (a list, or a tensor with a batch of 1) checked."""
    if isinstance(prompt, str):
        if not prompt:
            raise SprinterError("prompt: got ''; expected a non-empty text or a list of token ids")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # lone surrogates: bytes that were not UTF-8 (e.g. from argv)
            raise SprinterError(f"prompt: got {prompt[max(0, err.start - 10): err.end + 10]!r}, with a character "
                                f"at {err.start} that is not text (a byte that was not UTF-8?); expected "
                                "UTF-8 text") from None
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, (list, tuple, torch.Tensor)):
        raise SprinterError(f"prompt: got {type(prompt).__name__} {prompt!r:.40}; expected a text, a list of token "
                            "ids or a list of prompts")
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else \
        [t.item() if isinstance(t, torch.Tensor) and t.dim() == 0 else t for t in prompt]
    if ids and isinstance(ids[0], list):  # a batch dimension
        if len(ids) != 1:
            raise SprinterError(f"prompt: got a batch of {len(ids)} sequences in one tensor; expected a batch "
                                "of 1 (for a batch: a list of prompts)")
        ids = ids[0]
    if not ids:
        raise SprinterError("prompt: got no token ids; expected a non-empty text or a list of token ids")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise SprinterError(f"prompt: got token id(s) {bad[:4]}; expected integers in [0, {vocab})")
    return ids


def is_batch(prompt: object) -> bool:
    """A list of prompts (texts or token-id lists), not one prompt's token ids."""
    first = prompt[0] if isinstance(prompt, (list, tuple)) and len(prompt) > 0 else None
    return isinstance(first, (str, list, tuple)) or (isinstance(first, torch.Tensor) and first.dim() >= 1)


__all__ = ["is_batch", "prompt_ids"]
