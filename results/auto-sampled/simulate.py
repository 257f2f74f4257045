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

from sprinter.decode.auto import PRIOR_WEIGHT, AutoController, Estimate
from sprinter.decode.costs import CostProfile

RUN = json.loads((Path(__file__).parents[1] / "demo-sampled" / "results.json").read_text())
PROFILE = CostProfile.from_dict(RUN["pair"]["cost_profile"])
PRIOR = RUN["pair"]["auto_draft_prior"]
REQUESTS, TOKENS = 300, 128


def round_ms(kind: str, k: int) -> float:
    p = PROFILE
    return p.target(1) if kind == "ar" else k * p.draft_step_ms + p.target(k + 1) + p.round_ms


def auto(a: float, decay: float) -> tuple[float, float]:
    """ms/token of auto over REQUESTS simulated requests at acceptance a, and the share of tokens ar emitted."""
    Estimate.__init__.__defaults__ = (PRIOR_WEIGHT, decay)  # every estimate's forgetting (DECAY: 0.7); the
    # n-gram ones never see a chain here, so this is the draft estimate's
    ms = tokens = 0.0
    by_kind: collections.Counter = collections.Counter()
    for seed in range(REQUESTS):
        rng, c, emitted = random.Random(seed), AutoController(PROFILE, draft_prior=PRIOR, cache={}), 0
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


def variant(decay: float, relax: float) -> None:
    """Controllers whose draft estimate forgets at `decay` per observed round and, while `ar` runs, moves back
    toward the prior (its evidence weighed by `relax` per ar round, the prior's weight topped up; 0: not at all)."""
    Estimate.__init__.__defaults__ = (PRIOR_WEIGHT, 0.7)
    choose = ORIGINAL_CHOOSE

    def patched(self):
        if not getattr(self, "_patched", False):
            self._patched, self.draft = True, Estimate(self.draft_prior, decay=decay)
        candidate = choose(self)
        if relax and candidate.kind in ("ar", "ngram"):
            w = PRIOR_WEIGHT * (1 - relax)
            self.draft.hits = self.draft.hits * relax + self.draft_prior * w
            self.draft.trials = self.draft.trials * relax + w
        return candidate
    AutoController.choose = patched


ORIGINAL_CHOOSE = AutoController.choose


def fixed(a: float, k: int) -> float:
    return round_ms("sd", k) / sum(a ** j for j in range(k + 1))


def variants() -> None:
    accept = (0.3, 0.5, 0.65, 0.8, 0.85)
    best = " | ".join(f"{min(PROFILE.target(1), fixed(a, 2), fixed(a, 4)):.2f}" for a in accept)
    print("| draft estimate decay | back toward the prior while ar runs | " + " | ".join(f"a = {a}" for a in accept)
          + " |")
    print("|---|---|" + "---|" * len(accept))
    print(f"| best fixed row (ar, sd-k2, sd-k4) | | {best} |")
    for decay, relax in ((0.7, 0.0), (0.9, 0.0), (0.9, 0.97), (0.9, 0.95), (0.9, 0.9)):
        variant(decay, relax)
        cells = " | ".join("{:.2f} ({:.2f})".format(*auto(a, decay)) for a in accept)
        print(f"| {decay} | {relax or 'no'} | {cells} |")
    AutoController.choose = ORIGINAL_CHOOSE


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
