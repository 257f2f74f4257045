import numpy as np
import pytest
from conftest import datastore_of

from sprinter.decode.ngram import NgramDrafter
from sprinter.errors import SprinterError


def test_longest_suffix_match_proposes_what_followed_its_latest_occurrence():
    d = NgramDrafter(n=3)
    assert d.chain([1, 2, 3, 4, 5, 1, 2, 3], 4) == [4, 5, 1, 2]
    assert d.chain([7, 2, 3, 8, 1, 2, 3, 9, 2, 3], 2) == [9, 2]  # latest of two occurrences of (2, 3)
    assert d.chain([1, 2, 1, 2], 5) == [1, 2]  # chain stops at the end of the sequence
    assert d.chain([4, 1, 2, 3, 5, 2, 3, 6, 1, 2, 3], 1) == [5]  # (1, 2, 3) beats the later (2, 3)


def test_no_match_gives_an_empty_chain():
    assert NgramDrafter(n=3).chain([5, 6, 7], 2) == []
    assert NgramDrafter(n=3, min_n=2).chain([1, 2, 9, 2], 2) == []  # only a 1-gram matches
    assert NgramDrafter(n=3).chain([], 2) == [] and NgramDrafter(n=3).chain([1, 2, 1], 0) == []


def test_bad_sizes_are_refused():
    with pytest.raises(SprinterError, match="min_n"):
        NgramDrafter(n=2, min_n=3)


def test_the_datastore_answers_when_the_sequence_has_no_match():
    ds = datastore_of([[10, 11, 12, 13, 14], [20, 21]], eos_id=0)
    d = NgramDrafter(n=3, datastore=ds)
    assert d.chain([5, 11, 12], 2) == [13, 14]
    assert d.chain([5, 11, 12], 9) == [13, 14]  # stops at the document's end
    assert d.chain([5, 6, 7], 3) == []  # no match anywhere
    assert d.chain([14], 3) == []  # 14 ends its document: nothing follows it there
    assert d.chain([21], 3) == []  # and the next document is not its continuation


def test_a_longer_datastore_match_beats_a_shorter_own_match_and_ties_go_to_the_sequence():
    ds = datastore_of([[1, 2, 3, 40], [2, 3, 50]], eos_id=0)
    d = NgramDrafter(n=3, datastore=ds)
    assert d.chain([2, 3, 7, 1, 2, 3], 1) == [40]  # corpus: (1, 2, 3); sequence: only (2, 3)
    assert d.chain([9, 2, 3, 7, 9, 2, 3], 1) == [7]  # the sequence matches all n tokens: no lookup
    assert d.chain([8, 2, 3, 7, 9, 2, 3], 1) == [7]  # both match (2, 3): the sequence wins the tie
    assert NgramDrafter(n=3, min_n=1).chain([8, 2, 3, 7, 9, 2, 3], 1) == [7]


@pytest.mark.parametrize("n,min_n", [(3, 1), (4, 2), (2, 2)])
def test_the_incremental_index_equals_the_stateless_chain(n, min_n):
    rng = np.random.default_rng(n * 10 + min_n)
    ds = datastore_of([rng.integers(1, 6, 40).tolist() for _ in range(4)], eos_id=0)
    for drafter in (NgramDrafter(n, min_n), NgramDrafter(n, min_n, datastore=ds)):
        for _ in range(100):
            seq = rng.integers(1, 8, rng.integers(0, 30)).tolist()
            index = drafter.index(seq[: len(seq) // 2])
            for token in seq[len(seq) // 2 :]:
                index.extend([token])
            assert len(index) == len(seq)
            for s in (1, 3, 8):
                assert index.chain(s) == drafter.chain(seq, s), (seq, s)
