"""No bad input ends in a traceback, and no fault loses or duplicates data (issue 19).

Each class of bad input runs through a real entry point, `scripts/<name>.py`'s `main` under `run_cli` (the
scripts' own edge), and must give exit code 2, one `error:` line naming the value, and no traceback. Most
cases run in this process (each subprocess imports torch: seconds); a handful run the scripts for real.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_script, torch_threads, train_argv
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sprinter.data.shards import complete_shards, load_columns, read_manifest
from sprinter.decode.decoder import Decoder
from sprinter.errors import SprinterError, run_cli
from sprinter.verifier import Verifier, VerifierInfo, default_arch, save_verifier

ROOT = Path(__file__).resolve().parent.parent
LATIN1 = "café = 'naïve'\n".encode("latin-1")  # not UTF-8: 0xe9 starts a multi-byte sequence that never ends


@pytest.fixture(scope="module", autouse=True)
def one_thread(tiny_pair):
    """One torch thread (tiny models on a busy machine), set after the tiny pair is built with the default."""
    with torch_threads(1):
        yield


script = load_script


@pytest.fixture(scope="module")
def mains():
    return {name: script(name).main for name in ("collect", "train", "generate", "benchmark", "make_pair",
                                                 "build_datastore", "bench_batch", "bench_async", "bench_collect",
                                                 "bench_ngram", "bench_train_speed")}


def one_error(capsys, *names) -> str:
    """The run's stderr is one `error:` line (progress bars aside) naming each of `names`; returns it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A .jsonl corpus of Python source: enough 24-token windows for a few tiny collections."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    source = (ROOT / "sprinter" / "decode" / "decoder.py").read_text()
    chunk = len(source) // 12
    path.write_text("".join(json.dumps({"text": source[i * chunk:(i + 1) * chunk]}) + "\n" for i in range(12)))
    return path


def collect_argv(pair, data, out, *extra):
    return ["--config", str(ROOT / "configs/collect/tiny.yaml"), "--draft", str(pair / "draft"), "--target",
            str(pair / "target"), "--dataset", str(data), "--split", "all", "--out", str(out), "--device", "cpu",
            "--no-progress", "--threads", "1", *extra]


# ------------------------------------------------------------------------------------ command lines
@pytest.mark.parametrize("name", ["collect", "train", "generate", "benchmark", "make_pair", "build_datastore",
                                  "bench_batch", "bench_async", "bench_collect", "bench_ngram", "bench_train_speed"])
@pytest.mark.parametrize("bad", ["flag", "number"])
def test_argparse_errors_are_one_line(mains, capsys, name, bad):
    number = {"make_pair": "--target-steps", "build_datastore": "--max-tokens", "bench_ngram": "--repeats",
              "bench_train_speed": "--rows", "train": "--epochs", "generate": "--k",
              "bench_batch": "--seed"}.get(name, "--num-prompts")
    argv, named = (["--no-such-flag"], "--no-such-flag") if bad == "flag" else ([number, "many"], "'many'")
    assert run_cli(mains[name], argv) == 2
    one_error(capsys, named)


EDGES = {  # script: {a command line of it: what its one error line names}
    "generate": {"--mode ngram --i-knee inf": "i_knee: got inf", f"--seed {2**64}": "seed: got 18446744073709551616",
                 "--seed -1": "seed: got -1", "--temperature inf": "temperature: got inf",
                 "--threads 100000": "threads: got 100000"},
    "collect": {"--threads -2": "threads: got -2", "--temperature inf": "temperature: got inf",
                "--temperature nan": "temperature: got nan", "--split bogus": "'train', 'val', 'test', 'all'"},
    "benchmark": {"--temperature inf": "temperature: got inf", f"--seed {2**63}": "seed: got"},
    "bench_batch": {"--threads 100000": "threads: got 100000"},
    "train": {"--lr inf": "got inf/", "--neg-weight inf": "got 0.001/1.0/inf",
              "--warmup-fraction nan": "warmup_fraction: got nan", "--warmup-fraction -1": "warmup_fraction: got -1.0",
              "--weight-decay nan": "weight_decay: got nan", "--precision bogus": "precision: got 'bogus'",
              "--strategy bogus": "strategy: got 'bogus'", "--budgets 0.05 inf": "budgets: got [0.05, inf]"},
    "make_pair": {"--lr nan": "lr: got nan"},
}


@pytest.mark.parametrize("name, line, named",
                         [(name, line, named) for name, lines in EDGES.items() for line, named in lines.items()])
