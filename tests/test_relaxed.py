"""Relaxed acceptance (issue 26): the rules at the target's call (exact, ratio, entropy), the training-free
draft-side gates (entropy, margin), from written-out probabilities, then on the scrambled tiny pairs."""

from __future__ import annotations

import math

import pytest
import torch
from test_bench import bench_args, verifier  # noqa: F401  (the hand-made calibrated verifier, a fixture)

from sprinter.bench.compare import is_lossless
from sprinter.decode.acceptance import (
    RULES,
    entropy_keep,
    kept_count,
    lenient_accept,
    ratio_keep,
    ratio_tally,
    relaxed_checks,
    speculative_accept,
)
from sprinter.decode.drafters import DraftStep
from sprinter.decode.gates import EntropyGate, MarginGate
from sprinter.decode.options import DecodeOptions
from sprinter.errors import SprinterError

pytestmark = pytest.mark.usefixtures("single_thread")

# Three positions of a 3-token vocabulary; the target's soft distribution and the drafted tokens.
P_SOFT = torch.tensor([[0.50, 0.40, 0.10],   # x = 1: p(x) / max p = 0.8, entropy 0.94 nats
                       [0.90, 0.05, 0.05],   # x = 2: ratio 0.056, entropy 0.39
                       [0.34, 0.33, 0.33]])  # x = 0: the argmax (a match), entropy 1.10
X = torch.tensor([1, 2, 0])


def greedy_checks(rule: str, threshold: float) -> list[bool]:
    p = torch.nn.functional.one_hot(P_SOFT.argmax(-1), 3).float()  # the loop's greedy p and q are one-hot
    q = torch.nn.functional.one_hot(X, 3).float()
    pos = torch.arange(3)
    return relaxed_checks(rule, threshold, p[pos, X], q[pos, X], torch.zeros(3), P_SOFT, X, True).tolist()


def test_exact_keeps_only_matches():
    assert greedy_checks("exact", 0.0) == [False, False, True]


@pytest.mark.parametrize(("lam", "expected"), [(1.0, [False, False, True]),    # never a mismatch: exact
                                               (0.5, [True, False, True]),     # sometimes: the near-tie only
                                               (0.01, [True, True, True])])    # always
def test_ratio_rule_keeps_mismatches_the_target_finds_nearly_as_good(lam, expected):
    assert greedy_checks("ratio", lam) == expected
    assert ratio_keep(torch.tensor(0.4), torch.tensor(0.5), 0.8).item()  # at the bound: kept
    assert not ratio_keep(torch.tensor(0.4), torch.tensor(0.5), 0.81).item()


@pytest.mark.parametrize(("tau", "expected"), [(5.0, [False, False, True]),    # never: the target is sure enough
                                               (0.9, [True, False, True]),     # sometimes: only where H >= 0.9
                                               (0.0, [True, True, True])])     # always
def test_entropy_rule_keeps_mismatches_where_the_target_is_uncertain(tau, expected):
    assert greedy_checks("entropy", tau) == expected
    h = -(P_SOFT * P_SOFT.log()).sum(-1)
    assert entropy_keep(P_SOFT, float(h[0])).tolist() == [True, False, True]  # >=: a tie keeps


def test_lenient_rule_relaxes_the_speculative_ratio():
    p_x, q_x = torch.tensor([0.2, 0.2, 0.2]), torch.tensor([0.4, 0.4, 0.4])
    u = torch.tensor([0.45, 0.55, 0.99])
    assert lenient_accept(p_x, q_x, u, 1.0).tolist() == speculative_accept(p_x, q_x, u).tolist() == [True, False, False]
    assert lenient_accept(p_x, q_x, u, 0.5).tolist() == [True, True, True]  # p / (0.5 q) = 1: always
    pos = torch.arange(3)
    sampled = relaxed_checks("ratio", 0.8, p_x, q_x, u, torch.eye(3)[pos], pos, False)
    assert sampled.tolist() == [True, True, False]  # u < 0.625


@pytest.mark.parametrize(("lam", "expected"), [(1.0, [0, 0, 0]),    # never a mismatch kept
                                               (0.5, [0, 1, 1]),    # the near-tie: kept, and a false accept
                                               (0.01, [0, 3, 2])])  # every token: two mismatches and a match
def test_the_ratio_tally_counts_what_each_rule_keeps_and_the_false_accepts(lam, expected):
    p = torch.nn.functional.one_hot(P_SOFT.argmax(-1), 3).float()
    q = torch.nn.functional.one_hot(X, 3).float()
    pos = torch.arange(3)
    assert ratio_tally(lam, p[pos, X], q[pos, X], torch.zeros(3), P_SOFT, X, True).tolist() == expected


