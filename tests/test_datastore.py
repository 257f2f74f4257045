"""The datastore: suffix-array order, lookups on hand-made corpora, build/load round trip, refusals, the CLI."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import datastore_of

from sprinter.config import parse_config
from sprinter.data.datastore import DatastoreConfig, build_datastore, suffix_array, write_datastore
from sprinter.decode.datastore import SAMPLE, Datastore, tokenizer_fingerprint
from sprinter.errors import SprinterError, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")  # the decoding tests at the end: tiny models, one thread

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_datastore.py"
EOS = 0


def naive_suffix_array(tokens: list[int]) -> list[int]:
    """Suffixes sorted with each EOS a distinct symbol ordered by position (what the lookups rely on)."""
    def key(p):
        out = []
        for q in range(p, len(tokens)):
            out.append((tokens[q], q + 1 if tokens[q] == EOS else 0))
            if tokens[q] == EOS:
                break
        return out

    return sorted(range(len(tokens)), key=key)


@pytest.mark.parametrize("seed", range(6))
def test_suffix_array_equals_a_naive_sort(seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 1 + seed % 3 + 2, rng.integers(1, 40)).tolist() for _ in range(rng.integers(1, 6))]
    docs += docs[:1]  # a repeated document: ties broken only at its EOS
    tokens = np.array([t for d in docs for t in (*d, EOS)], dtype=np.int32)
    assert suffix_array(tokens, EOS).tolist() == naive_suffix_array(tokens.tolist())


def test_longest_match_and_the_most_frequent_continuation():
    ds = datastore_of([[7, 1, 2, 3, 9], [1, 2, 3, 9], [1, 2, 4], [8, 2, 5]], eos_id=EOS)
    assert ds.chain([1, 2], 5) == [3, 9]  # 3 follows (1, 2) twice, 4 once; then 9; then the documents end
    assert ds.chain([1, 2], 1) == [3]  # stops at s
    assert ds.chain([6, 8, 2], 4) == [5]  # the longest suffix that occurs: (8, 2)
    assert ds.chain([6, 6, 2], 4) == [3, 9]  # only (2,) occurs: 3 follows it twice, 4 and 5 once
    assert ds.chain([6, 6, 2], 4, n=3, min_n=2) == []  # min_n=2: a 1-gram is not enough
    assert ds.chain([5], 3) == []  # 5 ends its document
    assert ds.chain([6], 3) == [] and ds.chain([], 3) == [] and ds.chain([1], 0) == []


def test_ties_go_to_the_smaller_id_and_matches_never_cross_documents():
    ds = datastore_of([[1, 6], [1, 5], [2]], eos_id=EOS)
    assert ds.chain([1], 3) == [5]
    assert ds.chain([6], 3) == []  # not [1, 5]: the next document is not a continuation
    assert ds.chain([6, EOS, 1], 3) == [5]  # the context is cut after its EOS: only (1,) is looked up


def naive_chain(tokens: list[int], context: list[int], s: int, n: int, min_n: int) -> list[int]:
    """The documented rule, by brute force: longest suffix of the context that occurs, then greedily the
    most frequent next token among the occurrences still alive (smallest id on ties), stopping at EOS."""
    for m in range(min(n, len(context)), min_n - 1, -1):
        alive = [p + m for p in range(len(tokens) - m) if tokens[p : p + m] == context[-m:]]
        out = []
        while alive and len(out) < s:
            counts = {}
            for q in alive:
                counts[tokens[q]] = counts.get(tokens[q], 0) + 1
            token = min(counts, key=lambda t: (-counts[t], t))
            if token == EOS:
                break
            out.append(token)
            alive = [q + 1 for q in alive if tokens[q] == token]
        if out:
            return out
    return []


@pytest.mark.parametrize("seed", range(4))
def test_lookups_equal_the_rule_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 5, rng.integers(1, 60)).tolist() for _ in range(8)]
    ds = datastore_of(docs, eos_id=EOS)
    tokens = ds.tokens.tolist()
    for _ in range(50):
        context = rng.integers(1, 6, rng.integers(0, 5)).tolist()
        n, min_n, s = int(rng.integers(1, 5)), 1, int(rng.integers(1, 9))
        min_n = int(rng.integers(1, n + 1))
        assert ds.chain(context, s, n, min_n) == naive_chain(tokens, context, s, n, min_n), (context, s, n, min_n)


def test_large_ranges_are_counted_on_a_sample():
    docs = [[1, 2]] * (SAMPLE + 40) + [[1, 3, 4]] * (SAMPLE + 60)
    ds = datastore_of(docs, eos_id=EOS)
    assert ds.chain([1], 4) == [3, 4]


# ------------------------------------------------------------------------------------ build and load
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.py").write_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n")
    (folder / "b.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 3)
    (folder / "c.py").write_text("import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n")
    return folder


@pytest.fixture(scope="module")
def built(tiny_pair, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "ds"
    manifest = build_datastore(DatastoreConfig(pair=str(tiny_pair), corpus=str(corpus), split="all", out=str(out)))
    return out, manifest


def tokenizer_of(pair):
    from sprinter.pairs.load import load_tokenizer

    return load_tokenizer(str(pair / "target"))


def test_build_and_load_round_trip(built, tiny_pair, corpus):
    out, manifest = built
    tok = tokenizer_of(tiny_pair)
    ds = Datastore.open(out, tokenizer=tok)
    ds.verify()
    texts = [(corpus / name).read_text() for name in ("a.py", "b.txt", "c.py")]
    expected = [t for text in texts for t in (*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    assert ds.tokens.tolist() == expected and len(ds) == manifest["tokens"] == len(expected)
    assert isinstance(ds.tokens.base, np.memmap) and not ds.tokens.flags.writeable  # mapped, read-only
    assert manifest["vocab_size"] == len(tok) and manifest["documents"] == 3
    assert json.loads((out / "config.json").read_text())["type"] == "DatastoreConfig"
    prompt = tok("def sub(a, b):\n    return a", add_special_tokens=False)["input_ids"]
    assert tok.decode(ds.chain(prompt, 3, n=4)).startswith(" -")
    assert not list(out.parent.glob(".*tmp*"))  # the temporary folder was renamed into place


def test_an_existing_datastore_is_kept_unless_overwrite(built, tiny_pair, corpus, capsys):
    out, manifest = built
    same = DatastoreConfig(pair=str(tiny_pair), corpus=str(corpus), split="all", out=str(out))
    assert build_datastore(same) == manifest and "nothing to do" in capsys.readouterr().out
    with pytest.raises(SprinterError, match="--overwrite"):
        build_datastore(DatastoreConfig(pair=str(tiny_pair), corpus=str(corpus), split="all", out=str(out),
                                        max_tokens=100))


def copy_of(out: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(out, tmp_path / "copy"))


def flip(file: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= mask
    file.write_bytes(bytes(data))


def test_a_truncated_file_is_refused(built, tmp_path):
    ds = copy_of(built[0], tmp_path)
    data = (ds / "suffixes.npy").read_bytes()
    (ds / "suffixes.npy").write_bytes(data[:-8])
    with pytest.raises(SprinterError, match=r"suffixes\.npy.*truncated"):
        Datastore.open(ds)


@pytest.mark.parametrize("offset", [3, 20, 130])  # the magic string, the header dict, the first data bytes
def test_flipped_header_bytes_are_refused(built, tmp_path, offset):
    ds = copy_of(built[0], tmp_path)
    flip(ds / "tokens.npy", offset)
    with pytest.raises(SprinterError, match=r"tokens\.npy.*header"):
        Datastore.open(ds)


def test_damage_past_the_checked_head_is_found_by_verify(tmp_path):
    tokens = np.arange(40_000, dtype=np.int32) % 97 + 1
    tokens[-1] = EOS
    write_datastore(tmp_path / "ds", tokens, suffix_array(tokens, EOS), {"vocab_size": 100, "eos_id": EOS})
    flip(tmp_path / "ds" / "tokens.npy", 128 + 4 * 37_500, mask=1)  # the low byte of an id: still in the vocabulary
    ds = Datastore.open(tmp_path / "ds")  # the cheap check reads the first 64 KiB only
    with pytest.raises(SprinterError, match=r"tokens\.npy.*SHA-256"):
        ds.verify()


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    tokens = np.array([5, 60, EOS], dtype=np.int32)
    write_datastore(tmp_path / "ds", tokens, suffix_array(tokens, EOS), {"vocab_size": 50, "eos_id": EOS})
    with pytest.raises(SprinterError, match=r"tokens\.npy.*beyond the vocabulary of 50"):
        Datastore.open(tmp_path / "ds")


def test_a_manifest_that_was_edited_or_from_another_version_is_refused(built, tmp_path):
    ds = copy_of(built[0], tmp_path)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 7}))
    with pytest.raises(SprinterError, match=r"manifest\.json.*checksum"):
        Datastore.open(ds)
    (ds / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(SprinterError, match=r"manifest\.json.*version is 99.*version 1"):
        Datastore.open(ds)
    (ds / "manifest.json").write_text("{not json")
    with pytest.raises(SprinterError, match="not valid JSON"):
        Datastore.open(ds)
    with pytest.raises(SprinterError, match="not found"):
        Datastore.open(tmp_path / "nowhere")


def test_a_datastore_for_another_tokenizer_is_refused(built, corpus):
    from sprinter.corpus import load_documents
    from sprinter.pairs.train import train_tokenizer

    other = train_tokenizer(load_documents(str(corpus), "all"), 300)
    with pytest.raises(SprinterError, match=r"manifest\.json.*another tokenizer.*'vocab_size': 300"):
        Datastore.open(built[0], tokenizer=other)
    assert tokenizer_fingerprint(other) != built[1]["tokenizer_fingerprint"]


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def script_main():
    spec = importlib.util.spec_from_file_location("build_datastore_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_arguments_mean_the_demo_datastore(script_main):
    cfg = parse_config(DatastoreConfig, [], "", default_config=script_main.DEFAULT)
    assert (cfg.pair, cfg.corpus, cfg.split, cfg.out) == ("demo", "stdlib", "train", "checkpoints/datastores/demo")


@pytest.mark.parametrize("argv,message", [
    (["--max-tokens", "1"], "max_tokens: got 1"),
    (["--max-tokens", "many"], "--max-tokens: got 'many'"),
    (["--split", "dev"], "split"),
    (["--pair", "nowhere"], "pair: got 'nowhere'"),
])
def test_bad_arguments_give_one_line_and_exit_2(script_main, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # no preset pair here: a check that came too late would build one (minutes)
    monkeypatch.setattr("sprinter.pairs.build.build_pair", lambda *a, **k: pytest.fail("a pair was built"))
    assert run_cli(script_main.main, argv + ["--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_the_script_builds_a_datastore(tiny_pair, corpus, tmp_path):
    out = tmp_path / "ds"
    run = subprocess.run([sys.executable, str(SCRIPT), "--pair", str(tiny_pair), "--corpus", str(corpus), "--split",
                          "all", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"datastore {out}/: " in run.stdout and (out / "manifest.json").is_file()


# ------------------------------------------------------------------------------------ decoding with it
def test_ngram_decoding_with_a_datastore_equals_ar(built, gpt2_decoder):
    """The datastore changes what is drafted, never the output: with a corpus whose chains the (scrambled)
    target mostly rejects, and with one made of ar's own outputs (mostly accepted)."""
    out, _ = built
    dec = gpt2_decoder
    prompts = [[5, 9, 3], [7, 1, 2, 8, 8, 4, 6, 2, 1]]
    ar = [dec.generate(p, mode="ar", max_new_tokens=24).token_ids for p in prompts]
    eos = dec.tokenizer.eos_token_id
    for store in (Datastore.open(out, tokenizer=dec.tokenizer),
                  datastore_of([p + a for p, a in zip(prompts, ar)], eos)):
        dec.datastore = store
        outs = dec.generate(prompts, mode="ngram", max_new_tokens=24, ngram_k=4)
        assert [o.token_ids for o in outs] == ar
    dec.datastore = None
    assert sum(o.stats.accepted for o in outs) > 0  # the second store's chains were used


def test_the_decoder_loads_a_datastore_and_refuses_one_for_another_tokenizer(built, tiny_pair, tmp_path):
    from sprinter.decode.decoder import Decoder
    from sprinter.errors import SprinterError

    out, _ = built
    dec = Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), device="cpu", datastore=out)
    assert isinstance(dec.datastore, Datastore)
    with pytest.raises(SprinterError, match="datastore: .*not found"):
        Decoder.from_pretrained(str(tiny_pair / "draft"), str(tiny_pair / "target"), device="cpu", datastore=tmp_path)


def test_overwrite_never_deletes_a_folder_that_is_not_a_datastore(tiny_pair, corpus, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    cfg = DatastoreConfig(pair=str(tiny_pair), corpus=str(corpus), split="all", out=str(tmp_path), overwrite=True)
    with pytest.raises(SprinterError, match="holds no manifest.json"):
        build_datastore(cfg)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