def test_numbers_at_the_edge_are_refused_where_parsed(mains, capsys, tmp_path, name, line, named):
    assert run_cli(mains[name], line.split() + ([] if name == "generate" else ["--out", str(tmp_path / "out")])) == 2
    one_error(capsys, named)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_refused(mains, capsys, tmp_path):
    assert run_cli(mains["train"], ["--accelerator", "gpu", "--out", str(tmp_path / "out")]) == 2
    one_error(capsys, "accelerator: got 'gpu'", "0 CUDA GPU")


# ------------------------------------------------------------------------------------ text and YAML
def test_text_that_is_not_utf8_is_refused_naming_file_and_line(mains, capsys, tmp_path, tiny_pair):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"def f():\n" + LATIN1)
    assert run_cli(mains["generate"], ["--pair", str(tiny_pair), "--mode", "ar", "--prompts-file", str(prompts)]) == 2
    one_error(capsys, str(prompts), "line 2", "0xe9")
    config = tmp_path / "train.yaml"
    config.write_bytes(b"epochs: 2\n# " + LATIN1)
    assert run_cli(mains["train"], ["--config", str(config), "--out", str(tmp_path / "t")]) == 2
    one_error(capsys, str(config), "line 2")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_corpus_that_is_not_utf8_is_refused_and_leaves_nothing(mains, capsys, tmp_path, tiny_pair, corpus, suffix):
    data = tmp_path / f"corpus{suffix}"
    text = corpus.read_bytes() if suffix == ".jsonl" else b"\n\n".join(json.loads(line)["text"].encode()
                                                                        for line in corpus.read_text().splitlines())
    bad = b'{"text": "' + LATIN1.strip() + b'"}\n' if suffix == ".jsonl" else LATIN1 + b"\n\n"
    data.write_bytes(bad + text)  # first: the run stops before its first shard
    out = tmp_path / "out"
    assert run_cli(mains["collect"], collect_argv(tiny_pair, data, out, "--num-prompts", "1000")) == 2
    one_error(capsys, str(data), "line ")
    assert not (out / "config.json").exists()  # a refused run leaves nothing to block the corrected rerun


def test_yaml_keys_that_are_not_names_are_refused(mains, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("1: 2\n")
    assert run_cli(mains["train"], ["--config", str(config), "--out", str(tmp_path / "t")]) == 2
    one_error(capsys, "got key 1")


def test_a_prompt_with_bytes_that_are_not_utf8_is_refused(mains, capsys, tiny_pair):
    prompt = b"def f(\xff):".decode("utf-8", "surrogateescape")  # how Python receives such bytes from argv
    assert run_cli(mains["generate"], ["--pair", str(tiny_pair), "--mode", "ar", "--prompt", prompt,
                                       "--device", "cpu"]) == 2
    one_error(capsys, "prompt: got", "not text")


# ------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("name", ["collect", "train", "benchmark", "build_datastore", "make_pair"])
def test_an_out_that_is_a_file_is_one_line(mains, capsys, tmp_path, name):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for out in (blocker, blocker / "below"):
        assert run_cli(mains[name], ["--out", str(out)]) == 2
        one_error(capsys, str(blocker), "expected")
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say")
def test_paths_without_permission_are_one_line(mains, capsys, tmp_path, shards):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run_cli(mains["train"], train_argv(shards, locked / "out")) == 2
    one_error(capsys, "Permission denied", "expected")


# ------------------------------------------------------------------------------------ artifacts
def test_a_foreign_shard_is_refused_when_read(mains, capsys, tmp_path, tiny_pair, corpus):
    out = tmp_path / "data"
    assert run_cli(mains["collect"], collect_argv(tiny_pair, corpus, out)) == 0
    shard = complete_shards(out)[-1]
    with safe_open(str(shard), "pt") as handle:
        meta = handle.metadata()
    save_file(load_file(str(shard)), str(shard), metadata={**meta, "draft": "another-draft"})
    capsys.readouterr()
    assert run_cli(mains["train"], train_argv(out, tmp_path / "t")) == 2
    one_error(capsys, shard.name, "'another-draft'")


def test_a_corrupt_config_on_resume_is_one_line(mains, capsys, tmp_path, tiny_pair, corpus):
    out = tmp_path / "data"
    assert run_cli(mains["collect"], collect_argv(tiny_pair, corpus, out)) == 0
    (out / "manifest.json").unlink()
    (out / "config.json").write_text('{"draft": ')
    capsys.readouterr()
    assert run_cli(mains["collect"], collect_argv(tiny_pair, corpus, out, "--resume")) == 2
    one_error(capsys, "config.json", "not valid JSON")


def fake_checkpoint(path: Path, width: int) -> Path:
    """Plain data in a torch zip archive, shaped like a Lightning checkpoint of scripts/train.py."""
    info = VerifierInfo(features=("hidden", "token_id", "draft_prob", "draft_entropy"), hidden_size=16,
                        arch=default_arch(width=width, depth=2, token_dim=4, vocab_size=32))
    state = {f"verifier.{k}": v for k, v in Verifier(info).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {}, "best": {"auroc": 0.5, "epoch": 0},
                "pytorch-lightning_version": "2"}, path)
    return path