def test_the_sampled_ratio_tally_counts_rejection_probabilities():
    p_x, q_x = torch.tensor([0.2, 0.2, 0.2]), torch.tensor([0.4, 0.4, 0.4])
    u = torch.tensor([0.45, 0.55, 0.99])
    pos = torch.arange(3)
    # exact keeps the first (u q < p), the lenient ratio rule all three; each would be rejected w.p. 1 - 0.2 / 0.4
    assert ratio_tally(0.5, p_x, q_x, u, torch.eye(3)[pos], pos, False).tolist() == [1, 3, 1.5]
    assert ratio_tally(1.0, p_x, q_x, u, torch.eye(3)[pos], pos, False).tolist() == [1, 1, 0.5]


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="rule: got 'kl'"):
        relaxed_checks("kl", 0.1, torch.ones(1), torch.ones(1), torch.zeros(1), torch.ones(1, 1),
                       torch.zeros(1, dtype=torch.long), True)


def test_kept_count_strict_and_flagged():
    checks = torch.tensor([True, False, True])
    assert kept_count(checks, flagged=True, strict=True).item() == 1
    assert kept_count(checks, flagged=True, strict=False).item() == 3  # passed unchecked; the flagged one kept
    assert kept_count(torch.tensor([True, False]), flagged=True).item() == 1
    assert kept_count(torch.tensor([True, False]), flagged=False).item() == 2  # ended at max_block: none checked


def step(q: list[float], token: int) -> DraftStep:
    q = torch.tensor(q)
    return DraftStep(token=torch.tensor(token), q=q, q_soft=q, hidden=None)


def test_entropy_and_margin_gates_score_the_draft_alone():
    sure, torn = step([0.97, 0.01, 0.01, 0.01], 0), step([0.45, 0.45, 0.05, 0.05], 1)
    entropy_gate, margin_gate = EntropyGate(0.5), MarginGate(0.5)
    assert entropy_gate.accept_prob(sure, 0) > 0.5 > entropy_gate.accept_prob(torn, 0)
    assert math.isclose(float(EntropyGate().accept_prob(step([0.25] * 4, 0), 0)), 0.25, rel_tol=1e-5)  # 1/m
    assert math.isclose(float(margin_gate.accept_prob(sure, 0)), 0.96, rel_tol=1e-5)
    assert float(margin_gate.accept_prob(torn, 0)) == 0.0
    with pytest.raises(SprinterError, match="threshold: got 1.5"):
        MarginGate(1.5)


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "sd", "rule": "kl"}, "rule: got 'kl'"),
    ({"mode": "ar", "rule": "ratio"}, "rule: got 'ratio' with mode='ar'"),
    ({"mode": "sd-gated", "gate": "confidence", "rule": "entropy"}, "expected it only with a mode of"),
    ({"mode": "sd", "rule_threshold": 0.5}, "rule_threshold: got 0.5 with rule='exact'"),
    ({"mode": "sd", "rule": "ratio", "rule_threshold": 0.0}, r"lambda in \(0, 1\]"),
    ({"mode": "sd", "rule": "ratio", "rule_threshold": 1.5}, r"lambda in \(0, 1\]"),
    ({"mode": "sd", "rule": "entropy", "rule_threshold": -1.0}, "tau, a finite number"),
    ({"mode": "sd", "rule": "entropy", "rule_threshold": True}, "tau, a finite number"),
    ({"mode": "sprinter", "gate": "always", "threshold": 0.5}, "threshold: got 0.5 with gate='always'"),
    ({"mode": "auto", "rule": "ratio"}, "rule: got 'ratio' with mode='auto' and max_false_accept=None"),
    ({"mode": "auto", "rule": "entropy", "max_false_accept": 0.05}, "rule: got 'entropy' with mode='auto'"),
    ({"mode": "auto", "rule": "ratio", "rule_threshold": 0.0, "max_false_accept": 0.05}, r"lambda in \(0, 1\]"),
])
def test_bad_rule_options_are_refused_before_any_model_runs(options, message):
    with pytest.raises(SprinterError, match=message):
        DecodeOptions(**options)


def test_every_relaxed_rule_is_lossy():
    assert is_lossless(DecodeOptions(mode="sd"))
    assert is_lossless(DecodeOptions(mode="sprinter", gate="always"))
    for rule in RULES[1:]:
        assert not is_lossless(DecodeOptions(mode="sd", rule=rule))
        assert not is_lossless(DecodeOptions(mode="sprinter", gate="always", rule=rule))
        assert not is_lossless(DecodeOptions(mode="sprinter", strict=True, rule=rule))
    assert not is_lossless(DecodeOptions(mode="auto", rule="ratio", max_false_accept=0.05))


