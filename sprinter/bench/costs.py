"""scripts/profile_pair.py's stage: load a pair, measure its cost profile (sprinter.decode.costs), save it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sprinter.config import PairSourceConfig, RuntimeConfig, check_integers, option
from sprinter.decode.costs import FILE_NAME, NOISY, Budget, CostProfile, measure_costs, save_profile
from sprinter.errors import SprinterError


@dataclass(frozen=True)
class ProfileConfig(PairSourceConfig, RuntimeConfig):
    """scripts/profile_pair.py's options: the single home of their defaults."""

    out: str | None = option(None, "profile file (profiles of other devices/threads in it are kept); none: "
                                   f"PAIR/{FILE_NAME} when the pair folder is writable, else ./{FILE_NAME}")
    verifier: str | None = option(None, "the learned verifier whose call is timed; none: an untrained one of the "
                                        "default shape (the same cost)")
    threads: int = option(1, "CPU threads for torch (0: torch's default); part of the profile's key")
    max_block: int = option(20, "sprinter's longest block: target forwards over 1 .. max_block + 1 tokens are timed")
    context: int = option(64, "tokens in the caches before each timed call (the benchmark's prompt length)")
    budget_s: float = option(2.0, "seconds to spend measuring (at least three timed calls per figure)")

    def __post_init__(self) -> None:
        check_integers(self, ("max_block", "context"))
        check_integers(self, ("threads",), minimum=0)
        if not (isinstance(self.budget_s, (int, float)) and self.budget_s > 0):
            raise SprinterError(f"budget_s: got {self.budget_s!r}; expected a number of seconds > 0")


def default_out(pair_dir: Path) -> Path:
    """PAIR/cost_profile.json when the pair folder is writable, else ./cost_profile.json."""
    return pair_dir / FILE_NAME if os.access(pair_dir, os.W_OK) else Path(FILE_NAME)


def profile_pair(cfg: ProfileConfig) -> tuple[CostProfile, Path]:
    """Load the pair, measure its profile, save it; returns the profile and the file it went to."""
    from sprinter.decode.gates import load_learned_gate
    from sprinter.pairs.build import resolve_pair
    from sprinter.pairs.load import fingerprint, load_pair, resolve_device, resolve_dtype

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    draft, target = resolve_pair(cfg.pair)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pair = load_pair(draft, target, device, dtype)
    gate = None
    if cfg.verifier is not None:
        gate, _ = load_learned_gate(cfg.verifier, fingerprint(draft), pair.draft.config.hidden_size, device, dtype)
    pair_dir = Path(draft).parent
    profile = measure_costs(pair, name=str(pair_dir), gate=gate,
                            max_n=cfg.max_block + 1, context=cfg.context, budget=Budget(cfg.budget_s))
    if profile.noise > NOISY:
        print(f"note: the timings spread widely (interquartile range {profile.noise:.0%} of the median): a busy "
              "machine? profile again when it is quiet, or with a larger --budget-s", file=sys.stderr)
    out = Path(cfg.out) if cfg.out else default_out(pair_dir)
    if not cfg.out and out.parent != pair_dir:
        print(f"note: {pair_dir} is not writable; writing {out}", file=sys.stderr)
    return profile, save_profile(out, profile)


__all__ = ["ProfileConfig", "default_out", "profile_pair"]
