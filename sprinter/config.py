"""Typed stage configs: one dataclass per stage is the single home of every default.

`parse_config` turns such a dataclass into a command line (`--num-prompts 8`), merges a YAML preset
given by `--config` underneath the flags (flags win), and builds the dataclass, whose `__post_init__`
validates. `option()` declares a field with its help text, so the help lives beside the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from sprinter.errors import SprinterError

# The YAML presets of every stage: configs/<stage>/<name>.yaml at the repository root.
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

C = TypeVar("C")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (lists/tuples are copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def check_integers(cfg: Any, names: Sequence[str], minimum: int = 1) -> None:
    """For `__post_init__`: each named field of `cfg` must be an integer >= minimum (bools are not integers)."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SprinterError(f"{name}: got {value!r}; expected an integer >= {minimum}")


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
    """Write the config beside an artifact, as JSON, so the artifact can be audited and remade."""
    Path(path).write_text(json.dumps({"type": type(cfg).__name__, **to_dict(cfg)}, indent=2) + "\n")


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
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: got {text!r}; expected a {base.__name__}")

    return convert


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SprinterError(f"--config: got {str(path)!r}; expected an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SprinterError(f"--config {str(path)!r} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise SprinterError(f"--config {str(path)!r}: got a {type(data).__name__}; expected a mapping of option: value")
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
        return cls(**fixed)
    except TypeError as err:  # a wrong type from YAML, caught before it reaches library code
        raise SprinterError(f"{source}: {err}") from None


def parse_config(cls: type[C], argv: Sequence[str] | None, description: str, default_config: str | Path | None = None) -> C:
    """Parse `argv` into `cls`: defaults < YAML (`--config`, else `default_config` if it exists) < flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset (keys are the option names below)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        inner, _ = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{f.metadata.get('help', '')} (default: {default!r})"}
        if inner is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(inner) in (tuple, list):
            kwargs["nargs"] = "+"
        parser.add_argument(flag, type=_parser_type(f.name, tp), **kwargs)
    try:
        args = vars(parser.parse_args(argv))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise SprinterError("bad command line (see the usage line above, or --help)") from None
        raise
    config_path = args.pop("config")
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(load_yaml(config_path))
    elif default_config is not None and Path(default_config).is_file():
        values.update(load_yaml(default_config))
    values.update(args)
    return build_config(cls, values, source=str(config_path or "command line"))
