"""Every YAML preset parses into its stage config; the CLI layer merges and refuses as documented."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from sprinter.config import RuntimeConfig, SeedConfig, check_integer_lists, option, parse_config
from sprinter.errors import SprinterError
from sprinter.pairs.build import PairConfig, parse_pair_config, presets

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Toy:
    name: str = option("a", "a name")
    size: int = option(3, "a size")
    budgets: tuple[float, ...] = option((0.05,), "budgets")
    flag: bool = option(False, "a flag")


def test_flags_override_yaml_and_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("size: 5\nname: b\n")
    cfg = parse_config(Toy, ["--config", str(tmp_path / "c.yaml"), "--size", "7", "--budgets", "0.01", "0.1",
                             "--flag"], "toy")
    assert (cfg.name, cfg.size, cfg.budgets, cfg.flag) == ("b", 7, (0.01, 0.1), True)


@dataclass(frozen=True)
class Stage(RuntimeConfig, SeedConfig):
    threads: int = option(1, "this stage's own default")
    sizes: tuple[int, ...] = option((1, 2), "sizes")

    def __post_init__(self) -> None:
        check_integer_lists(self, ("sizes",))


def test_shared_fields_come_from_the_bases_and_a_stage_overrides_a_default():
    cfg = parse_config(Stage, ["--device", "cpu", "--seed", "3", "--sizes", "4"], "stage")
    assert (cfg.device, cfg.dtype, cfg.threads, cfg.seed, cfg.sizes) == ("cpu", "auto", 1, 3, (4,))
    with pytest.raises(SprinterError, match=r"seed: got -1; expected an integer in \[0, 2\*\*63 - 1\]"):
        parse_config(Stage, ["--seed", "-1"], "stage")
    for bad in ([], [0]):
        with pytest.raises(SprinterError, match=re.escape(f"sizes: got {bad}; expected one or more integers >= 1")):
            Stage(sizes=tuple(bad))
    with pytest.raises(Exception, match="cannot assign"):  # frozen, as the bases are
        cfg.seed = 4


def test_unknown_yaml_key_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("sise: 5\n")
    with pytest.raises(SprinterError, match="unknown option"):
        parse_config(Toy, ["--config", str(tmp_path / "c.yaml")], "toy")


def test_every_pair_preset_parses():
    assert {"tiny", "demo", "bench"} <= set(presets())
    for name in presets():
        assert isinstance(parse_pair_config(["--preset", name]), PairConfig)


def test_every_yaml_under_configs_parses():
    import yaml

    for path in ROOT.glob("configs/**/*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
