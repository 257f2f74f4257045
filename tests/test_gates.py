"""Gates, and loading a verifier for the decoder, against the verifier contract with a fake verifier.

`sprinter.verifier` is written elsewhere; these tests stand in a fake module that honours its
contract: load_verifier(path) -> (nn.Module mapping a feature dict to logits (N,), info).
"""

import sys
import types

import pytest
import torch

from sprinter import Decoder
from sprinter.decode.drafters import DraftStep
from sprinter.decode.gates import AlwaysFlag, ConfidenceGate, LearnedGate, NeverFlag
from sprinter.errors import SprinterError
from sprinter.pairs.load import fingerprint

FEATURES = ("hidden", "token_id", "draft_prob", "draft_entropy", "position")


pytestmark = pytest.mark.usefixtures("single_thread")


class FixedLogit(torch.nn.Module):
    """Returns the same logit for every token and remembers what it was fed."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(float(logit)), requires_grad=False)
        self.seen: list[dict] = []

    def forward(self, features: dict) -> torch.Tensor:
        self.seen.append(features)
        n = next(iter(features.values())).shape[0]
        return self.logit.expand(n)


def step(hidden_size: int = 8) -> DraftStep:
    q = torch.tensor([0.1, 0.6, 0.3])
    return DraftStep(token=torch.tensor(1), q=q, q_soft=q, hidden=torch.randn(hidden_size))


def test_learned_gate_feeds_the_contract_features():
    verifier = FixedLogit(0.0)
    gate = LearnedGate(verifier, FEATURES, threshold=0.5)
    assert gate.hidden_layers == 1
    assert float(gate.accept_prob(step(), position=3)) == pytest.approx(0.5)
    seen = verifier.seen[0]
    assert set(seen) == set(FEATURES)
    assert seen["hidden"].shape == (1, 8)
    assert seen["token_id"].tolist() == [1] and seen["token_id"].dtype == torch.long
    assert seen["draft_prob"].tolist() == pytest.approx([0.6])
    assert seen["draft_entropy"].tolist() == pytest.approx([float(-(step().q * step().q.log()).sum())])
    assert seen["position"].tolist() == [3.0]
    assert not LearnedGate(FixedLogit(0.0), ("draft_prob",), 0.5).hidden_layers


def test_simple_gates():
    s = step()
    assert float(AlwaysFlag().accept_prob(s, 0)) < AlwaysFlag.threshold
    assert float(NeverFlag().accept_prob(s, 0)) >= NeverFlag.threshold
    assert float(ConfidenceGate(0.5).accept_prob(s, 0)) == pytest.approx(0.6)
    with pytest.raises(SprinterError, match="threshold"):
        ConfidenceGate(1.2)


def fake_verifier_module(monkeypatch, logit: float, draft_fingerprint: str, hidden_size: int):
    verifier = FixedLogit(logit)
    info = types.SimpleNamespace(features=FEATURES, thresholds={"0.05": 0.5}, default_threshold=0.5,
                                 draft={"name": "some-draft", "fingerprint": draft_fingerprint},
                                 hidden_size=hidden_size)
    module = types.ModuleType("sprinter.verifier")
    module.load_verifier = lambda path, draft_fingerprint=None, hidden_size=None: (verifier, info)
    module.check_vocabulary = lambda info, vocab_size, file: None  # the fake info has no embedding to check
    monkeypatch.setitem(sys.modules, "sprinter.verifier", module)
    return verifier


def load(pair_dir, verifier_dir):
    return Decoder.from_pretrained(draft=str(pair_dir / "draft"), target=str(pair_dir / "target"),
                                   verifier=str(verifier_dir), device="cpu", dtype="float32")


def test_decoder_uses_a_learned_verifier(tiny_pair, tmp_path, monkeypatch):
    draft_fp = fingerprint(str(tiny_pair / "draft"))
    fake_verifier_module(monkeypatch, logit=-10.0, draft_fingerprint=draft_fp, hidden_size=48)
    dec = load(tiny_pair, tmp_path)
    ar = dec.generate("def f(x):", max_new_tokens=12, mode="ar")
    out = dec.generate("def f(x):", max_new_tokens=12)  # sprinter with the learned gate by default
    assert out.token_ids == ar.token_ids and out.stats.flagged == out.stats.drafted
    assert out.stats.verifier_flops > 0
    # P(accept) = sigmoid(-10): a threshold of 0 lets every token pass
    draft = dec.generate("def f(x):", max_new_tokens=12, mode="draft")
    passed = dec.generate("def f(x):", max_new_tokens=12, threshold=0.0, max_block=None)
    assert passed.token_ids == draft.token_ids and passed.stats.target_calls == 0


@pytest.mark.parametrize("fingerprint_of,hidden,message", [
    ("other", 48, "trained for draft"), ("draft", 32, "hidden size"),
])
def test_verifier_for_another_draft_is_refused(tiny_pair, tmp_path, monkeypatch, fingerprint_of, hidden, message):
    fp = fingerprint(str(tiny_pair / "draft")) if fingerprint_of == "draft" else "0123456789abcdef"
    fake_verifier_module(monkeypatch, logit=0.0, draft_fingerprint=fp, hidden_size=hidden)
    monkeypatch.setattr("sprinter.decode.decoder.load_pair",
                        lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(SprinterError, match=message):
        load(tiny_pair, tmp_path)


@pytest.mark.parametrize("recorded", ["unknown", None])
def test_unknown_fingerprint_is_not_checked(tiny_pair, tmp_path, monkeypatch, recorded):
    fake_verifier_module(monkeypatch, logit=0.0, draft_fingerprint=recorded, hidden_size=48)
    assert load(tiny_pair, tmp_path).gate is not None


def test_missing_verifier_and_no_verifier(tiny_pair, tmp_path):
    with pytest.raises(SprinterError, match="scripts/train.py"):
        load(tiny_pair, tmp_path / "nowhere")
    dec = Decoder.from_pretrained(draft=str(tiny_pair / "draft"), target=str(tiny_pair / "target"), device="cpu")
    with pytest.raises(SprinterError, match="gate='confidence'"):
        dec.generate("x = 1", max_new_tokens=4, mode="sprinter")
