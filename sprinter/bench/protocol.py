"""The benchmark protocol shared by the main benchmark, the batch sweep and the async benchmark.

As Spec-Bench (docs/references.md §5): prompts from two domains held out from pair and verifier training
(Python code windows and English docstrings of the stdlib `test` split), a warm-up per method before
timing, the methods interleaved with their order rotated each round so machine drift hits all alike,
every lossless output checked equal to `ar`'s, and the hardware and library versions written beside the
figures. Finished units (a prompt, a batch cell) are appended to OUT/records.jsonl as they finish, so a
killed run continues with --resume; a torn last line (a write cut short by a kill or a full disk) is
dropped and its unit runs again. docs/benchmark.md describes the protocol in full.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch

from sprinter.bench.fidelity import first_difference
from sprinter.config import ModelsConfig, ProgressConfig, RuntimeConfig, SeedConfig, option
from sprinter.corpus import load_documents, prose_documents
from sprinter.errors import SprinterError
from sprinter.files import read_json, write_atomic

DOMAINS = ("code", "prose")
RECORDS, RUN = "records.jsonl", "run.json"
CALIBRATION = "calibration.json"  # the main benchmark's calibration prompts' stats (the predictions' inputs)
T = TypeVar("T")


# ------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True, kw_only=True)
class BenchRuntimeConfig(RuntimeConfig):
    """Where a benchmark's models run: as every stage's `RuntimeConfig`, but timed on one CPU thread by default."""

    threads: int = option(1, "CPU threads for torch (0: torch's default; 1 is fastest for small models on busy cores)")


@dataclass(frozen=True, kw_only=True)
class PromptSetConfig:
    """Where a benchmark's prompts come from (`load_prompts`): held-out text, the domains taking turns."""

    dataset: str = option("stdlib", "prompt source (sprinter.corpus): 'stdlib', a folder or a file")
    split: str = option("test", "corpus split of the prompts (test: held out from pair and verifier training)")
    domains: tuple[str, ...] = option(DOMAINS, f"prompt domains, alternated: some of {DOMAINS}")


@dataclass(frozen=True, kw_only=True)
class PromptLenConfig:
    """How long a benchmark's prompts are (`load_prompts`' prompt_len; checked against the pair by `check_window`)."""

    prompt_len: int = option(64, "prompt tokens")


@dataclass(frozen=True, kw_only=True)
class PairBenchConfig(ProgressConfig, PromptLenConfig, PromptSetConfig, ModelsConfig, BenchRuntimeConfig, SeedConfig):
    """What the benchmarks of one pair on a held-out prompt set share (the main benchmark, the batch sweep, the
    budget check): the models, where they run, the prompts, the seed and the progress bar."""


def check_domains(domains: Sequence[str]) -> None:
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise SprinterError(f"domains: got {list(domains)}; expected some of {DOMAINS}")


@dataclass(frozen=True)
class Prompt:
    index: int
    domain: str  # "code" or "prose"
    doc: str  # the document id it was cut from
    ids: tuple[int, ...]
    continuation: tuple[int, ...] = ()  # the tokens that follow it in the text (the degeneracy reference)


