"""The acceptance rules on hand-written probabilities: never, always and sometimes accept."""

import pytest
import torch

from sprinter.decode.acceptance import (
    correction,
    expected_acceptance,
    flag_then_check,
    greedy_match,
    leading_true,
    residual,
    speculative_accept,
)
from sprinter.decode.sampling import Sampler, sample
from sprinter.errors import SprinterError


def test_leading_true_counts_up_to_the_first_false():
    assert leading_true(torch.tensor([True, True, False, True])) == 2
    assert leading_true(torch.tensor([False, True])) == 0
    assert leading_true(torch.tensor([True, True])) == 2
    assert leading_true(torch.tensor([], dtype=torch.bool)) == 0


def test_greedy_match_never_always_sometimes():
    x = torch.tensor([5, 6, 7])
    assert greedy_match(x, torch.tensor([1, 6, 7])) == 0
    assert greedy_match(x, torch.tensor([5, 6, 7])) == 3
    assert greedy_match(x, torch.tensor([5, 6, 0])) == 2


def test_speculative_accept_never_always_sometimes():
    u = torch.tensor([0.0, 0.5, 0.99])
    never = speculative_accept(torch.zeros(3), torch.full((3,), 0.5), u)  # p(x) = 0: always rejected
    always = speculative_accept(torch.full((3,), 0.6), torch.full((3,), 0.3), u)  # p >= q: always kept
    sometimes = speculative_accept(torch.full((3,), 0.2), torch.full((3,), 0.4), u)  # kept iff u < 0.5
    assert never.tolist() == [False, False, False]
    assert always.tolist() == [True, True, True]
    assert sometimes.tolist() == [True, False, False]


def test_one_hot_probabilities_make_the_rule_greedy():
    greedy = Sampler(temperature=0.0)
    p = greedy.probs(torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 0.1]]))
    q = greedy.probs(torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]))
    x = torch.tensor([1, 1])
    accepted = speculative_accept(p[torch.arange(2), x], q[torch.arange(2), x], torch.tensor([0.999, 0.0]))
    assert accepted.tolist() == [True, False]
    assert residual(p[1], q[1]).tolist() == [1.0, 0.0, 0.0]  # the target's argmax


def test_residual_is_normalised_positive_part_and_falls_back_to_p():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(residual(p, p), p)


def test_speculative_sampling_reproduces_p():
    """Draw x ~ q, keep it with prob min(1, p/q), else draw from the residual: the result is ~ p."""
    gen = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 40_000
    x = torch.multinomial(q.expand(n, 4), 1, generator=gen).squeeze(-1)
    keep = speculative_accept(p[x], q[x], torch.rand(n, generator=gen))
    replacement = torch.multinomial(residual(p, q).expand(n, 4), 1, generator=gen).squeeze(-1)
    out = torch.where(keep, x, replacement)
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.01), freq


def test_flag_then_check_checks_only_the_flagged_token():
    p_x = torch.tensor([0.0, 0.0, 0.9])  # the target would reject the first two
    q_x = torch.tensor([0.5, 0.5, 0.3])
    u = torch.tensor([0.5, 0.5, 0.5])
    assert flag_then_check(p_x, q_x, u, flagged=True) == 3  # unchecked tokens kept; flagged one passes
    assert flag_then_check(p_x, q_x, u, flagged=True, strict=True) == 0  # strict: lossless
    rejected_last = torch.tensor([0.9, 0.9, 0.0])
    assert flag_then_check(rejected_last, q_x, u, flagged=True) == 2
    assert flag_then_check(rejected_last, q_x, u, flagged=False) == 3  # max_block reached: nothing checked


def test_correction_is_residual_on_rejection_and_bonus_when_all_kept():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])  # (k + 1, V)
    q = torch.tensor([[0.5, 0.5], [0.1, 0.9]])  # (k, V)
    assert torch.allclose(correction(p, q, 1), torch.tensor([1.0, 0.0]))
    assert torch.allclose(correction(p, q, 2), p[2])
    assert torch.allclose(correction(p, q, torch.tensor(1)), torch.tensor([1.0, 0.0]))  # n_kept left on the device


def test_sampler_top_k_top_p_and_bad_values():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(Sampler(1.0, top_k=2).probs(logits), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(Sampler(1.0, top_p=0.8).probs(logits), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(Sampler(1.0).probs(logits), logits.exp())
    gen = torch.Generator().manual_seed(0)
    assert sample(Sampler(0.0).probs(logits), gen) == 0
    for bad in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(SprinterError):
            Sampler(**bad)


def test_correction_is_batched_over_leading_axes():
    torch.manual_seed(0)
    p, q = torch.rand(3, 5, 7).softmax(-1), torch.rand(3, 4, 7).softmax(-1)  # (B, k + 1, V), (B, k, V)
    n_kept = torch.tensor([0, 2, 4])  # a rejection at the first and the third token, and a bonus token
    rows = correction(p, q, n_kept)
    assert rows.shape == (3, 7)
    for b in range(3):
        assert torch.allclose(rows[b], correction(p[b], q[b], int(n_kept[b])))
    assert torch.allclose(rows[2], p[2, 4])  # all kept: the bonus token comes from p itself


def test_expected_acceptance_is_one_minus_total_variation():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert expected_acceptance(p, q).item() == pytest.approx(0.5)  # TV = 0.5
    assert expected_acceptance(p, p).item() == pytest.approx(1.0)
    one_hot = torch.eye(3)  # greedy: 1 where the argmaxes agree, 0 where not
    assert expected_acceptance(one_hot, one_hot[[0, 2, 2]]).tolist() == [1.0, 0.0, 1.0]
