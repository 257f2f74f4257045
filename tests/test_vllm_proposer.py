"""The sprinter vLLM proposer without vLLM: its per-request caches, its chains and its configuration, driven the way
vLLM's model runner drives it (one `propose` per step with each row's tokens). tests/test_vllm.py runs it in vLLM."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from sprinter.errors import SprinterError
from sprinter.integrations.vllm import CONFIG_ENV, SprinterProposer, load_config, match_rows
from sprinter.pairs.load import load_model

pytestmark = pytest.mark.usefixtures("single_thread")
K = 4


def make_proposer(tmp_path, monkeypatch, pair, *, verifier=True, **extra):
    cfg = {"draft": str(pair / "draft"), "verifier": str(pair / "verifier") if verifier else None, **extra}
    (tmp_path / "proposer.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "proposer.yaml"))
    spec = SimpleNamespace(num_speculative_tokens=K)
    model = SimpleNamespace(max_model_len=256, get_vocab_size=lambda: 10**6)
    proposer = SprinterProposer(SimpleNamespace(speculative_config=spec, model_config=model))
    proposer.load_model(torch.nn.Linear(1, 1))  # vLLM's target: only its device is read
    return proposer


def greedy(draft, seq, n):
    """The draft's greedy continuation of seq, without a cache (the reference)."""
    ids = torch.tensor([list(seq)])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, draft(ids).logits[:, -1:].argmax(-1)], 1)
    return ids[0, len(seq):].tolist()


def step(proposer, seqs):
    """One vLLM step: the batch's rows, as token_ids_cpu / num_tokens_no_spec hold them."""
    table = np.zeros((len(seqs), 256), dtype=np.int32)
    for i, s in enumerate(seqs):
        table[i, : len(s)] = s
    return proposer.propose([[s[-1]] for s in seqs], np.array([len(s) for s in seqs]), table)


def test_match_rows_pairs_each_request_with_the_cache_it_continues():
    a, b, c = np.array([1, 2, 3]), np.array([4, 5]), np.array([7, 8])
    assert match_rows([a, b], [np.array([4, 5, 6]), c, np.array([1, 2, 9, 9])]) == [1, None, 0]
    # two requests with the same prompt take one cache each
    assert match_rows([a, a], [np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5])]) == [1, 0] or \
        match_rows([a, a], [np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5])]) == [0, 1]


def test_chains_follow_the_draft_across_steps_rejections_and_finished_requests(vllm_pair, tmp_path, monkeypatch):
    """Without a verifier every chain is the draft's greedy K tokens after the request's tokens, step after step,
    after the target kept only part of a chain, with requests leaving, joining and reordered."""
    proposer = make_proposer(tmp_path, monkeypatch, vllm_pair, verifier=False)
    draft = load_model(str(vllm_pair / "draft"), "draft", torch.device("cpu"), torch.float32)
    seqs = [[5, 17, 33, 2], [9, 9, 40], [100, 3, 3, 3, 8]]
    chains = step(proposer, seqs)
    assert chains == [greedy(draft, s, K) for s in seqs]
    # the target keeps 2 of row 0's tokens then corrects, all of row 1's (+ a bonus token); row 2 finished
    seqs = [seqs[1] + chains[1] + [11], seqs[0] + chains[0][:2] + [77], [60, 61]]  # reordered, one new
    chains = step(proposer, seqs)
    assert chains == [greedy(draft, s, K) for s in seqs]
    assert len(proposer.held) == 3 and proposer.lm.batch_size == 3  # row 2's cache freed, the new one admitted
    seqs = [seqs[2] + [chains[2][0] + 1]]
    assert step(proposer, seqs) == [greedy(draft, seqs[0], K)]
    assert proposer.lm.batch_size == 1