def load_prompts(tokenizer, *, dataset: str = "stdlib", split: str = "test", domains: Sequence[str] = DOMAINS,
                 num_prompts: int, prompt_len: int, continuation_len: int = 0) -> list[Prompt]:
    """num_prompts prompts of prompt_len tokens, the domains taking turns: code windows cut from the middle
    of each source file of the split, prose from the start of each long docstring. Each keeps up to
    `continuation_len` tokens of the text that follows it."""
    check_domains(domains)
    docs = load_documents(dataset, split)
    sources = {"code": docs, "prose": prose_documents(docs)}
    pools: dict[str, list[tuple[str, list[int], list[int]]]] = {}
    per_domain = -(-num_prompts // len(domains))
    for domain in domains:
        pool = []
        for doc in sources[domain]:
            ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            if len(ids) < prompt_len + 8:  # room for a continuation that exists in the text
                continue
            start = (len(ids) - prompt_len) // 2 if domain == "code" else 0
            pool.append((doc.id, ids[start: start + prompt_len],
                         ids[start + prompt_len: start + prompt_len + continuation_len]))
            if len(pool) == per_domain:
                break
        if not pool:
            raise SprinterError(f"dataset {dataset!r} ({split!r} split) has no {domain} document of at least "
                                f"{prompt_len + 8} tokens; expected some, or a smaller --prompt-len")
        pools[domain] = pool
    prompts: list[Prompt] = []
    for i in range(max(map(len, pools.values()))):
        for domain in domains:
            if i < len(pools[domain]) and len(prompts) < num_prompts:
                doc, ids, after = pools[domain][i]
                prompts.append(Prompt(len(prompts), domain, doc, tuple(ids), tuple(after)))
    return prompts


def check_window(prompt_len: int, max_new_tokens: int, max_length: int) -> None:
    """Refuse prompts and budgets that do not fit the models' context window (checked once the pair is loaded)."""
    if prompt_len + max_new_tokens > max_length:
        raise SprinterError(f"prompt_len + max_new_tokens = {prompt_len + max_new_tokens} tokens; the models' "
                            f"context window is {max_length}: expected at most that")


# ------------------------------------------------------------------------------------------- methods
Runner = Callable[[list[int], int, int], tuple[list[int], dict]]  # (prompt ids, seed, max_new_tokens) -> (ids, stats)


@dataclass(frozen=True)
class Method:
    """One row of a table: a decoding mode at one operating point."""

    name: str  # "sd-k4", "sprinter-mlp@0.05", ...
    family: str  # the family it belongs to (a curve in the benchmark's plot for the sprinter families)
    lossless: bool  # keeps the target's distribution: greedy output must equal ar's, sampled must match it
    run: Runner
    operating_point: float | None = None  # k, false-accept budget or confidence threshold


# ------------------------------------------------------------------------------------------- timing order
def warm_up(methods: Iterable[T], run: Callable[[T], object], *, times: int) -> None:
    """Run every method `times` times before anything is timed (first calls pay for allocation and kernels)."""
    methods = list(methods)
    for _ in range(times):
        for method in methods:
            run(method)


def rotated(methods: Sequence[T], shift: int) -> list[T]:
    """The methods in the order of round `shift`: each round starts one later, so drift hits every method alike."""
    if not methods:
        return []
    shift %= len(methods)
    return list(methods[shift:]) + list(methods[:shift])


def check_lossless(name: str, output: Sequence[int], reference: Sequence[int], *, where: str,
                   tolerate: Callable[[int], bool] | None = None) -> int | None:
    """Refuse a lossless method's output that differs from ar's; returns the first differing new-token index
    (None when equal). `tolerate(i)` may accept a difference at i (the async benchmark's near-tie flips)."""
    i = first_difference(list(output), list(reference))
    if i is not None and not (tolerate is not None and tolerate(i)):
        raise SprinterError(f"{name} is lossless but its greedy output differs from ar's on {where} at new token "
                            f"{i}: {list(output[i:i + 5])} vs {list(reference[i:i + 5])}; expected identical tokens")
    return i


# ------------------------------------------------------------------------------------------- environment
def hardware(device: torch.device, dtype: torch.dtype) -> dict:
    info = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
        info["cpu_count"] = len(names) or None
    info["cpu"] = cpu or "unknown"
    return info


def libraries() -> dict:
    import transformers

    from sprinter import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sprinter": __version__}


# ------------------------------------------------------------------------------------------- records
def disk_error(path: Path, err: OSError, doing: str) -> SprinterError:
    """An OSError while writing results, as one line that says what is kept and how to go on."""
    return SprinterError(f"{doing} {str(path)!r} failed: {err.strerror or err}; the finished units in "
                         f"{RECORDS} are kept (a half-written last line is dropped on --resume): free the space or fix "
                         "the folder, then rerun the same command with --resume")


def machine(device: torch.device, dtype: torch.dtype) -> dict:
    """The hardware and libraries a benchmark's results record (its figures hold on these only)."""
    return {"hardware": hardware(device, dtype), "libraries": libraries()}


def save_results(folder: Path, results: dict, md: str) -> None:
    """A benchmark's results.json and results.md (`md`, its markdown), each written atomically."""
    save(folder / "results.json", json.dumps(results, indent=2) + "\n")
    save(folder / "results.md", md)


def print_report(tables: Iterable[str], written: str) -> None:
    """A benchmark script's last words: its tables on stdout (what a pipe reads), the files it wrote on stderr."""
    for table in tables:
        print(table)
    print(f"written: {written}", file=sys.stderr)


def save(path: Path, text: str, *, doing: str = "writing") -> None:
    """write_atomic, with an OSError (a full disk, a read-only folder) turned into one SprinterError line."""
    try:
        write_atomic(path, text)
    except OSError as err:
        raise disk_error(path, err, doing) from err


def read_records(path: Path, *, key: str = "prompt") -> tuple[list[dict], str | None, object]:
    """The records of OUT/records.jsonl, a note when its last line was torn (dropped), and the unit that line
    belonged to where its start still names it (else None). Any other line that is not a record is refused:
    that is damage a rerun cannot repair."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records, note, torn_unit = [], None, None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and key in record and "method" in record:
            records.append(record)
        elif number == len(lines):  # a write cut short (kill -9, a full disk) or a hand-cut tail
            note = f"dropped the torn last line of {path} (line {number}, {len(line)} characters: not a whole record)"
            named = re.match(rf'\{{"{key}": ("[^"]*"|-?\d+)[,}}]', line)  # records start with their unit
            torn_unit = json.loads(named.group(1)) if named else None
        else:
            raise SprinterError(f"records: line {number} of {str(path)!r} is not a record ({line[:60]!r}); expected "
                                f"one JSON object with {key!r} and 'method' per line, or --overwrite to start again")
    return records, note, torn_unit


def open_records(out: Path, header: dict, *, resume: bool, overwrite: bool, key: str = "prompt",
                 log: Callable[[str], object] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Prepare OUT for a run described by `header` ({"methods": [...], ...}, checked equal on --resume); returns
    the finished units' records ({unit: [record per method]}; {} unless resuming). A unit whose methods did not
    all finish, or whose last record was torn, is dropped and runs again; `log` says which."""
    records_file, run_file = out / RECORDS, out / RUN
    if records_file.exists() and not (resume or overwrite):
        raise SprinterError(f"out: {str(out)!r} already holds {RECORDS}; expected --resume to continue that run, "
                            "--overwrite to replace it, or another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SprinterError(f"out: cannot make {str(out)!r} ({err.strerror or err}); "
                            "expected a writable folder") from err
    if not resume or not records_file.exists():
        save(run_file, json.dumps(header) + "\n")
        save(records_file, "")
        return {}
    try:
        previous = read_json(run_file, "run.json") if run_file.exists() else None
    except SprinterError:  # not UTF-8, or not JSON
        previous = None  # a damaged run.json cannot vouch for the records: refused as a different run below
    if previous != header:
        options = header.get("options", {})
        changed = sorted(k for k in options if ((previous or {}).get("options") or {}).get(k) != options[k])
        raise SprinterError(f"resume: the run in {str(out)!r} was made with other options, methods or prompts "
                            f"(options that differ: {changed or 'none; the methods or prompts do'}); expected the "
                            "same ones, or --overwrite")
    records, note, torn_unit = read_records(records_file, key=key)
    by_unit: dict = {}
    for record in records:
        by_unit.setdefault(record[key], []).append(record)
    done = {u: recs for u, recs in by_unit.items() if sorted(r["method"] for r in recs) == sorted(header["methods"])}
    again = [u for u in by_unit if u not in done]
    if torn_unit is not None and torn_unit not in done and torn_unit not in again:
        again.append(torn_unit)
    if note:
        log(f"resume: {note}")
    if again:
        log(f"resume: {key} {', '.join(map(str, again))} had not finished; "
            + ("it runs again" if len(again) == 1 else "they run again"))
    # Rewrite only the finished units, so appends continue after whole lines.
    save(records_file, "".join(json.dumps(r) + "\n" for recs in done.values() for r in recs), doing="rewriting")
    return done


def append_records(out: Path, records: Sequence[dict]) -> None:
    """Append one finished unit's records in one write, flushed to disk before the run goes on."""
    path = out / RECORDS
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise disk_error(path, err, "appending to") from err


__all__ = ["CALIBRATION", "DOMAINS", "RECORDS", "RUN", "Method", "Prompt", "Runner", "append_records", "check_lossless",
           "check_window", "disk_error", "hardware", "libraries", "load_prompts", "machine", "open_records",
           "print_report", "read_records", "rotated", "save", "save_results", "warm_up"]
