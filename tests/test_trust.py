"""A verifier that cannot be trusted is refused, and training never leaves a broken file under a good name (issue 27).

Each class of fault is tried as a user would meet it: a damaged or hand-edited verifier checkpoint, a full disk
or a diverging run during training, a training folder reused, data folders with foreign files, conflicting
command-line options. Each must end in one `error:` line (exit 2) or a documented warning, never a traceback
and never a silent decode. Tests of the scripts run their `main` under `run_cli`, as tests/test_bad_inputs.py does.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script, torch_threads, train_argv
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sprinter.errors import SprinterError, SprinterWarning, run_cli
from sprinter.verifier import Verifier, VerifierInfo, default_arch, load_verifier, save_verifier

ROOT = Path(__file__).resolve().parent.parent
H, V = 12, 50
FEATURES = ("hidden", "token_id", "draft_prob", "draft_entropy")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _script(name: str):
    return load_script(name).main


# Loaded at import, outside any test's captured stderr: Lightning binds its log handler to the stderr of the moment.
MAINS = {name: _script(name) for name in ("train", "generate", "benchmark")}


def script(name: str):
    return MAINS[name]


def one_error(capsys, *names) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------ 1. the verifier at load
def probe_rows(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden": torch.randn(n, H, generator=g), "token_id": torch.randint(0, V, (n,), generator=g),
            "draft_prob": torch.rand(n, generator=g), "draft_entropy": torch.rand(n, generator=g) * 3}


def trained_like(tmp_path, bias: float = 0.0) -> Path:
    """A verifier written as scripts/train.py writes one: calibrated thresholds and a probe."""
    torch.manual_seed(0)
    info = VerifierInfo(features=FEATURES, hidden_size=H, arch=default_arch(width=16, depth=2, vocab_size=V,
                                                                             token_dim=4),
                        thresholds={"0.05": 0.5838, "0.1": 0.4}, default_budget=0.05, default_threshold=0.5838)
    verifier = Verifier(info)
    verifier.set_normalisation(torch.zeros(H), torch.ones(H) * 0.9, torch.tensor([0.5, 1.0]), torch.tensor([0.3, 1.0]))
    with torch.no_grad():
        verifier.net[-1].bias.fill_(bias)
    return save_verifier(tmp_path, verifier, info, probe_rows())


def tamper(file: Path, case: str) -> None:
    with safe_open(str(file), "pt") as handle:
        meta = handle.metadata()
    state = load_file(str(file))
    last = [k for k in state if k.startswith("net.") and k.endswith(".bias")][-1]
    if case == "one_nan":
        state["net.0.weight"][3, 5] = float("nan")
    elif case == "all_nan":
        state = {k: (torch.full_like(v, float("nan")) if k.startswith("net.") else v) for k, v in state.items()}
    elif case == "all_inf":
        state = {k: (torch.full_like(v, float("inf")) if k.startswith("net.") else v) for k, v in state.items()}
    elif case == "inf_bias":
        state[last].fill_(float("inf"))
    elif case == "huge_bias":
        state[last].fill_(1e30)
    elif case == "zero_std":
        state["hidden_std"][2] = 0.0
    elif case == "nan_scalar_std":
        state["scalar_std"][0] = float("nan")
    elif case == "edited_weights":
        state["net.0.weight"] *= 3
    elif case == "reordered":
        meta["features"] = json.dumps(["hidden", "token_id", "draft_entropy", "draft_prob"])
    elif case == "renamed":
        meta["features"] = json.dumps(["hidden", "token_id", "draft_prob", "position"])
    elif case in ("default_threshold", "thresholds"):
        meta.pop(case)
    elif case == "zero_threshold":
        meta["default_threshold"] = "0"
    save_file(state, str(file), metadata=meta)


@pytest.mark.parametrize("case, named", [
    ("one_nan", "net.0.weight holds 1 NaN or infinite"),
    ("all_nan", "NaN or infinite"),
    ("all_inf", "NaN or infinite"),
    ("inf_bias", "holds 1 NaN or infinite"),
    ("huge_bias", "holds a value of 1e+30"),
    ("zero_std", "hidden_std holds 1 value(s) <= 0"),
    ("nan_scalar_std", "scalar_std holds 1 NaN"),
    ("edited_weights", "probe rows stored at save time differ"),
    ("reordered", "do not match the feature spec"),
    ("renamed", "do not match the feature spec"),
    ("default_threshold", "lacks ['default_threshold']"),
    ("thresholds", "lacks ['thresholds']"),
    ("zero_threshold", "default_threshold is 0"),
])
def test_a_verifier_that_cannot_be_trusted_is_refused_at_load(tmp_path, case, named):
    file = trained_like(tmp_path)
    load_verifier(file)  # whole, it loads
    tamper(file, case)
    with pytest.raises(SprinterError, match=re.escape(named)) as err:
        load_verifier(file)
    assert str(file) in str(err.value)


@pytest.mark.parametrize("bias, named", [(40.0, "passes every one"), (-40.0, "flags every one")])
def test_a_degenerate_verifier_loads_with_a_warning(tmp_path, bias, named):
    file = trained_like(tmp_path, bias=bias)
    with pytest.warns(SprinterWarning, match=named):
        load_verifier(file)


def test_a_nan_verifier_is_one_line_at_the_cli(capsys, tmp_path, tiny_pair):
    from sprinter.pairs.load import fingerprint

    config = json.loads((tiny_pair / "draft" / "config.json").read_text())
    hidden = config.get("n_embd") or config["hidden_size"]
    info = VerifierInfo(features=("hidden",), hidden_size=hidden, arch=default_arch(width=8, depth=1),
                        draft={"name": "tiny", "fingerprint": fingerprint(str(tiny_pair / "draft"))})
    file = save_verifier(tmp_path, Verifier(info), info)
    tamper(file, "inf_bias")
    assert run_cli(script("generate"), ["--pair", str(tiny_pair), "--verifier", str(file), "--device", "cpu",
                                        "--max-new-tokens", "4"]) == 2
    one_error(capsys, str(file), "NaN or infinite")


# ------------------------------------------------------------------------------------ 3-5. training's files
def cut_short(path: Path) -> list[Path]:
    """Files under a final name that do not read whole (a torch zip archive or a safetensors file)."""
    import zipfile

    bad = []
    for file in path.rglob("*"):
        if file.suffix == ".ckpt" and not zipfile.is_zipfile(file):
            bad.append(file)
        elif file.suffix == ".safetensors":
            try:
                load_file(str(file))
            except Exception:  # noqa: BLE001 - any failure to read is what this looks for
                bad.append(file)
    return bad


def test_a_diverging_run_is_one_line(capsys, tmp_path, shards):
    out = tmp_path / "t"
    assert run_cli(script("train"), train_argv(shards, out, "--lr", "1000")) == 2
    one_error(capsys, "diverged in epoch 0", "smaller --lr")
    assert not (out / "verifier.safetensors").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("finished") / "t"
    assert run_cli(script("train"), train_argv(shards, out)) == 0
    return out


@pytest.mark.parametrize("case, argv, named", [
    ("finished", [], "already holds a finished verifier"),
    ("interrupted", [], "holds an interrupted training"),
    ("both", ["--resume", "last", "--overwrite"], "expected at most one"),
    ("foreign", ["--resume", "FOREIGN", "--seed", "3"], "seed=0 there, 3 here"),
])
def test_training_folder_rules_match_collect(capsys, tmp_path, shards, finished, case, argv, named):
    out = tmp_path / "t"
    shutil.copytree(finished, out)
    if case == "interrupted":  # as a kill -9 after an epoch leaves it
        for name in ("verifier.safetensors", "metrics.json"):
            (out / name).unlink()
    before = (out / "verifier.safetensors").read_bytes() if case == "finished" else None
    argv = [str(finished / "lightning" / "last.ckpt") if a == "FOREIGN" else a for a in argv]
    capsys.readouterr()
    assert run_cli(script("train"), train_argv(shards, out, *argv)) == 2
    one_error(capsys, named)
    if before is not None:
        assert (out / "verifier.safetensors").read_bytes() == before


def test_overwrite_replaces_a_finished_training(capsys, tmp_path, shards, finished):
    out = tmp_path / "t"
    shutil.copytree(finished, out)
    assert run_cli(script("train"), train_argv(shards, out, "--overwrite")) == 0
    load_verifier(out)


def failing_save_file(real):
    """safetensors' save_file on a disk that fills up: half the file, then safetensors' own error type."""
    from safetensors import SafetensorError

    def save_file(state, path, metadata=None):
        real(state, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:len(data) // 2])
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No "
                              "space left on device\" }) os error 28")
    return save_file


def test_a_full_disk_at_the_verifier_write_is_one_line_and_the_advice_works(capsys, tmp_path, shards, monkeypatch):
    import safetensors.torch

    out = tmp_path / "t"
    real = safetensors.torch.save_file
    calls = []

    def fill_at_the_final_write(state, path, metadata=None):  # the best epoch's file is written; the final one not
        calls.append(path)
        target = failing_save_file(real) if Path(path).name.startswith(".verifier.safetensors") else real
        return target(state, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_at_the_final_write)
    assert run_cli(script("train"), train_argv(shards, out)) == 2
    line = one_error(capsys, "verifier.safetensors", "No space left", "--resume last")
    assert not (out / "verifier.safetensors").exists() and not cut_short(out)
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert "--resume last" in line
    assert run_cli(script("train"), train_argv(shards, out, "--resume", "last")) == 0  # the advice works
    load_verifier(out)


@pytest.mark.parametrize("limit", [6_000, 20_000])
def test_a_full_disk_during_training_leaves_no_cut_short_file(tmp_path, shards, limit):
    """A real short write: the process may write no file larger than `limit` bytes (RLIMIT_FSIZE), so every larger
    file is cut short by the kernel mid-write, as on a full disk."""
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *train_argv(shards, out)],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rerun the same command" in errors[0], proc.stderr[-2000:]
    assert not cut_short(out)


def test_ctrl_c_in_training_is_one_line_and_exit_130(capsys, tmp_path, shards, monkeypatch):
    import signal

    from sprinter.train.module import VerifierModule

    def interrupt(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(VerifierModule, "training_step", interrupt)
    handler = signal.getsignal(signal.SIGINT)
    assert run_cli(script("train"), train_argv(shards, tmp_path / "t")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Detected KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("interrupted: training stopped")
    assert signal.getsignal(signal.SIGINT) == handler


# ------------------------------------------------------------------------------------ 6. data and CLI gaps
def test_a_shard_of_another_source_is_refused(capsys, tmp_path, shards):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    shard = data / "shard-00001.safetensors"
    save_file(load_file(str(shard)), str(shard), metadata={"source": "decode", "draft": "synthetic"})
    assert run_cli(script("train"), train_argv(data, tmp_path / "t")) == 2
    one_error(capsys, shard.name, "'decode' contexts", "'corpus'")


def test_a_shard_of_other_collection_settings_is_refused(capsys, tmp_path, shards):
    """A shard copied in from a collection of the same pair and source but other settings (here: another
    temperature) holds rows of another experiment: refused, naming the shard. Its fingerprint covers only the
    settings that change what a row means (ROW_SETTINGS), so a resumed or larger run of the same settings matches."""
    from sprinter.data.shards import MANIFEST, settings_fingerprint

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["config"] = {**manifest.get("config", {}), "temperature": 0.0, "num_prompts": 100}
    (data / MANIFEST).write_text(json.dumps(manifest))
    same = {**manifest["config"], "num_prompts": 5000, "batch_size": 3}  # another size, the same rows
    for name, config in (("shard-00000.safetensors", same), ("shard-00001.safetensors",
                                                           {**manifest["config"], "temperature": 0.8})):
        shard = data / name
        save_file(load_file(str(shard)), str(shard), metadata={"settings": settings_fingerprint(config)})
    assert run_cli(script("train"), train_argv(data, tmp_path / "t")) == 2
    one_error(capsys, "shard-00001.safetensors", "other settings")


def test_an_unlisted_shard_is_reported(tmp_path, shards):
    from sprinter.train.data import open_folders

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    shutil.copy(data / "shard-00001.safetensors", data / "shard-00007.safetensors")
    with pytest.warns(SprinterWarning, match=r"shard-00007.safetensors.*does not list"):
        open_folders([data], ("hidden",), "sprinter")


@pytest.mark.parametrize("mode", ["sd", "sprinter", "ar"])
def test_prompt_and_prompts_file_conflict_in_every_mode(capsys, tmp_path, tiny_pair, mode):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f():\n")
    gate = ["--gate", "confidence"] if mode == "sprinter" else []
    assert run_cli(script("generate"), ["--pair", str(tiny_pair), "--mode", mode, *gate, "--prompt", "def g():",
                                        "--prompts-file", str(prompts), "--device", "cpu"]) == 2
    one_error(capsys, "'def g():'", str(prompts), "conflict")


@pytest.mark.parametrize("prompt, named", [([True, False], "token id(s) [True, False]"), ([1, True], "[True]")])
def test_bools_are_not_token_ids(gpt2_decoder, prompt, named):
    with pytest.raises(SprinterError, match=re.escape(named)):
        gpt2_decoder.generate(prompt, mode="ar", max_new_tokens=2)


def test_an_empty_verifier_path_is_named_as_given(tiny_pair):
    from sprinter.decode.decoder import Decoder

    with pytest.raises(SprinterError, match="verifier: got ''"):
        Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), verifier="")


# ------------------------------------------------------------------------------------ 2. the decode-time guard
def test_the_false_accept_meter_uses_the_speculative_sampling_rejection():
    from sprinter.decode.stats import DecodeStats, FalseAcceptMeter

    meter, stats = FalseAcceptMeter(), DecodeStats(mode="sprinter")
    meter.add(torch.tensor([0.5, 0.2, 0.0]), torch.tensor([0.25, 0.4, 0.3]))  # never, sometimes (0.5), always
    meter.add(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))  # greedy: one-hot p and q
    meter.write(stats)
    assert stats.passed_unchecked == 5 and stats.false_accept_rate == pytest.approx((0 + 0.5 + 1 + 0 + 1) / 5)


@pytest.mark.parametrize("false_accepts, passed, flagged, calls, warned", [
    (2.0, 100, 30, 130, False),  # 0.02 passed-rejected, flag rate 0.23: as promised
    (60.0, 100, 0, 100, True),  # the draft's output under a sprinter label: passes nearly everything
    (0.0, 0, 100, 100, True),  # flags every token
    (10.0, 20, 0, 20, False),  # too few tokens to tell
])
def test_the_guard_rule(false_accepts, passed, flagged, calls, warned):
    from sprinter.decode.stats import promise_warning

    message = promise_warning(false_accepts, passed, flagged, calls, promised_false_accept=0.05,
                              promised_flag_rate=0.25)
    assert (message is not None) == warned


def test_a_verifier_that_passes_everything_is_flagged_at_decode_time(gpt2_decoder):
    from sprinter.decode.decoder import Decoder
    from sprinter.decode.gates import LearnedGate

    pair = gpt2_decoder.pair
    info = VerifierInfo(features=("hidden",), hidden_size=pair.draft.config.hidden_size,
                        arch=default_arch(depth=0), thresholds={"0.05": 0.6}, default_budget=0.05,
                        default_threshold=0.6, rates={"0.05": {"pass_rate": 0.7, "false_accept_share": 0.03}})
    verifier = Verifier(info).eval()
    with torch.no_grad():
        verifier.net[-1].bias.fill_(30.0)  # finite, but accepts every drafted token
    dec = Decoder(pair, LearnedGate(verifier, info.features, 0.6), info)
    with pytest.warns(SprinterWarning, match="false-accept rate .* promised 0.030"):
        out = dec.generate("def f():", mode="sprinter", max_new_tokens=64, max_block=8)
    stats = out.stats
    assert stats.passed_unchecked > 30 and stats.flagged == 0 and stats.promised_false_accept == 0.03
    assert stats.false_accept_rate > 0.2 and stats.verifier_warning is not None
    # the measurement agrees with the target itself: greedy, so a false accept is a token that is not its argmax
    strict = dec.generate("def f():", mode="sd", k=8, max_new_tokens=64)
    assert stats.to_dict()["false_accept_rate"] == stats.false_accept_rate
    assert strict.token_ids != out.token_ids


def test_the_benchmark_marks_a_row_off_its_promise():
    from sprinter.bench.report import guard

    row = {"passed_unchecked": 100, "false_accepts": 60.0, "flagged": 0, "verifier_calls": 100,
           "promised_false_accept": 0.05, "promised_flag_rate": 0.25}
    assert "false-accept rate 0.600" in guard([row])["verifier_warning"]
    assert guard([{**row, "false_accepts": 3.0, "flagged": 25}])["verifier_warning"] is None


def test_the_guard_is_one_warning_line_at_the_cli(capsys, tmp_path, tiny_pair):
    from sprinter.pairs.load import fingerprint

    config = json.loads((tiny_pair / "draft" / "config.json").read_text())
    info = VerifierInfo(features=("hidden",), hidden_size=config.get("n_embd") or config["hidden_size"],
                        arch=default_arch(depth=0), thresholds={"0.05": 0.6}, default_budget=0.05,
                        default_threshold=0.6, rates={"0.05": {"pass_rate": 0.7, "false_accept_share": 0.03}},
                        draft={"name": "tiny", "fingerprint": fingerprint(str(tiny_pair / "draft"))})
    verifier = Verifier(info)
    with torch.no_grad():
        verifier.net[-1].bias.fill_(-30.0)  # flags every token: promised a flag rate of 0.3
    file = save_verifier(tmp_path, verifier, info)
    assert run_cli(script("generate"), ["--pair", str(tiny_pair), "--verifier", str(file), "--device", "cpu",
                                        "--mode", "sprinter", "--max-new-tokens", "80"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "flag rate 1.000" in warned[0] and "promised 0.300" in warned[0], err


def test_an_older_checkpoint_takes_its_promise_from_metrics_json(tmp_path, tiny_pair):
    from sprinter.decode.decoder import Decoder
    from sprinter.pairs.load import fingerprint

    config = json.loads((tiny_pair / "draft" / "config.json").read_text())
    info = VerifierInfo(features=("hidden",), hidden_size=config.get("n_embd") or config["hidden_size"],
                        arch=default_arch(depth=0), thresholds={"0.05": 0.6}, default_budget=0.05,
                        default_threshold=0.6,
                        draft={"name": "tiny", "fingerprint": fingerprint(str(tiny_pair / "draft"))})
    save_verifier(tmp_path, Verifier(info), info)
    (tmp_path / "metrics.json").write_text(json.dumps({"verifier": {"accept_rate": 0.8, "operating_points": {
        "0.05": {"threshold": 0.6, "false_accept": 0.05, "true_accept": 0.5, "pass_rate": 0.41}}}}))
    dec = Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), verifier=str(tmp_path))
    assert dec.verifier_info.rates_at(0.6) == {"pass_rate": 0.41, "false_accept_share": pytest.approx(0.01 / 0.41)}
