"""The benchmark: fidelity metrics with known answers, the results schema, a 2-prompt smoke run on the tiny pair."""

import math

import pytest
import torch

from sprinter.fidelity import (exact_match, first_difference, lcs_length, rouge_l, target_consistency,
                               total_nll)


@pytest.mark.parametrize("a, b, expected", [
    ("ABCBDAB", "BDCABA", 4), ("", "abc", 0), ("abc", "abc", 3), ("abc", "def", 0), ("axbycz", "abc", 3)])
def test_lcs_length(a, b, expected):
    assert lcs_length(list(a), list(b)) == expected
    assert lcs_length(list(b), list(a)) == expected


def test_rouge_l_known_values():
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)  # LCS 3: P = R = 3/4
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 1, R = 1/2
    assert rouge_l([7, 7], [7, 7]) == 1.0
    assert rouge_l([], []) == 1.0
    assert rouge_l([1], []) == 0.0
    assert rouge_l([1, 2], [3, 4]) == 0.0


def test_exact_match_and_first_difference():
    assert exact_match([1, 2], (1, 2)) and not exact_match([1, 2], [1, 2, 3])
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_target_consistency_and_nll_on_hand_made_logits():
    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # argmax 1, 0, 2
    assert target_consistency(logits, torch.tensor([1, 2, 2])) == (2, 3)
    uniform = torch.zeros(5, 4)
    assert total_nll(uniform, torch.tensor([0, 1, 2, 3, 0])) == pytest.approx(5 * math.log(4))
    two = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert total_nll(two, torch.tensor([1])) == pytest.approx(math.log(4))