PROMPT = "def f(x):"


def test_the_exact_limits_of_the_relaxed_rules_give_ar_tokens(decoder):
    """lambda = 1 keeps only the target's argmax, and no position reaches a huge entropy: both are exact SD."""
    ar = decoder.generate(PROMPT, mode="ar", max_new_tokens=24).token_ids
    for rule, threshold in (("ratio", 1.0), ("entropy", 1e9)):
        out = decoder.generate(PROMPT, mode="sd", rule=rule, rule_threshold=threshold, max_new_tokens=24)
        assert out.token_ids == ar
        assert decoder.generate(PROMPT, mode="sprinter", gate="always", rule=rule, rule_threshold=threshold,
                                max_new_tokens=24).token_ids == ar


def test_the_loosest_rules_keep_every_drafted_token(gpt2_decoder):
    exact = gpt2_decoder.generate(PROMPT, mode="sd", max_new_tokens=24).stats
    assert exact.rejected > 0  # the scrambled pair disagrees somewhere: the test is not vacuous
    for rule, threshold in (("ratio", 1e-9), ("entropy", 0.0)):
        stats = gpt2_decoder.generate(PROMPT, mode="sd", rule=rule, rule_threshold=threshold, max_new_tokens=24).stats
        assert stats.rejected == 0 and stats.accepted == stats.drafted
        assert stats.target_calls < exact.target_calls


def test_relaxed_rules_sample_reproducibly_and_the_draft_side_gates_decode(gpt2_decoder):
    kw = {"mode": "sd", "rule": "ratio", "rule_threshold": 0.5, "temperature": 0.8, "max_new_tokens": 16, "seed": 3}
    assert gpt2_decoder.generate(PROMPT, **kw).token_ids == gpt2_decoder.generate(PROMPT, **kw).token_ids
    for gate in ("entropy", "margin"):
        out = gpt2_decoder.generate(PROMPT, mode="sprinter", gate=gate, threshold=0.2, rule="entropy",
                                    max_new_tokens=16)
        assert len(out.token_ids) == 16 and out.stats.verifier_calls == out.stats.drafted


def test_a_batch_with_a_relaxed_rule_is_refused(gpt2_decoder):
    with pytest.raises(SprinterError, match="rule: got 'ratio' with a batch of 2 prompts"):
        gpt2_decoder.generate([PROMPT, "x = 1"], mode="sd", rule="ratio", max_new_tokens=4)


# ------------------------------------------------------------------------------------------ the relaxed label
def test_the_relaxed_label_marks_tokens_nearly_as_likely_as_the_targets_choice():
    from sprinter.data.contexts import accept_labels
    from sprinter.data.shards import RELAXED_LAMBDA

    assert RELAXED_LAMBDA == 0.5
    p = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.26, 0.24], [0.5, 0.24, 0.26]])
    q = torch.full((3, 3), 1 / 3)
    labels = accept_labels(p, q, torch.tensor([0, 1, 1]))
    assert labels["accept_relaxed"].tolist() == [1.0, 1.0, 0.0]  # the argmax; 0.26 >= 0.25; 0.24 < 0.25
    assert labels["accept_greedy"].tolist() == [1.0, 0.0, 0.0]


def test_train_with_the_relaxed_label_and_refuse_folders_without_it(shards, tmp_path):
    import json

    from conftest import train_argv

    from sprinter.train.fit import parse_train_config, train

    metrics = train(parse_train_config(train_argv(shards, tmp_path / "v", "--label-rule", "relaxed")))
    assert metrics["verifier"]["auroc"] > 0.5
    assert json.loads((tmp_path / "v" / "train_config.json").read_text())["label_rule"] == "relaxed"

    old = tmp_path / "old"  # a collection from before the relaxed label: its manifest lists three labels
    old.mkdir()
    for path in shards.iterdir():
        (old / path.name).symlink_to(path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["labels"] = manifest["labels"][:3]
    (old / "manifest.json").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SprinterError, match="collected before the relaxed label"):
        train(parse_train_config(train_argv(old, tmp_path / "v2", "--label-rule", "relaxed")))