def test_the_verifier_ends_each_chain_at_its_first_flagged_token(vllm_pair, tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    seqs = [[5, 17, 33, 2], [9, 9, 40], [100, 3, 3, 3, 8], [1, 2], [300, 301, 302]]
    always = make_proposer(tmp_path, monkeypatch, vllm_pair, threshold=1.0)  # every token flagged
    assert [len(c) for c in step(always, seqs)] == [1] * len(seqs)
    never = make_proposer(tmp_path, monkeypatch, vllm_pair, threshold=0.0)  # none flagged
    assert [len(c) for c in step(never, seqs)] == [K] * len(seqs)
    gated = make_proposer(tmp_path, monkeypatch, vllm_pair, trace=str(trace))
    lengths = []
    for _ in range(4):
        chains = step(gated, seqs)
        lengths += [len(c) for c in chains]
        for chain, full in zip(chains, step(never, seqs)):
            assert chain == full[: len(chain)]  # a prefix of the ungated chain: the verifier only stops it
        seqs = [s + c + [c[0]] for s, c in zip(seqs, chains)]
    assert len(set(lengths)) > 1 and min(lengths) >= 1
    assert [len(line) for line in trace.read_text().splitlines()] and \
        [n for line in trace.read_text().splitlines() for n in yaml.safe_load(line)] == lengths


def test_rows_that_sampled_nothing_get_no_chain(vllm_pair, tmp_path, monkeypatch):
    proposer = make_proposer(tmp_path, monkeypatch, vllm_pair)
    table = np.zeros((2, 256), dtype=np.int32)
    table[0, :3] = [5, 6, 7]
    chains = proposer.propose([[7], []], np.array([3, 10]), table)
    assert chains[1] == [] and 1 <= len(chains[0]) <= K


def test_bad_configurations_are_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(SprinterError, match=CONFIG_ENV):
        load_config()
    file = tmp_path / "p.yaml"
    for text, expected in (("draft: d\nthreshhold: 0.5\n", "unknown option"), ("draft: d\nthreshold: 2\n", "threshold"),
                           ("verifier: v\n", "draft")):
        file.write_text(text)
        with pytest.raises(SprinterError, match=expected):
            load_config(file)


def test_the_vllm_benchmark_rows_spreads_and_table():
    from sprinter.bench.vllm import BenchVllmConfig, report, spread, vllm_methods

    assert spread([3.0]) == {"median": 3.0, "q1": 3.0, "q3": 3.0, "n": 1}
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0, "n": 5}
    cfg = BenchVllmConfig(ks=(2, 4), concurrency=(4,))
    names = [name for name, _ in vllm_methods(cfg)]
    assert names == ["vllm-plain", "vllm-draft-k2", "vllm-draft-k4", "vllm-sprinter-k8", "vllm-ngram-k4"]
    assert dict(vllm_methods(cfg))["vllm-sprinter-k8"]["model"] == "sprinter.integrations.vllm.SprinterProposer"
    row = {"name": "vllm-plain", "engine": "vllm", "batch1_ms_per_token": spread([1.0, 2.0]),
           "tokens_per_s": {"4": spread([100.0])}}
    results = {"config": {"pair": "p", "num_prompts": 2, "max_new_tokens": 8, "threads": 1, "repeats": 1,
                          "concurrency": [4]}, "hardware": {"cpu": "x"},
               "libraries": {"vllm": "0", "torch": "0", "transformers": "0"}, "rows": [row]}
    assert "| vllm-plain | vllm | 1.50 [1.25, 1.75] | 100.0 [100.0, 100.0] | - | - |" in report(results)
    with pytest.raises(SprinterError, match="concurrency"):
        BenchVllmConfig(concurrency=())


def test_the_batched_gate_equals_the_decoders_gate_token_by_token():
    """accept_probs (every request at once) gives what LearnedGate gives one token at a time, for every feature."""
    from sprinter.decode.drafters import DraftStep
    from sprinter.decode.gates import LearnedGate
    from sprinter.features import KNOWN
    from sprinter.integrations.vllm import accept_probs
    from sprinter.verifier import Verifier, VerifierInfo, default_arch

    B, V, H, n = 3, 20, 8, 4
    torch.manual_seed(0)
    info = VerifierInfo(features=KNOWN, hidden_size=H, arch=default_arch(width=16, depth=1, vocab_size=V, token_dim=4))
    verifier = Verifier(info).eval()
    logits, hidden = torch.randn(n, B, V) * 3, torch.randn(n, B, 2, H)
    x = logits.argmax(-1)  # (n, B)
    with torch.no_grad():
        batched_gate, block_probs, batched = LearnedGate(verifier, KNOWN, 0.5), [], []
        for pos in range(n):
            block_probs.append(torch.softmax(logits[pos], -1).gather(-1, x[pos][:, None])[:, 0])
            batched.append(accept_probs(batched_gate, logits[pos], x[pos], hidden[pos], block_probs, pos))
        for b in range(B):
            gate = LearnedGate(verifier, KNOWN, 0.5)
            for pos in range(n):
                q = torch.softmax(logits[pos, b], -1)
                step = DraftStep(token=x[pos, b], q=q, q_soft=q, hidden=hidden[pos, b, 0],
                                 hidden_prev=hidden[pos, b, 1])
                assert torch.allclose(gate.accept_prob(step, pos), batched[pos][b], atol=1e-6)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_benchmark_without_vllm_is_one_line_before_any_work(tiny_pair, tmp_path, capsys):
    from conftest import load_script

    from sprinter.errors import run_cli

    out = tmp_path / "out"
    assert run_cli(load_script("bench_vllm").main, ["--pair", str(tiny_pair), "--verifier", str(tmp_path),
                                               "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "vLLM is not installed" in err and "install_vllm.sh" in err
    assert not out.exists()  # refused before the Decoder rows or any file
