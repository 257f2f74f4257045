"""The data stage's onpolicy source: rows at the contexts a verifier's own sprinter loop reaches, several
continuations per prompt, resumable, and recorded as such in every shard and the manifest."""

import inspect
import json
import json.decoder
from pathlib import Path

import pytest
import torch
from conftest import collect_argv, write_corpus
from transformers import AutoConfig

import sprinter.data.collect as collect_module
from sprinter.data.collect import collect, parse_collect_config
from sprinter.data.contexts import iter_windows
from sprinter.data.shards import complete_shards, load_columns, read_header, read_manifest
from sprinter.errors import SprinterError, run_cli
from sprinter.verifier import Verifier, VerifierInfo, default_arch, save_verifier

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("onpolicy-text") / "docs.jsonl", inspect.getsource(json.decoder), 4)


@pytest.fixture(scope="module")
def verifier(tiny_pair, tmp_path_factory):
    """A verifier for the tiny draft whose scores pass some tokens and flag others."""
    width = AutoConfig.from_pretrained(tiny_pair / "draft").hidden_size
    info = VerifierInfo(features=("hidden",), hidden_size=width, arch=default_arch(depth=0), default_threshold=0.5)
    net = Verifier(info)
    with torch.no_grad():
        net.net[0].weight.copy_(torch.randn(net.net[0].weight.shape, generator=torch.Generator().manual_seed(0))
                                / width**0.5)
        net.net[0].bias.zero_()
    out = tmp_path_factory.mktemp("onpolicy-verifier")
    save_verifier(out, net, info)
    return out


def argv(pair, data, out, verifier, *extra):
    return collect_argv(pair, data, out, "--source", "onpolicy", "--verifier", str(verifier), "--num-prompts", "4",
                        "--batch-size", "2", *extra)


def run(args) -> int:
    return run_cli(lambda a: collect(parse_collect_config(a)), args)


def test_rows_come_from_several_continuations_per_prompt(tiny_pair, text_file, verifier, tmp_path):
    assert run(argv(tiny_pair, text_file, tmp_path / "one", verifier)) == 0
    assert run(argv(tiny_pair, text_file, tmp_path / "three", verifier, "--continuations", "3")) == 0
    one, three = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "three")
    assert one["context_source"] == three["context_source"] == "onpolicy"
    assert three["config"]["continuations"] == 3 and three["config"]["verifier"] == str(verifier)
    for shard in complete_shards(tmp_path / "three"):
        assert read_header(shard)[0]["__metadata__"]["source"] == "onpolicy"
    # tiny.yaml: 8 new tokens per continuation; every emitted position is a row (EOS may end one early)
    assert 0 < one["num_samples"] <= 4 * 8 and 2 * one["num_samples"] < three["num_samples"] <= 3 * 4 * 8
    assert one["num_prompts"] == three["num_prompts"] == 4  # a prompt's continuations share its index (and split)
    rows = load_columns(tmp_path / "three", ["prompt_index", "accept_soft", "context_length"])
    assert sorted(set(rows["prompt_index"].tolist())) == [0, 1, 2, 3]
    assert float(rows["accept_soft"].min()) >= 0 and float(rows["accept_soft"].max()) <= 1


def test_the_first_continuation_follows_the_sprinter_loop(tiny_pair, text_file, verifier, tmp_path):
    """At temperature 0 the rows' tokens are the draft's choices along the path the verifier's loop emitted: where
    the loop kept a drafted token, the row's token is the emitted one."""
    assert run(argv(tiny_pair, text_file, tmp_path / "d", verifier)) == 0
    rows = load_columns(tmp_path / "d", ["prompt_index", "token_id", "context_length"])
    cfg = parse_collect_config(argv(tiny_pair, text_file, tmp_path / "x", verifier))
    from sprinter.pairs.load import fingerprint, load_pair

    pair = load_pair(str(tiny_pair / "draft"), str(tiny_pair / "target"), "cpu", "float32")
    decoder = collect_module.onpolicy_decoder(cfg.verifier, pair, fingerprint(str(tiny_pair / "draft")))
    window = next(iter_windows(cfg, pair.tokenizer))[: cfg.prompt_len]
    out = decoder.generate(window.tolist(), mode="sprinter", max_new_tokens=cfg.max_new_tokens)
    mine = rows["prompt_index"] == 0
    assert rows["context_length"][mine].tolist() == list(range(cfg.prompt_len, cfg.prompt_len + len(out.token_ids)))
    kept = out.stats.accepted  # the loop's kept drafted tokens are the draft's greedy choices at their contexts
    agree = (rows["token_id"][mine] == torch.tensor(out.token_ids)).sum()
    assert agree >= kept


def test_an_interrupted_onpolicy_collection_resumes_to_the_same_rows(tiny_pair, text_file, verifier, tmp_path,
                                                                     monkeypatch):
    extra = ("--continuations", "2", "--temperature", "0.8")
    assert run(argv(tiny_pair, text_file, tmp_path / "whole", verifier, *extra)) == 0
    real, calls = collect_module.batch_rows, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "batch_rows", interrupted)
    assert run(argv(tiny_pair, text_file, tmp_path / "cut", verifier, *extra)) == 130
    monkeypatch.setattr(collect_module, "batch_rows", real)
    assert run(argv(tiny_pair, text_file, tmp_path / "cut", verifier, *extra, "--resume")) == 0
    names = ["prompt_index", "token_id", "context_length", "accept_soft", "hidden"]
    whole, cut = load_columns(tmp_path / "whole", names), load_columns(tmp_path / "cut", names)
    for name in names:
        assert torch.equal(whole[name], cut[name]), name


def test_onpolicy_options_are_checked():
    with pytest.raises(SprinterError, match="source: got 'onpolicy' and no verifier"):
        collect_module.CollectConfig(source="onpolicy")
    with pytest.raises(SprinterError, match="expected them only with source .onpolicy."):
        collect_module.CollectConfig(continuations=3)
    with pytest.raises(SprinterError, match="continuations: got 0"):
        collect_module.CollectConfig(source="onpolicy", verifier="v", continuations=0)
    with pytest.raises(SprinterError, match="expected them only with source .onpolicy."):
        collect_module.CollectConfig(held_out=True)
    with pytest.raises(SprinterError, match="onpolicy_tokens: got -1"):
        collect_module.CollectConfig(source="onpolicy", verifier="v", onpolicy_tokens=-1)
