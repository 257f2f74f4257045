"""The shape of the tree (docs: README's file tree): the decode path stands on its own floor, functions take the
objects they need whole, and every room is small enough to read in one sitting. Static checks, no model runs."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sprinter"
MAX_PARAMETERS = 8  # self and cls not counted
MAX_LINES = 400
MAX_DECODER_LINES = 250


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a lazy import is still an arrow)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", [*sorted((PACKAGE / "decode").glob("*.py")), PACKAGE / "features.py",
                                  PACKAGE / "verifier.py"], ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_decoding_imports_nothing_from_the_floors_above_it(path):
    upward = sorted(m for m in imported(path) if m.split(".")[:2] in (["sprinter", "data"], ["sprinter", "train"],
                                                                      ["sprinter", "bench"]))
    assert not upward, f"{path.name} imports {upward}: the decode path must stand without data, train and bench"


@pytest.mark.parametrize("name", ["errors", "files", "config", "corpus", "schedule", "features", "verifier",
                                  "verifier_checks"])
def test_the_ground_floor_imports_no_stage(name):
    stages = ("pairs", "data", "train", "decode", "bench", "integrations")
    upward = sorted(m for m in imported(PACKAGE / f"{name}.py")
                    if m.split(".")[:2] in [["sprinter", stage] for stage in stages])
    assert not upward, f"{name}.py imports {upward}: the modules every stage shares import none of them"


def test_no_function_takes_more_than_eight_parameters():
    wide = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
                count = len([n for n in names if n not in ("self", "cls")])
                if count > MAX_PARAMETERS:
                    wide.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({count})")
    assert not wide, f"functions over {MAX_PARAMETERS} parameters (pass an options or state object): {wide}"


def test_every_room_is_small():
    long = [f"{p.relative_to(PACKAGE)} ({n})" for p in sources() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (one job per room): {long}"
    tree = ast.parse((PACKAGE / "decode" / "decoder.py").read_text())
    (decoder,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Decoder"]
    assert decoder.end_lineno - decoder.lineno + 1 <= MAX_DECODER_LINES


def stage_configs() -> list[type]:
    """Every dataclass under sprinter/ with a command-line option (a field declared with `config.option`)."""
    import dataclasses
    import importlib

    found = {}
    for path in sources():
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        try:
            mod = importlib.import_module(module)
        except ImportError:  # an optional extra (vLLM) this machine lacks
            continue
        for obj in vars(mod).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module
                    and any("help" in f.metadata for f in dataclasses.fields(obj))):
                found[obj.__qualname__] = obj
    return sorted(found.values(), key=lambda c: c.__qualname__)


def test_shared_config_fields_have_one_home():
    """device, dtype, threads and seed (and pair/draft/target where a stage has all three) come from the shared
    bases in sprinter/config.py; a stage only re-declares one whose default or help is its own."""
    import dataclasses

    from sprinter.config import DeviceConfig, ModelsConfig, RuntimeConfig, SeedConfig, ThreadsConfig

    homes = {"device": DeviceConfig, "dtype": RuntimeConfig, "threads": ThreadsConfig, "seed": SeedConfig}
    configs = stage_configs()
    assert len(configs) >= 14, [c.__name__ for c in configs]
    stray = []
    for cls in configs:
        names = {f.name for f in dataclasses.fields(cls)}
        stray += [f"{cls.__name__}.{name}" for name, home in homes.items() if name in names
                  and not issubclass(cls, home)]
        if {"pair", "draft", "target"} <= names and not issubclass(cls, ModelsConfig):
            stray.append(f"{cls.__name__}.pair/draft/target")
        if any(issubclass(cls, home) for home in (*homes.values(), ModelsConfig)):
            assert cls.__dataclass_params__.frozen, f"{cls.__name__}: the shared bases are frozen, so is it"
    assert not stray, f"shared fields declared outside their base in sprinter/config.py: {stray}"


def test_a_shared_field_is_not_copied_into_a_stage():
    """A stage field with the name, default and help of a shared base's field (sprinter/config.py, the benchmarks'
    in sprinter/bench/protocol.py) comes from that base: a stage declares such a field itself only to give it a
    default or help of its own."""
    import dataclasses

    from sprinter.bench.protocol import BenchRuntimeConfig, PromptLenConfig, PromptSetConfig
    from sprinter.config import (
        DeviceConfig,
        ModelsConfig,
        PairSourceConfig,
        ProgressConfig,
        RuntimeConfig,
        SeedConfig,
        ThreadsConfig,
    )

    def key(f: dataclasses.Field) -> tuple:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        return f.name, repr(default), f.metadata.get("help")

    bases = (PairSourceConfig, ModelsConfig, DeviceConfig, ThreadsConfig, RuntimeConfig, SeedConfig, ProgressConfig,
             BenchRuntimeConfig, PromptSetConfig, PromptLenConfig)
    homes = {}  # (name, default, help) -> the base that declares it
    for base in bases:
        inherited = {key(f) for parent in base.__mro__[1:] if dataclasses.is_dataclass(parent)
                     for f in dataclasses.fields(parent)}
        homes.update({key(f): base for f in dataclasses.fields(base) if key(f) not in inherited})
    assert len(homes) == 13, sorted(homes)
    copies = [f"{cls.__name__}.{f.name} (home: {homes[key(f)].__name__})" for cls in stage_configs()
              for f in dataclasses.fields(cls) if key(f) in homes and not issubclass(cls, homes[key(f)])]
    assert not copies, f"shared fields copied into a stage instead of extending their base: {copies}"
