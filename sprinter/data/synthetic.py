"""Synthetic shard folders with a known acceptance rule: for tests, the speed benchmark, and trying the
training stage without a pair or a collect run. Same format as the data stage ("sprinter-shards/1").

The rule mixes what each scorer can see: a linear direction of the hidden state (the paper's linear
verifier), a product of two hidden coordinates (only a non-linear model), a per-token bias (the
token embedding) and the draft's own probability (the confidence baseline), plus label noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sprinter.data.shards import FORMAT, LABELS

COLUMNS = ["hidden", "token_id", "draft_prob", "draft_entropy", "position"]


def make_rows(prompts: torch.Tensor, tokens_per_prompt: int, direction: torch.Tensor, token_bias: torch.Tensor,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows for the given prompt ids under the rule (direction (H,), token_bias (V,)), in the shard columns."""
    n = len(prompts) * tokens_per_prompt
    hidden = torch.randn(n, len(direction), generator=generator)  # (N, H)
    token_id = torch.randint(0, len(token_bias), (n,), generator=generator)
    draft_logit = torch.randn(n, generator=generator) * 1.5 + 0.5
    z = (1.5 * hidden @ direction + 1.2 * hidden[:, 0] * hidden[:, 1] + token_bias[token_id]
         + 0.6 * draft_logit + 0.5)
    p_accept = torch.sigmoid(z)
    accept_sprinter = (torch.rand(n, generator=generator) < p_accept).float()
    accept_soft = torch.where(accept_sprinter > 0, torch.ones(n), 0.9 * p_accept)
    draft_prob = torch.sigmoid(draft_logit)
    return {"hidden": hidden.half(), "token_id": token_id, "draft_prob": draft_prob,
            "draft_entropy": (1 - draft_prob) * 3 + 0.1 * torch.rand(n, generator=generator),
            "target_prob": draft_prob * accept_soft,
            "position": torch.arange(tokens_per_prompt).repeat(len(prompts)),
            "prompt_index": prompts.repeat_interleave(tokens_per_prompt),
            "accept_greedy": accept_sprinter * (draft_prob > 0.5).float(), "accept_sprinter": accept_sprinter,
            "accept_soft": accept_soft, "accept_relaxed": torch.maximum(accept_sprinter, (accept_soft > 0.6).float())}


def write_shards(folder: str | Path, num_prompts: int = 60, tokens_per_prompt: int = 20, hidden_size: int = 16,
                 vocab_size: int = 32, num_shards: int = 2, seed: int = 0,
                 draft: dict | None = None) -> Path:
    """Write FOLDER/manifest.json + shard-0000k.safetensors; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(hidden_size, generator=generator) / math.sqrt(hidden_size)
    token_bias = torch.randn(vocab_size, generator=generator)
    shards = []
    for i, prompts in enumerate(torch.arange(num_prompts).tensor_split(num_shards)):  # one shard in RAM at a time
        rows = make_rows(prompts, tokens_per_prompt, direction, token_bias, generator)
        name = f"shard-{i:05d}.safetensors"
        save_file(rows, str(folder / name))
        shards.append({"file": name, "rows": len(rows["token_id"]), "rank": 0})
    n = num_prompts * tokens_per_prompt
    manifest = {"format": FORMAT, "sprinter_version": "synthetic",
                "draft": draft or {"name": "synthetic-draft", "fingerprint": "synthetic"},
                "target": {"name": "synthetic-target", "fingerprint": "synthetic"}, "tokenizer": None,
                "hidden_size": hidden_size, "vocab_size": vocab_size, "context_source": "corpus", "temperature": 1.0,
                "features": COLUMNS, "labels": list(LABELS),
                "dtype": "float16", "num_samples": n, "num_prompts": num_prompts, "shards": shards,
                "config": {"synthetic": True, "seed": seed}, "created": "synthetic"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
