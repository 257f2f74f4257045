"""The training stage: it learns, exports what it measured, resumes, runs under 2-process DDP, refuses bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import torch_threads

from sprinter.data.synthetic import write_shards
from sprinter.train.baselines import score_rows, weighted_bce
from sprinter.train.calibrate import operating_point
from sprinter.train.data import loader, open_folders, split_prompts
from sprinter.train.fit import TrainConfig, parse_train_config, train
from sprinter.verifier import Verifier, VerifierInfo, default_arch, load_verifier

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "train" / "tiny.yaml")
FEATURES = ("hidden", "token_id", "draft_prob", "draft_entropy", "position")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and two threads fight badly on a shared 2-core runner."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), num_prompts=60, tokens_per_prompt=40)


def test_loss_decreases_on_a_learnable_rule(shards):
    torch.manual_seed(0)
    _, table = open_folders([shards], FEATURES, "sprinter")
    info = VerifierInfo(features=FEATURES, hidden_size=16, arch=default_arch(width=32, vocab_size=32, token_dim=4))
    verifier = Verifier(info)
    optimizer = torch.optim.Adam(verifier.parameters(), lr=1e-2)
    rows = torch.arange(len(table))
    full = next(iter(loader(table, FEATURES, "sprinter", rows, len(rows), shuffle=False)))

    def loss_on_all() -> float:
        with torch.no_grad():
            return weighted_bce(verifier.eval()(full), full["label"], 1.0, 1.0).item()

    before = loss_on_all()
    for epoch in range(5):
        verifier.train()
        for batch in loader(table, FEATURES, "sprinter", rows, 256, shuffle=True, seed=epoch):
            loss = weighted_bce(verifier(batch), batch["label"], 1.0, 1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert loss_on_all() < 0.8 * before


def test_train_exports_a_calibrated_verifier_that_reproduces_its_metrics(shards, tmp_path):
    out = tmp_path / "out"
    decode = write_shards(tmp_path / "decode", num_prompts=60, tokens_per_prompt=10, seed=1)  # another context source
    cfg = parse_train_config(["--config", TINY, "--data", str(shards), "--out", str(out), "--budgets", "0.05", "0.2",
                              "--eval-data", str(decode)])
    metrics = train(cfg)
    on_decode = metrics["eval_data"][str(decode)]
    assert on_decode["samples"] == 10 * metrics["splits"]["test"]["prompts"]  # the test prompts only
    assert set(on_decode) == {"samples", "context_source", "verifier", "draft_prob", "logistic_regression", "linear"}
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert json.loads((out / "train_config.json").read_text())["type"] == "TrainConfig"
    assert set(metrics["baselines"]) == {"draft_prob", "logistic_regression", "linear"}
    for report in (metrics["verifier"], *metrics["baselines"].values()):
        assert set(report["operating_points"]) == {"0.05", "0.2"} and 0 <= report["auroc"] <= 1
        assert report["operating_points"]["0.05"]["val_false_accept"] <= 0.05
    assert metrics["verifier"]["auroc"] > 0.6

    verifier, info = load_verifier(out, draft_fingerprint="synthetic", hidden_size=16)
    assert info.default_threshold == metrics["verifier"]["operating_points"]["0.05"]["threshold"]
    assert info.thresholds == {k: p["threshold"] for k, p in metrics["verifier"]["operating_points"].items()}
    # Re-scoring the test split with the exported file gives exactly the reported operating points.
    _, table = open_folders([shards], FEATURES, "sprinter")
    test_rows = split_prompts(table.column("prompt_index"), cfg.val_fraction, cfg.test_fraction, cfg.seed)["test"]
    scores, labels = score_rows(verifier, table, FEATURES, "sprinter", test_rows)
    for key, threshold in info.thresholds.items():
        assert operating_point(scores, labels, threshold) == {
            k: metrics["verifier"]["operating_points"][key][k] for k in ("threshold", "false_accept", "true_accept",
                                                                         "pass_rate")}
    linear, linear_info = load_verifier(out / "baselines" / "linear")
    assert linear_info.features == ("hidden",) and sum(p.numel() for p in linear.parameters()) == 17

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = EventAccumulator(str(next((out / "tensorboard").glob("version_*")))).Reload()
    tags = run.Tags()
    assert {"val/auroc", "val/ap", "val/accuracy", "val/calibration_error", "val/true_accept@0.05",
            "train/loss_epoch"} <= set(tags["scalars"])
    assert {"val/score_accepted", "val/score_rejected"} <= set(tags["histograms"])
    assert "val/pr_curve" in tags["tensors"]

    resumed = train(parse_train_config(["--config", TINY, "--data", str(shards), "--out", str(out), "--epochs", "4",
                                        "--resume", "last", "--no-baselines"]))
    assert resumed["epochs_run"] == 4


def test_the_progress_bar_says_how_long_the_remaining_epochs_take(shards, tmp_path, capsys):
    train(parse_train_config(["--config", TINY, "--data", str(shards), "--out", str(tmp_path / "out"), "--epochs", "2",
                              "--progress", "--no-baselines"]))
    bars = capsys.readouterr().out  # Lightning draws its bars on stdout
    assert "Epoch 1/2" in bars and "Epoch 2/2 (at most " in bars and " left)" in bars


def test_a_resumed_training_ends_where_an_uninterrupted_one_does(shards, tmp_path, monkeypatch):
    """A 4-epoch run stopped after its 2nd epoch and resumed from last.ckpt ends with the weights of the same run
    left alone: within 1e-6 (float summation order; a lost optimizer or schedule state, or a data order that
    restarts, moves them by ~1e-3), with the same best epoch and the same test AUROC. With dropout: its masks come
    from torch's global generator, whose state last.ckpt keeps (without it the two runs differ by ~1e-3)."""
    import lightning as L

    import sprinter.train.fit as fit_module

    argv = ["--config", TINY, "--data", str(shards), "--epochs", "4", "--dropout", "0.1", "--no-baselines"]
    whole = train(parse_train_config([*argv, "--out", str(tmp_path / "whole")]))

    class StopAfterSecondEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch >= 1:
                trainer.should_stop = True

    make_trainer = fit_module.make_trainer

    def stopping(cfg, out):
        trainer = make_trainer(cfg, out)
        trainer.callbacks.append(StopAfterSecondEpoch())
        return trainer

    monkeypatch.setattr(fit_module, "make_trainer", stopping)
    cut = train(parse_train_config([*argv, "--out", str(tmp_path / "cut")]))
    assert cut["epochs_run"] == 2
    monkeypatch.setattr(fit_module, "make_trainer", make_trainer)
    resumed = train(parse_train_config([*argv, "--out", str(tmp_path / "cut"), "--resume", "last"]))
    assert (resumed["epochs_run"], whole["epochs_run"]) == (4, 4) and resumed["best_epoch"] == whole["best_epoch"]
    last = {run: torch.load(tmp_path / run / "lightning" / "last.ckpt", map_location="cpu",
                            weights_only=True)["state_dict"] for run in ("cut", "whole")}
    assert last["cut"].keys() == last["whole"].keys()
    for name, weight in last["whole"].items():
        torch.testing.assert_close(last["cut"][name], weight, rtol=0, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert resumed["verifier"]["auroc"] == pytest.approx(whole["verifier"]["auroc"], abs=1e-6)

@pytest.mark.slow
def test_two_process_gloo_ddp_with_soft_labels(shards, tmp_path):
    cfg = parse_train_config(["--config", TINY, "--data", str(shards), "--out", str(tmp_path), "--devices", "2",
                              "--accelerator", "cpu", "--strategy", "ddp_fork", "--epochs", "2", "--label-rule",
                              "soft", "--neg-weight", "6", "--no-baselines"])
    metrics = train(cfg)
    assert metrics["label_rule"] == "soft" and metrics["eval_label"] == "accept_soft"
    assert metrics["verifier"]["auroc"] > 0.5
    assert load_verifier(tmp_path)[1].label_rule == "soft"


def test_every_train_preset_parses():
    presets = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    assert {"paper", "specdec", "tiny", "wide"} <= {p.stem for p in presets}
    for path in presets:
        assert isinstance(parse_train_config(["--config", str(path)]), TrainConfig)


@pytest.mark.parametrize("argv, message", [
    (["--label-rule", "maybe"], "label_rule: got 'maybe'"),
    (["--budgets", "0.05", "1.5"], "budgets"),
    (["--features", "token_id"], "including 'hidden'"),
    (["--resume", "nowhere.ckpt"], "resume: got 'nowhere.ckpt'"),
])
def test_bad_options_are_refused(shards, tmp_path, argv, message):
    with pytest.raises(Exception, match=message):
        train(parse_train_config(["--config", TINY, "--data", str(shards), "--out", str(tmp_path / "o"), *argv]))
    assert not (tmp_path / "o" / "lightning").exists()


def test_script_refuses_a_folder_without_manifest(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--data", str(tmp_path),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "has no manifest.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_auto_label_rule_follows_the_collection_temperature(tmp_path):
    from sprinter.data.shards import read_manifest
    from sprinter.train.data import auto_label_rule

    folders = []
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        folder = write_shards(tmp_path / name, num_prompts=3, tokens_per_prompt=2)
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "temperature": temperature}))
        folders.append(read_manifest(folder))
    assert auto_label_rule(folders[:1]) == "greedy" and auto_label_rule(folders[1:]) == "sprinter"
    with pytest.raises(Exception, match="temperatures"):
        auto_label_rule(folders)
