"""The verifier's features: computed the same at collection and at decode time, optional, validated; checkpoints
made before the optional features existed still load and gate."""

import pytest
import torch
from transformers import AutoConfig

from sprinter import Decoder
from sprinter.data.contexts import decode_rows
from sprinter.decode.cache import CachedLM
from sprinter.decode.drafters import DraftStep, ModelDrafter
from sprinter.decode.gates import LearnedGate
from sprinter.decode.sampling import Sampler
from sprinter.errors import SprinterError
from sprinter.features import KNOWN, VECTORS, block_features, distribution_features
from sprinter.pairs.load import fingerprint, load_pair
from sprinter.train.data import first_prompts
from sprinter.train.fit import TrainConfig
from sprinter.verifier import Verifier, VerifierInfo, default_arch, load_verifier, save_verifier

pytestmark = pytest.mark.usefixtures("single_thread")
OLD = ("hidden", "token_id", "draft_prob", "draft_entropy")  # the features of every checkpoint before these
NEW = ("hidden", "hidden_prev_layer", "token_id", "draft_prob", "draft_top2_prob", "draft_margin",
       "prev_draft_prob", "block_cum_prob", "position")


class Recorder(torch.nn.Module):
    """Passes every token (a large logit) and remembers what it was fed."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(10.0), requires_grad=False)
        self.seen: list[dict] = []

    def forward(self, features: dict) -> torch.Tensor:
        self.seen.append({k: v[0] for k, v in features.items()})
        return self.bias.expand(1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_time_features_equal_the_collected_ones(request, arch):
    folder = request.getfixturevalue("tiny_pair" if arch == "gpt2" else "tiny_llama_pair")
    pair = load_pair(str(folder / "draft"), str(folder / "target"), device="cpu", dtype="float32")
    prompt = torch.randint(3, pair.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    k = 4
    rows, paths = decode_rows(pair, prompt, max_new_tokens=12, k=k, temperature=0.0, gen=torch.Generator(), pad_id=0,
                              eos_id=None)
    recorder = Recorder()
    gate = LearnedGate(recorder, KNOWN, threshold=0.5)
    assert gate.hidden_layers == 2
    for start in range(0, len(rows["token_id"]), k):
        # the block's context, as the decode loop holds it: the path up to where this block was drafted
        context = paths[0][: int(rows["context_length"][start])]
        drafter = ModelDrafter(CachedLM(pair.draft, pair.vocab_size), Sampler(), hidden_layers=gate.hidden_layers)
        recorder.seen.clear()
        with torch.inference_mode():
            draft = drafter.propose([context], [k], torch.Generator(),
                                    stop=lambda step, pos: bool(gate.accept_prob(step, pos) < gate.threshold))
        assert draft.chains()[0] == rows["token_id"][start:start + k].tolist()
        for j, seen in enumerate(recorder.seen):
            for name in KNOWN:
                collected = rows[name][start + j]
                assert torch.allclose(seen[name].to(collected.dtype), collected, atol=1e-5), (name, start, j)


def test_block_features_are_causal_and_one_at_the_start():
    out = block_features(torch.tensor([[0.5, 0.4, 0.9], [1.0, 0.2, 0.3]]))
    assert torch.allclose(out["prev_draft_prob"], torch.tensor([[1.0, 0.5, 0.4], [1.0, 1.0, 0.2]]))
    assert torch.allclose(out["block_cum_prob"], torch.tensor([[1.0, 0.5, 0.2], [1.0, 1.0, 0.2]]))
    dist = distribution_features(torch.tensor([0.1, 0.6, 0.3]), torch.tensor(2))
    assert float(dist["draft_prob"]) == pytest.approx(0.3) and float(dist["draft_margin"]) == pytest.approx(0.3)
    assert float(dist["draft_top4_prob"]) == 0.0  # a vocabulary of 3: the 4th rank has probability 0


def _checkpoint(path, features, hidden_size=8, vocab_size=16):
    torch.manual_seed(0)
    info = VerifierInfo(features=features, hidden_size=hidden_size, arch=default_arch(width=8, depth=1,
                                                                                      vocab_size=vocab_size))
    verifier = Verifier(info)
    save_verifier(path, verifier, info)
    return verifier


def _step(hidden_size=8, vocab_size=16, with_prev=True):
    q = torch.softmax(torch.randn(vocab_size, generator=torch.Generator().manual_seed(2)), -1)
    return DraftStep(token=q.argmax(), q=q, q_soft=q, hidden=torch.randn(hidden_size),
                     hidden_prev=torch.randn(hidden_size) if with_prev else None)


def test_old_feature_checkpoints_load_and_gate(tmp_path):
    _checkpoint(tmp_path / "old", OLD)
    verifier, info = load_verifier(tmp_path / "old")
    assert info.features == OLD and not any("prev" in k for k in verifier.state_dict())
    gate = LearnedGate(verifier, info.features, 0.5)
    assert gate.hidden_layers == 1
    p = gate.accept_prob(_step(with_prev=False), 0)  # a drafter asked for one layer gives no hidden_prev
    assert 0 < float(p) < 1


def test_new_feature_checkpoints_round_trip(tmp_path):
    made = _checkpoint(tmp_path / "new", NEW)
    verifier, info = load_verifier(tmp_path / "new")
    assert info.features == NEW and "hidden_prev_mean" in verifier.state_dict()
    gate, again = LearnedGate(made.eval(), NEW, 0.5), LearnedGate(verifier, info.features, 0.5)
    step = _step()
    for position in range(3):
        assert torch.equal(gate.accept_prob(step, position), again.accept_prob(step, position))


def test_bad_feature_options_are_refused_clearly():
    with pytest.raises(SprinterError, match="context_length"):
        TrainConfig(features=("hidden", "context_length"))
    with pytest.raises(SprinterError, match="bogus"):
        LearnedGate(Recorder(), ("hidden", "bogus"), 0.5)
    gate = LearnedGate(Recorder(), ("hidden", "prev_draft_prob"), 0.5)
    with pytest.raises(SprinterError, match="position 2 after 0"):
        gate.accept_prob(_step(), 2)
    with pytest.raises(SprinterError, match="hidden_prev_layer"):
        LearnedGate(Recorder(), ("hidden", "hidden_prev_layer"), 0.5).accept_prob(_step(with_prev=False), 0)
    with pytest.raises(SprinterError, match="prev_mean"):
        Verifier(VerifierInfo(features=NEW, hidden_size=4, arch=default_arch(vocab_size=16))).set_normalisation(
            torch.zeros(4), torch.ones(4), torch.zeros(6), torch.ones(6))
    assert set(VECTORS) < set(KNOWN)


def test_first_prompts_keeps_the_lowest_prompt_indices():
    prompt_index = torch.tensor([5, 5, 2, 2, 9, 7, 7])
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    assert first_prompts(prompt_index, rows, 2).tolist() == [0, 1, 2, 3]


def test_sprinter_decodes_with_a_new_feature_verifier(tiny_pair, tmp_path):
    """The decode loop supplies every optional feature: the earlier layer and the block so far."""
    hidden = AutoConfig.from_pretrained(tiny_pair / "draft").hidden_size
    vocab = AutoConfig.from_pretrained(tiny_pair / "draft").vocab_size
    info = VerifierInfo(features=NEW, hidden_size=hidden, arch=default_arch(width=8, depth=1, vocab_size=vocab),
                        draft={"name": "draft", "fingerprint": fingerprint(str(tiny_pair / "draft"))},
                        default_threshold=0.5)
    torch.manual_seed(0)
    save_verifier(tmp_path / "v", Verifier(info), info)
    decoder = Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), verifier=tmp_path / "v",
                                      device="cpu", dtype="float32")
    out = decoder.generate("def f(x):", mode="sprinter", max_new_tokens=12)
    assert out.stats.new_tokens == 12 and out.stats.verifier_calls >= 1


def test_every_ablation_row_is_a_valid_train_config():
    from sprinter.train.ablation import ROWS, AblationConfig

    assert "default" in ROWS and len(ROWS) > 1
    for name, (_, overrides) in ROWS.items():
        cfg = TrainConfig(**overrides)  # a row naming an unknown feature or option would fail here, not after hours
        for key, value in overrides.items():  # ... and each override is what the row trains with
            got = getattr(cfg, key)
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == \
                (tuple(value) if isinstance(value, (list, tuple)) else value), (name, key)
    with pytest.raises(SprinterError, match="nope"):
        AblationConfig(rows=("default", "nope"))