@pytest.mark.parametrize("case, named", [
    ("pickle", "not a torch zip archive"),
    ("verifier", "not a torch zip archive"),
    ("truncated", "not a torch zip archive"),
    ("code", "holds more than tensors"),
    ("width", "has shape [16] there and [32] in this run"),
])
def test_a_resume_file_is_checked_without_unpickling(mains, capsys, tmp_path, shards, case, named):
    import pickle

    file = tmp_path / "resume.ckpt"
    if case == "pickle":
        file.write_bytes(pickle.dumps({"state_dict": {}}))
    elif case == "verifier":
        info = VerifierInfo(features=("hidden",), hidden_size=16, arch=default_arch(depth=0))
        save_verifier(file.with_suffix(".safetensors"), Verifier(info), info).rename(file)
    elif case == "truncated":
        file.write_bytes(fake_checkpoint(tmp_path / "whole.ckpt", 32).read_bytes()[:3000])
    elif case == "code":  # a zip archive whose pickle calls a function: weights_only refuses to run it
        torch.save({"state_dict": {}, "hook": os.getcwd}, file)
    else:
        fake_checkpoint(file, 16)
    assert run_cli(mains["train"], train_argv(shards, tmp_path / "t", "--resume", str(file))) == 2
    line = one_error(capsys, str(file), named)
    assert "weights_only" not in line


@pytest.fixture(scope="module")
def good_verifier(tmp_path_factory, tiny_pair):
    from sprinter.pairs.load import fingerprint

    hidden = json.loads((tiny_pair / "draft" / "config.json").read_text())
    hidden = hidden.get("n_embd") or hidden["hidden_size"]
    info = VerifierInfo(features=("hidden", "token_id"), hidden_size=hidden,
                        arch=default_arch(width=8, depth=1, token_dim=2, vocab_size=4096),
                        draft={"name": "tiny", "fingerprint": fingerprint(str(tiny_pair / "draft"))})
    return save_verifier(tmp_path_factory.mktemp("verifier"), Verifier(info), info)


@pytest.mark.parametrize("field, value, named", [
    ("hidden_size", '"64"', "hidden_size is '64'"),
    ("thresholds", '"0.5"', "thresholds is '0.5'"),
    ("arch", '{"depth": 1, "norm": "layer", "dropout": 0.0}', "metadata arch is"),
    ("features", "[]", "features is []"),
    ("vocab", None, "embeds 8 token ids"),
    ("weights", None, "net.0.weight has shape"),
])
def test_verifier_metadata_is_checked_before_anything_is_built(mains, capsys, tmp_path, tiny_pair, good_verifier,
                                                               field, value, named):
    with safe_open(str(good_verifier), "pt") as handle:
        meta = handle.metadata()
    state = load_file(str(good_verifier))
    if field == "vocab":  # a token embedding with fewer rows than the pair's vocabulary
        arch = {**json.loads(meta["arch"]), "vocab_size": 8}
        meta["arch"] = json.dumps(arch)
        state["token_embedding.weight"] = state["token_embedding.weight"][:8].clone()
    elif field == "weights":
        state["net.0.weight"] = torch.zeros(3, 3)
    else:
        meta[field] = value
    file = tmp_path / "verifier.safetensors"
    save_file(state, str(file), metadata=meta)
    assert run_cli(mains["generate"], ["--pair", str(tiny_pair), "--verifier", str(file), "--device", "cpu",
                                       "--max-new-tokens", "4"]) == 2
    one_error(capsys, str(file), named)


def test_an_empty_model_folder_names_the_model(mains, capsys, tmp_path):
    for role in ("draft", "target"):
        (tmp_path / role).mkdir()
    assert run_cli(mains["generate"], ["--draft", str(tmp_path / "draft"), "--target", str(tmp_path / "target"),
                                       "--mode", "ar", "--device", "cpu"]) == 2
    one_error(capsys, str(tmp_path / "draft"))


