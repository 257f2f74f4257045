"""sprinter.bench.compare's pure parts: which options are lossless, how far two outputs differ, how much an
output loops. (scripts/generate.py --compare runs it on the tiny pair: tests/test_generate_cli.py.)"""

import pytest

from sprinter.bench.compare import is_lossless, loop_share, tokens_differing
from sprinter.decode.options import DecodeOptions


@pytest.mark.parametrize("overrides,lossless", [
    ({"mode": "sd"}, True),
    ({"mode": "ngram"}, True),
    ({"mode": "sprinter"}, False),
    ({"mode": "sprinter", "strict": True}, True),
    ({"mode": "sprinter", "gate": "always"}, True),
    ({"mode": "draft"}, False),
    ({"mode": "auto"}, True),
    ({"mode": "auto", "max_false_accept": 0.05}, False),
])
def test_which_options_are_lossless(overrides, lossless):
    assert is_lossless(DecodeOptions(**overrides)) is lossless


def test_tokens_differing_counts_positions_and_the_longer_tail():
    assert tokens_differing([1, 2, 3], [1, 2, 3]) == 0
    assert tokens_differing([1, 9, 3], [1, 2, 3]) == 1
    assert tokens_differing([1, 2, 3, 4, 5], [1, 2, 3]) == 2
    assert tokens_differing([], [7, 8]) == 2


def test_loop_share():
    assert loop_share([1, 2, 3, 4, 5, 6, 7, 8]) == 0.0  # no 4-gram twice
    assert loop_share([5] * 10) == pytest.approx(6 / 10)  # the 4-gram (5, 5, 5, 5) ends at 7 positions, new once
    assert loop_share([1, 2, 1, 2, 1, 2, 1, 2]) == pytest.approx(3 / 8)  # (1,2,1,2) and (2,1,2,1), then repeats
    assert loop_share([1, 2, 3]) == 0.0  # too short to repeat a 4-gram


def test_loop_share_script_on_the_tiny_pair(tiny_pair, capsys):
    """scripts/loop_share.py: greedy and sampled shares of ar's output and the held-out text's, each in [0, 1], and
    one line with exit 2 for a bad value."""
    import json

    from conftest import load_script

    from sprinter.errors import run_cli

    main = load_script("loop_share").main
    assert run_cli(main, ["--pair", str(tiny_pair), "--num-prompts", "2", "--max-new-tokens", "12"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 2 and result["held_out_text"]["windows"] > 0
    for name in ("greedy", "sampled", "held_out_text"):
        assert 0.0 <= result[name]["mean"] <= 1.0
    assert result["greedy"]["temperature"] == 0.0 and result["sampled"]["top_p"] == 0.95
    assert run_cli(main, ["--pair", str(tiny_pair), "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens: got 0" in capsys.readouterr().err
