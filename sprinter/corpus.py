"""Text corpora for every stage, split by document into train / val / test the same way everywhere.

Sources: `stdlib` (the Python standard library's own source, on every Python install: a real
code-completion domain), a folder of text files, a `.jsonl` or text file, or a Hub dataset name.
The split is a hash of each document's id, so it never depends on order or on how many documents a
stage reads: the pair builder trains on `train` only, the data stage reads `val` (prompts the pair
never saw), and benchmarks read `test` (prompts neither the pair nor the verifier saw).
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sprinter.errors import SprinterError
from sprinter.files import iter_lines, read_text

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".json", ".yaml",
                 ".yml", ".toml", ".html", ".css", ".sh", ".tex", ".csv", ""}
# Left out of the standard library: test folders (odd data, deliberately broken files), and the
# generated tables of `encodings` and `pydoc_data` (2 MB of near-identical lines that a small model
# memorises, which flatters its training loss and teaches it nothing about code).
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}


@dataclass(frozen=True)
class Document:
    id: str  # stable name: relative path, "file.jsonl:17", "dataset/split/17"
    text: str


def split_of(doc_id: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Which split a document belongs to, from a hash of its id (stable across runs and machines)."""
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if STDLIB_SKIP & set(rel.parts):
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(f"stdlib/{rel.as_posix()}", text)


def _folder_documents(root: Path) -> Iterator[Document]:
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        if any(part.startswith(".") for part in file.relative_to(root).parts):
            continue
        if b"\0" in file.read_bytes()[:8192]:
            continue  # a binary file (NUL bytes never occur in text): not part of the corpus
        text = read_text(file, "dataset file")  # text that is not UTF-8 is refused, not read with U+FFFD
        if text.strip():
            yield Document(file.relative_to(root).as_posix(), text)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    for number, line in iter_lines(path, "dataset"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SprinterError(f"dataset {str(path)!r}: line {number} is not JSON; expected one object per "
                                "line") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise SprinterError(f"dataset {str(path)!r}: line {number} has no string field {text_field!r}")
        if row[text_field].strip():
            yield Document(f"{path.name}:{number - 1}", row[text_field])


def _text_file_documents(path: Path) -> Iterator[Document]:
    """A plain text file: documents are its blank-line-separated paragraphs."""
    text = read_text(path, "dataset")
    for i, para in enumerate(text.split("\n\n")):
        if para.strip():
            yield Document(f"{path.name}:{i}", para)


def _hub_documents(name: str, hub_split: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets  # only here: the GPU image has no `datasets`
    except ImportError:
        raise SprinterError(f"dataset {name!r} looks like a Hub dataset, but the `datasets` package is not installed; "
                            "pip install 'sprinter[hub]', or pass a local folder or file") from None
    try:
        rows = datasets.load_dataset(name, split=hub_split)
    except Exception as err:  # the hub client raises many types (offline, not found, bad split)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SprinterError(f"dataset {name!r} (split {hub_split!r}) could not be loaded: {first}; offline machines "
                            "need a local folder, a .jsonl or a text file instead") from None
    if text_field not in rows.column_names:
        raise SprinterError(f"dataset {name!r} has no column {text_field!r}; columns: {rows.column_names}")
    for i, text in enumerate(rows[text_field]):
        if isinstance(text, str) and text.strip():
            yield Document(f"{name}/{hub_split}/{i}", text)


def iter_documents(source: str, text_field: str = "text", hub_split: str = "train") -> Iterator[Document]:
    """All documents of a source, in a fixed order."""
    if source == "stdlib":
        yield from _stdlib_documents()
        return
    path = Path(source)
    if path.is_dir():
        yield from _folder_documents(path)
    elif path.is_file():
        yield from _jsonl_documents(path, text_field) if path.suffix == ".jsonl" else _text_file_documents(path)
    elif source.count("/") <= 1 and not source.startswith((".", "/", "~")) and not Path(source).suffix:
        yield from _hub_documents(source, hub_split, text_field)
    else:
        raise SprinterError(f"dataset: got {source!r}; expected 'stdlib', an existing folder, a .jsonl or text file, "
                            "or a Hub dataset name")


def load_documents(source: str, split: str, text_field: str = "text", hub_split: str = "train",
                   limit: int | None = None) -> list[Document]:
    """The documents of one split (`train`, `val`, `test` or `all`); refuses an empty result."""
    if split not in SPLITS + ("all",):
        raise SprinterError(f"split: got {split!r}; expected one of {SPLITS + ('all',)}")
    docs = []
    for doc in iter_documents(source, text_field, hub_split):
        if split == "all" or split_of(doc.id) == split:
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                break
    if not docs:
        raise SprinterError(f"dataset {source!r} has no text in its {split!r} split; expected at least one "
                            "non-empty document (a folder of text files, or a file with text)")
    return docs


def prose_documents(docs: list[Document], min_chars: int = 200) -> list[Document]:
    """English prose from Python source: the module, class and function docstrings (a second domain)."""
    out = []
    for doc in docs:
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for j, node in enumerate(nodes):
            text = ast.get_docstring(node)
            if text and len(text) >= min_chars:
                out.append(Document(f"{doc.id}#doc{j}", text))
    return out
