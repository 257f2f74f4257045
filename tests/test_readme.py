"""The README and docs/: CI runs the README's test command, the README stays short, and every document or
section the code, the configs and the docs cite exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CITING = sorted(path for folder in ("sprinter", "scripts", "tests", "configs")
                for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".yaml"))
DOCS = sorted((ROOT / "docs").glob("*.md"))
OLD_REFERENCES = "REFERENCES" + ".md"  # the file outside the repository that code used to cite (split: not one)


def test_ci_runs_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_command = lines[next(i for i, line in enumerate(lines) if "the README's test command, verbatim" in line) + 1]
    assert ci_command in README.read_text()


def test_ci_installs_vllm_by_the_documented_command():
    """The vLLM step runs tests/test_vllm.py after the install docs/vllm.md tells users to run."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install_vllm.sh" in (ROOT / "docs" / "vllm.md").read_text()
    assert "bash scripts/install_vllm.sh pytest && python -m pytest tests/test_vllm.py" in ci


def test_the_readme_is_short_and_has_its_parts():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for heading in ("## Quickstart", "## The file tree is the pipeline", "## The API in one example", "## Results"):
        assert heading in text


def test_the_readme_tree_names_every_stage_folder_and_module():
    tree = README.read_text().split("## The file tree is the pipeline", 1)[1].split("\n## ", 1)[0]
    folders = [p.name for p in (ROOT / "sprinter").iterdir() if (p / "__init__.py").exists()]
    assert folders and all(f"{name}/" in tree for name in folders)
    for module in ("config.py", "errors.py", "files.py", "corpus.py", "verifier.py"):
        assert module in tree


def cited_docs(path: Path) -> set[str]:
    return set(re.findall(r"docs/[\w.-]+\.md", path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("path", [README, *CITING, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_doc_exists(path):
    missing = [doc for doc in cited_docs(path) if not (ROOT / doc).is_file()]
    assert not missing, f"{path.relative_to(ROOT)} cites {missing}, which do not exist"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    missing = [link for link in links if "://" not in link and not (path.parent / link).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links {missing}, which do not exist"


def test_reference_citations_point_at_sections_that_exist():
    sections = set(re.findall(r"^## §(\d+)\.", (ROOT / "docs" / "references.md").read_text(), flags=re.M))
    assert sections == {str(n) for n in range(1, 9)}
    for path in [README, *CITING, *DOCS]:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        assert OLD_REFERENCES not in text, f"{where} cites {OLD_REFERENCES}; expected docs/references.md"
        for cited in re.findall(r"references\.md §(\d+)", text):
            assert cited in sections, f"{where} cites references.md §{cited}, which does not exist"
