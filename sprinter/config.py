"""Typed stage configs: one dataclass per stage is the single home of every default.

`parse_config` turns such a dataclass into a command line (`--num-prompts 8`), merges a YAML preset
given by `--config` underneath the flags (flags win), and builds the dataclass, whose `__post_init__`
validates. `option()` declares a field with its help text, so the help lives beside the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from sprinter.errors import SprinterError
from sprinter.files import read_text, write_json

# The YAML presets of every stage: configs/<stage>/<name>.yaml at the repository root.
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

C = TypeVar("C")
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (lists/tuples are copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


# ---------------------------------------------------------------------------------- shared fields
# The fields several stages share, each declared once with its default and help. A stage config extends the ones it
# has (`class CollectConfig(ProgressConfig, RuntimeConfig, SeedConfig)`) and re-declares a field only where its
# default or help differs (benchmarks time on one thread: `threads: int = option(1, ...)`). They are frozen, so
# every stage config is (a config is a value: `dataclasses.replace` makes a changed copy), and keyword-only, so
# they take no positional place in a stage's constructor. Their fields come first in `--help`. The benchmarks'
# own shared fields (prompt set, prompt length, one-thread runtime) live in sprinter/bench/protocol.py.
@dataclasses.dataclass(frozen=True, kw_only=True)
class PairSourceConfig:
    """The pair a stage loads: a preset (built if missing) or a pair folder."""

    pair: str = option("demo", "a preset pair under checkpoints/pairs/ (built if missing) or a pair folder")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelsConfig(PairSourceConfig):
    """The models a stage runs: a pair (preset or folder), or a draft and a target given one by one."""

    draft: str | None = option(None, "draft model: Hub name or folder; none: PAIR/draft")
    target: str | None = option(None, "target model: Hub name or folder; none: PAIR/target")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    """Where a stage runs."""

    device: str = option("auto", "cpu, cuda, cuda:N or auto")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThreadsConfig:
    """How many CPU threads torch takes (checked against this machine's cores by `check_fields`)."""

    threads: int = option(0, "CPU threads for torch (0: torch's default)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig(DeviceConfig, ThreadsConfig):
    """Where models run, in which dtype, on how many CPU threads."""

    dtype: str = option("auto", "float32, bfloat16, float16 or auto: bfloat16 on CUDA, float32 on CPU")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedConfig:
    """The seed every random draw of a stage comes from (checked to fit torch's 64 bits by `check_fields`)."""

    seed: int = option(0, "seed of the torch.Generator every random draw comes from")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgressConfig:
    """Whether a long stage draws a progress bar (off in tests and logs)."""

    progress: bool = option(True, "show a progress bar")


def check_integers(cfg: Any, names: Sequence[str], minimum: int = 1, *, optional: bool = False,
                   expected: str | None = None) -> None:
    """For `__post_init__`: each named field of `cfg` must be an integer >= minimum (bools are not integers), or
    None when `optional`; `expected` words what is expected in the message (default: "an integer >= minimum")."""
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SprinterError(f"{name}: got {value!r}; expected {expected or f'an integer >= {minimum}'}")


def check_integer_lists(cfg: Any, names: Sequence[str], minimum: int = 1, *, empty: bool = False) -> None:
    """For `__post_init__`: each named field of `cfg` must be a tuple (or list) of integers >= minimum, one or more
    of them unless `empty` (bools are not integers)."""
    for name in names:
        values = getattr(cfg, name)
        if (not values and not empty) or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                                             for v in values):
            raise SprinterError(f"{name}: got {list(values)!r}; expected {'' if empty else 'one or more '}integers "
                                f">= {minimum}{' (or none)' if empty else ''}")


def check_seed(seed: Any) -> None:
    """A seed must fit torch.Generator.manual_seed's signed 64 bits (bools are not integers)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SprinterError(f"seed: got {seed!r}; expected an integer in [0, 2**63 - 1]")


def check_runs(cfg: Any, neither: str | None = None) -> None:
    """For `__post_init__` of a stage that resumes or loads a pair: not both `resume` and `overwrite`; `draft` and
    `target` both or neither (`neither` says what neither means; None: the config has no draft/target)."""
    if getattr(cfg, "resume", False) and getattr(cfg, "overwrite", False):
        raise SprinterError("resume and overwrite: got both; expected at most one")
    if neither is not None and (cfg.draft is None) != (cfg.target is None):
        raise SprinterError(f"draft/target: got draft={cfg.draft!r}, target={cfg.target!r}; expected both or "
                            f"neither (neither: {neither})")


def check_fields(cfg: Any) -> None:
    """The checks every config gets, from its field types and names, wherever its values came from (flags, YAML,
    Python): a float is finite (inf and nan are never a useful setting), a `seed` fits torch's 64 bits, and
    `threads` is between 0 (the default) and this machine's cores (more only oversubscribes, and a tokenizer's
    thread pool aborts the process on very large counts)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, (inner, _) = getattr(cfg, f.name), _base_type(hints[f.name])
        if typing.get_origin(inner) in (tuple, list):
            inner, values = typing.get_args(inner)[0], value if isinstance(value, (tuple, list)) else [value]
        else:
            values = [value]
        for v in values:
            if inner is float and isinstance(v, float) and not math.isfinite(v):
                raise SprinterError(f"{f.name}: got {v!r}; expected a finite number")
    if getattr(cfg, "seed", None) is not None:
        check_seed(cfg.seed)
    threads, cores = getattr(cfg, "threads", None), os.cpu_count() or 1
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= cores):
        raise SprinterError(f"threads: got {threads!r}; expected an integer in [0, {cores}] (this machine has "
                            f"{cores} cores; 0: the default)")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config (tuples become lists, paths strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config beside an artifact, as JSON (atomically), so the artifact can be audited and remade."""
    write_json(path, {"type": type(cfg).__name__, **to_dict(cfg)})


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X`, `X | None`, `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _parser_type(name: str, tp: Any):
    """argparse `type=` for a field: converts one token, `none` allowed for optional fields."""
    inner, optional = _base_type(tp)
    base = typing.get_args(inner)[0] if typing.get_origin(inner) in (tuple, list) else inner

    def convert(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(base, f"a {base.__name__}")
            raise argparse.ArgumentTypeError(f"got {text!r}; expected {kind}") from None

    return convert


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SprinterError(f"--config: got {str(path)!r}; expected an existing YAML file")
    try:
        data = yaml.safe_load(read_text(path, "--config")) or {}
    except yaml.YAMLError as err:
        raise SprinterError(f"--config {str(path)!r} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise SprinterError(f"--config {str(path)!r}: got a {type(data).__name__}; expected a mapping of option: value")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise SprinterError(f"--config {str(path)!r}: got key {bad[0]!r}; expected option names (text) as keys")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build `cls` from a dict, refusing unknown keys with a message that lists the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SprinterError(f"{source}: unknown option(s) {unknown}; expected some of {sorted(names)}")
    hints = typing.get_type_hints(cls)
    fixed = {}
    for key, value in values.items():
        inner, _ = _base_type(hints[key])
        if typing.get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        fixed[key] = value
    try:
        cfg = cls(**fixed)
    except TypeError as err:  # a wrong type from YAML, caught before it reaches library code
        raise SprinterError(f"{source}: {err}") from None
    check_fields(cfg)
    return cfg


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a SprinterError: exit 2 through run_cli) instead of a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise SprinterError(f"{message}; see {self.prog} --help")


def parse_config(cls: type[C], argv: Sequence[str] | None, description: str,
                 default_config: str | Path | None = None) -> C:
    """Parse `argv` into `cls`: defaults < YAML (`--config`, else `default_config` if it exists) < flags."""
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset (keys are the option names below)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        inner, _ = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata.get('help', '')} (default: {default!r})"}
        if inner is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(inner) in (tuple, list):
            kwargs["nargs"] = "+"
        parser.add_argument(flag, type=_parser_type(f.name, tp), **kwargs)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(load_yaml(config_path))
    elif default_config is not None and Path(default_config).is_file():
        values.update(load_yaml(default_config))
    values.update(args)
    return build_config(cls, values, source=str(config_path or "command line"))
