"""Why `auto` trails a fixed sd-k2 on sampled text: its controller (sprinter.decode.auto.AutoController, the real
class) run on simulated requests whose drafted tokens are accepted independently with probability a, priced with
the demo-sampled run's own cost profile (results/demo-sampled/results.json, pair.cost_profile) and its
calibration prior (pair.auto_draft_prior). No model runs: each round's cost is the profile's, as the latency
model prices it (ar: T(1); sd-k: k d + T(k + 1) + r), and a round emits its accepted prefix and one token.

    python results/auto-sampled/simulate.py             # about 10 s; prints results/auto-sampled/README.md's table
    python results/auto-sampled/simulate.py variants    # about 40 s; the controller variants' table
"""

from __future__ import annotations

import collections
import json
import random
import sys
from pathlib import Path

from sprinter.decode.auto import AutoController
from sprinter.decode.costs import CostProfile

RUN = json.loads((Path(__file__).parents[1] / "demo-sampled" / "results.json").read_text())
PROFILE = CostProfile.from_dict(RUN["pair"]["cost_profile"])
PRIOR = RUN["pair"]["auto_draft_prior"]
REQUESTS, TOKENS = 300, 128


def round_ms(kind: str, k: int) -> float:
    p = PROFILE
    return p.target(1) if kind == "ar" else k * p.draft_step_ms + p.target(k + 1) + p.round_ms


def auto(a: float, decay: float, relax: float = 1.0) -> tuple[float, float]:
    """ms/token of auto over REQUESTS simulated requests at acceptance a, and the share of tokens ar emitted; the
    draft estimate forgets at `decay` per observed round and, while `ar` runs, moves back toward the prior (its
    evidence weighed by `relax` per ar round; 1: not at all). The controller's defaults since results/auto-prior:
    0.9 and 0.9; before, 0.7 and 1."""
    ms = tokens = 0.0
    by_kind: collections.Counter = collections.Counter()
    for seed in range(REQUESTS):
        rng, emitted = random.Random(seed), 0
        c = AutoController(PROFILE, draft_prior=PRIOR, cache={}, draft_decay=decay, relax=relax)
        while emitted < TOKENS:
            cand = c.choose()
            e, k = 1, cand.k or 8
            if cand.kind in ("sd", "sd-gated"):
                accepted = 0
                while accepted < k and rng.random() < a:
                    accepted += 1
                c.observe_draft(accepted, min(accepted + 1, k))
                e = accepted + 1
            c.observe_ngram([], [0] * e)  # sampled text: the n-gram lookups find nothing
            ms += round_ms("ar" if cand.kind in ("ar", "ngram") else "sd", k)
            emitted += e
            by_kind["ar" if cand.kind == "ar" else "other"] += e
        tokens += emitted
    return ms / tokens, by_kind["ar"] / sum(by_kind.values())


def fixed(a: float, k: int) -> float:
    return round_ms("sd", k) / sum(a ** j for j in range(k + 1))


def variants() -> None:
    accept = (0.3, 0.5, 0.65, 0.8, 0.85)
    best = " | ".join(f"{min(PROFILE.target(1), fixed(a, 2), fixed(a, 4)):.2f}" for a in accept)
    print("| draft estimate decay | back toward the prior while ar runs | " + " | ".join(f"a = {a}" for a in accept)
          + " |")
    print("|---|---|" + "---|" * len(accept))
    print(f"| best fixed row (ar, sd-k2, sd-k4) | | {best} |")
    for decay, relax in ((0.7, 1.0), (0.9, 1.0), (0.9, 0.97), (0.9, 0.95), (0.9, 0.9)):
        cells = " | ".join("{:.2f} ({:.2f})".format(*auto(a, decay, relax)) for a in accept)
        print(f"| {decay} | {relax if relax < 1 else 'no'} | {cells} |")


def main() -> None:
    print(f"profile: T(1) {PROFILE.target(1):.2f} ms, d {PROFILE.draft_step_ms:.2f} ms; prior {PRIOR:.3f}")
    print("| a | ar | sd-k2 | sd-k4 | auto (ar's share) | auto, draft estimate decay 0.9 (ar's share) |")
    print("|---|---|---|---|---|---|")
    for a in (0.3, 0.5, 0.65, 0.8, 0.85):
        now, slow = auto(a, 0.7), auto(a, 0.9)
        print(f"| {a} | {PROFILE.target(1):.2f} | {fixed(a, 2):.2f} | {fixed(a, 4):.2f} | {now[0]:.2f} ({now[1]:.2f}) "
              f"| {slow[0]:.2f} ({slow[1]:.2f}) |")


if __name__ == "__main__":
    variants() if sys.argv[1:] == ["variants"] else main()
