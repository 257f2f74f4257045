import pytest

from sprinter.errors import SprinterError
from sprinter.ngram import NgramDrafter


def test_longest_suffix_match_proposes_what_followed_its_latest_occurrence():
    d = NgramDrafter(n=3)
    assert d.chain([1, 2, 3, 4, 5, 1, 2, 3], 4) == [4, 5, 1, 2]
    assert d.chain([7, 2, 3, 8, 1, 2, 3, 9, 2, 3], 2) == [9, 2]  # latest of two occurrences of (2, 3)
    assert d.chain([1, 2, 1, 2], 5) == [1, 2]  # chain stops at the end of the sequence


def test_no_match_gives_an_empty_chain():
    assert NgramDrafter(n=3).chain([5, 6, 7], 2) == []
    assert NgramDrafter(n=3, min_n=2).chain([1, 2, 9, 2], 2) == []  # only a 1-gram matches


def test_bad_sizes_are_refused():
    with pytest.raises(SprinterError, match="min_n"):
        NgramDrafter(n=2, min_n=3)