# ------------------------------------------------------------------------------------ the Python API
@pytest.mark.parametrize("kwargs, named", [
    ({"prompt": None}, "prompt: got NoneType"),
    ({"seed": "x"}, "seed: got 'x'"),
    ({"seed": 2**64}, "seed: got"),
    ({"gate": object(), "mode": "sprinter"}, "gate: got <object"),
    ({"temperature": float("inf")}, "temperature: got inf"),
    ({"mode": "ngram", "i_knee": float("inf")}, "i_knee: got inf"),
    ({"prompt": "a\udcffb"}, "not text"),
    ({"on_text": 5}, "on_text: got 5"),
    ({"prompt": ["a", 5], "mode": "sd"}, "prompt: got int 5"),
])
def test_the_api_names_the_bad_argument(gpt2_decoder, kwargs, named):
    kwargs = {"prompt": "def f():", "mode": "ar", "max_new_tokens": 2, **kwargs}
    with pytest.raises(SprinterError, match=named.replace("(", r"\(").replace("[", r"\[")):
        gpt2_decoder.generate(kwargs.pop("prompt"), **kwargs)


def test_from_pretrained_names_a_verifier_that_is_not_a_path(tiny_pair):
    with pytest.raises(SprinterError, match="verifier: got 123"):
        Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), verifier=123)


# ------------------------------------------------------------------------------------ the folder lock
def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


SLOW_COLLECT = """
import sys, time
import sprinter.data.collect as c
from sprinter.errors import run_cli
real = c.batch_rows
def slow(*args, **kwargs):  # a real collection, slowed so that a second one starts while it runs
    time.sleep(0.4)
    return real(*args, **kwargs)
c.batch_rows = slow
sys.exit(run_cli(lambda argv: c.collect(c.parse_collect_config(argv)), sys.argv[1:]))
"""


def test_two_collects_into_one_folder_end_with_a_refusal_and_an_intact_folder(mains, capsys, tmp_path, tiny_pair,
                                                                               corpus):
    out = tmp_path / "data"
    argv = collect_argv(tiny_pair, corpus, out, "--num-prompts", "16")
    first = subprocess.Popen([sys.executable, "-c", SLOW_COLLECT, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(out / ".lock", first)
    for extra in (["--resume"], []):  # a resumed run and a fresh one, both while the first holds the folder
        assert run_cli(mains["collect"], argv + extra) == 2
        one_error(capsys, "in use by another collect", f"pid {first.pid}")
    _, err = first.communicate(timeout=600)  # generous: a loaded CI machine is slow, not wrong
    assert first.returncode == 0, err
    manifest = read_manifest(out)
    prompts = load_columns(out, ["prompt_index"])["prompt_index"]
    assert manifest["num_prompts"] == 16 and manifest["num_samples"] == 16 * 8
    assert torch.equal(torch.bincount(prompts), torch.full((16,), 8))  # every prompt once: none lost or repeated
    assert not (out / ".lock").exists()


def test_a_stale_lock_of_a_killed_collect_is_taken_over(mains, capsys, tmp_path, tiny_pair, corpus):
    out = tmp_path / "data"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "what": "collect"}))
    assert run_cli(mains["collect"], collect_argv(tiny_pair, corpus, out)) == 0
    assert f"pid {dead.pid}" in capsys.readouterr().err
    assert read_manifest(out)["num_samples"] == 64


# ------------------------------------------------------------------------------------ real processes
@pytest.mark.parametrize("name, argv, named", [
    ("generate", ["--threads", "100000"], "threads: got 100000"),
    ("collect", ["--no-such-flag"], "--no-such-flag"),
    ("train", ["--lr", "inf"], "got inf/"),
    ("benchmark", ["--out", "/dev/null/x"], "/dev/null"),
])
def test_the_scripts_themselves_exit_2_with_one_line(tmp_path, name, argv, named):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], proc.stderr


# ------------------------------------------------------------------------------------ found by the battery
def test_an_error_is_not_glued_to_the_progress_bar(mains, capsys, tmp_path, tiny_pair):
    argv = [a for a in collect_argv(tiny_pair, tmp_path / "missing.jsonl", tmp_path / "out") if a != "--no-progress"]
    assert run_cli(mains["collect"], argv) == 2
    one_error(capsys, "missing.jsonl")  # its own line: the bar is closed before the error prints
    assert not (tmp_path / "out").exists()


def test_a_moved_collection_resumes(mains, capsys, tmp_path, tiny_pair, corpus):
    import shutil

    assert run_cli(mains["collect"], collect_argv(tiny_pair, corpus, tmp_path / "a")) == 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert run_cli(mains["collect"], collect_argv(tiny_pair, corpus, tmp_path / "b", "--resume")) == 0
    assert read_manifest(tmp_path / "b")["num_samples"] == 64
