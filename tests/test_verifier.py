"""The verifier checkpoint contract the decode path relies on: round trip, refusals, the paper's baseline."""

import pytest
import torch

from sprinter.errors import SprinterError
from sprinter.verifier import (
    Verifier,
    VerifierInfo,
    default_arch,
    load_verifier,
    read_info,
    save_verifier,
)

H, V = 12, 50
FEATURES = ("hidden", "token_id", "draft_prob", "draft_entropy", "position")


def make_features(n=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden": torch.randn(n, H, generator=g).to(dtype), "token_id": torch.randint(0, V, (n,), generator=g),
            "draft_prob": torch.rand(n, generator=g), "draft_entropy": torch.rand(n, generator=g) * 3,
            "position": torch.randint(0, 100, (n,), generator=g)}


def make_info(**kw):
    values = dict(features=FEATURES, hidden_size=H, arch=default_arch(width=16, depth=2, vocab_size=V, token_dim=4),
                  label_rule="sprinter", draft={"name": "tiny-draft", "fingerprint": "abc123"},
                  thresholds={"0.05": 0.8, "0.1": 0.6}, default_budget=0.05, default_threshold=0.8)
    values.update(kw)
    return VerifierInfo(**values)


def test_round_trip_gives_identical_scores(tmp_path):
    torch.manual_seed(0)
    verifier = Verifier(make_info())
    verifier.set_normalisation(torch.randn(H), torch.rand(H) + 0.5, torch.tensor([0.5, 1.0, 50.0]),
                               torch.tensor([0.3, 1.0, 30.0]))
    verifier.eval()
    feats = make_features()
    with torch.no_grad():
        before = verifier(feats)
    file = save_verifier(tmp_path, verifier, make_info())
    assert file.name == "verifier.safetensors" and not list(tmp_path.glob("*.tmp"))
    loaded, info = load_verifier(tmp_path, draft_fingerprint="abc123", hidden_size=H)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(feats), before)
    assert info.features == FEATURES and info.thresholds == {"0.05": 0.8, "0.1": 0.6}
    assert info.default_threshold == 0.8 and info.label_rule == "sprinter" and info.hidden_size == H
    assert info.draft == {"name": "tiny-draft", "fingerprint": "abc123"} and info.arch["depth"] == 2
    assert load_verifier(file)[1] == info  # the file path works as well as its folder


def test_half_precision_inputs_and_extra_features_are_accepted():
    verifier = Verifier(make_info()).eval()
    feats = make_features(dtype=torch.float16)
    feats["unused"] = torch.zeros(32)
    with torch.no_grad():
        out = verifier(feats)
        half = verifier.to(torch.float16)(feats)
    assert out.shape == (32,) and out.dtype == torch.float32 and half.dtype == torch.float32
    assert torch.allclose(out, half, atol=0.05)


def test_paper_linear_baseline_is_one_linear_layer(tmp_path):
    info = make_info(features=("hidden",), arch=default_arch(depth=0))
    verifier = Verifier(info)
    assert sum(p.numel() for p in verifier.parameters()) == H + 1
    save_verifier(tmp_path / "linear", verifier, info)
    loaded, _ = load_verifier(tmp_path / "linear")
    feats = {"hidden": torch.randn(5, H)}
    assert torch.equal(loaded(feats), verifier.eval()(feats))


def test_refusals_name_both_values(tmp_path):
    save_verifier(tmp_path, Verifier(make_info()), make_info())
    with pytest.raises(SprinterError, match="abc123.*other"):
        load_verifier(tmp_path, draft_fingerprint="other")
    with pytest.raises(SprinterError, match="12.*64"):
        load_verifier(tmp_path, hidden_size=64)
    with pytest.raises(SprinterError, match="expected a folder"):
        load_verifier(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "verifier.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SprinterError, match="not a readable"):
        load_verifier(tmp_path / "bad")
    with pytest.raises(SprinterError, match="missing feature"):
        Verifier(make_info())({"hidden": torch.zeros(2, H)})
    with pytest.raises(SprinterError, match="carry the target"):
        make_info(features=("hidden", "target_prob"))


def test_weights_that_disagree_with_metadata_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    file = save_verifier(tmp_path, Verifier(make_info()), make_info())
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(file))
    state.pop("net.0.weight")
    save_file(state, str(file), metadata=metadata)
    with pytest.raises(SprinterError, match="do not match"):
        load_verifier(tmp_path)
    assert read_info(tmp_path).features == FEATURES


def test_update_info_rewrites_the_metadata_and_keeps_the_weights(tmp_path):
    from safetensors.torch import load_file

    from sprinter.verifier import update_info

    info = VerifierInfo(features=("hidden",), hidden_size=4, arch=default_arch(depth=0))
    save_verifier(tmp_path, Verifier(info), info)
    before = load_file(str(tmp_path / "verifier.safetensors"))
    assert read_info(tmp_path).stop_threshold is None
    update_info(tmp_path, stop_threshold=0.4)
    assert read_info(tmp_path).stop_threshold == 0.4
    after = load_file(str(tmp_path / "verifier.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SprinterError, match="stop_threshhold"):
        update_info(tmp_path, stop_threshhold=0.4)