# ------------------------------------------------------------------------------------------ the Pareto rows
def test_the_relaxed_families_are_lossy_curves_of_one_benchmark(tiny_pair, verifier, tmp_path):  # noqa: F811
    from sprinter.bench.benchmark import BenchConfig, run_benchmark
    from sprinter.bench.methods import DEFAULT_METHODS, RELAXED
    from sprinter.bench.report import CURVES, check_results
    from sprinter.config import parse_config

    assert set(RELAXED) <= set(CURVES) and not set(RELAXED) & set(DEFAULT_METHODS)
    args = bench_args(tiny_pair, verifier, tmp_path / "out", "--methods", "ar", "sd", *RELAXED, "--ks", "2",
                      "--ratio-lambdas", "0.5", "--entropy-taus", "0.0", "--entropy-gate-thresholds", "0.3",
                      "--margin-thresholds", "0.3", "--budgets", "0.05", "--max-new-tokens", "12", "--num-prompts", "1")
    results = run_benchmark(parse_config(BenchConfig, args, "test"))
    check_results(results)
    by_name = {m["name"]: m for m in results["methods"]}
    assert list(by_name) == ["ar", "sd-k2", "sd-ratio@0.5", "sd-entropy@0", "sprinter-mlp+ratio@0.05",
                             "sprinter-mlp+entropy@0.05", "sprinter-entropy@0.3", "sprinter-margin@0.3"]
    assert all(not by_name[name]["lossless"] for name in list(by_name)[2:])
    # tau 0 keeps every drafted token: blocks of k = 4 and the target's token, but where the budget cuts one short
    assert by_name["sd-entropy@0"]["mean_acceptance_length"] > 3 >= by_name["sd-k2"]["mean_acceptance_length"]
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("argv", "message"), [
    (["--ratio-lambdas", "0"], r"rule_threshold: got 0.0 with rule='ratio'"),
    (["--gated-entropy-tau", "-1"], r"rule_threshold: got -1.0 with rule='entropy'"),
    (["--margin-thresholds", "2"], "threshold: got 2.0"),
    (["--rule-k", "0"], "rule_k"),
    (["--gate-data", "/nonexistent/data"], "gate_data: got '/nonexistent/data', which holds no manifest.json"),
])
def test_bad_relaxed_operating_points_are_refused(argv, message):
    from sprinter.bench.benchmark import BenchConfig
    from sprinter.config import parse_config

    with pytest.raises(SprinterError, match=message):
        parse_config(BenchConfig, argv, "test")


def test_draft_side_gates_are_calibrated_to_a_false_accept_budget_on_collected_rows(shards):
    from sprinter.data.shards import load_columns
    from sprinter.train.calibrate import draft_gate_thresholds, operating_point

    rows = load_columns(shards, ("draft_prob", "draft_entropy", "accept_greedy"))
    labels = rows["accept_greedy"].float()
    for gate, scores in (("confidence", rows["draft_prob"].float()), ("entropy", torch.exp(-rows["draft_entropy"]))):
        thresholds = draft_gate_thresholds(str(shards), gate, (0.05, 0.2), "accept_greedy")
        assert list(thresholds) == [0.05, 0.2] and thresholds[0.05] >= thresholds[0.2]
        for budget, threshold in thresholds.items():
            assert operating_point(scores, labels, threshold)["false_accept"] <= budget
    with pytest.raises(SprinterError, match=r"lacks column\(s\) \['draft_margin'\]"):  # synthetic rows hold no margin
        draft_gate_thresholds(str(shards), "margin", (0.05,), "accept_greedy")


def test_generate_cli_takes_the_rule():
    from sprinter.config import parse_config
    from sprinter.decode.options import GenerateConfig

    cfg = parse_config(GenerateConfig, ["--mode", "sd", "--rule", "ratio", "--rule-threshold", "0.5"], "test")
    assert (cfg.options().rule, cfg.options().rule_threshold) == ("ratio", 0.5)


def test_with_gate_data_the_draft_side_rows_are_budgets(shards):
    from sprinter.bench.benchmark import BenchConfig
    from sprinter.bench.methods import relaxed_methods
    from sprinter.train.calibrate import draft_gate_thresholds

    cfg = BenchConfig(methods=("ar", "sprinter-entropy"), gate_data=str(shards), budgets=(0.2, 0.05))
    rows = relaxed_methods(cfg, None, "sprinter-entropy", {}, {})  # runners are built, not run: no decoder needed
    assert [(m.name, m.operating_point, m.lossless) for m in rows] == [("sprinter-entropy@0.05", 0.05, False),
                                                                       ("sprinter-entropy@0.2", 0.2, False)]
    assert draft_gate_thresholds(str(shards), "entropy", (0.05,), "accept_greedy")[0.05] > 0
