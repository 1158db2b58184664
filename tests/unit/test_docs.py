"""The README and docs/ are a contract with users: what they name must exist, and what exists must be documented.

The README is the front door (the two commands, a few examples, links); docs/ holds the rest. Checked here: every
setting is in the table of docs/configuration.md and every error code in the table of docs/operations.md; every
relative link (and its #anchor) in README.md and docs/*.md leads somewhere; every `mistral-gateway <command>`, every
GATEWAY_* name, every metric and every repository path they name exists; docs/architecture.md names every package
and module of `ls gateway`, and only those.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gateway.cli import _parser
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", *DOCS]
PAGE_IDS = [str(page.relative_to(ROOT)) for page in PAGES]

FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def code(text: str) -> list[str]:
    """The page's code: each fenced block, and each inline code span outside them."""
    return [*FENCE.findall(text), *INLINE_CODE.findall(prose(text))]


def slugs(text: str) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_configuration_documents_every_setting() -> None:
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `GATEWAY_([A-Z_]+)` \|", configuration, flags=re.M))
    assert {name.lower() for name in documented} == set(Settings.model_fields)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test    #" in readme and "make run     #" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "make test"


def test_operations_lists_every_error_code_the_gateway_sends() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    table = operations[operations.index("## Errors") :]
    source = "\n".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py") if "bundled" not in p.parts)
    codes = set(re.findall(r'\bcode\s*=\s*"([a-z_]+)"', source))
    assert codes, "no error codes found"
    missing = sorted(code for code in codes if f"`{code}`" not in table)
    assert missing == [], f"error codes the table of docs/operations.md does not list: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_leads_to_a_file_and_its_anchor(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in slugs(file.read_text()):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(ROOT)}")
    assert broken == []


def test_the_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [page.name for page in DOCS if f"](docs/{page.name})" not in readme] == []


@pytest.mark.parametrize("page", DOCS, ids=[page.name for page in DOCS])
def test_every_docs_page_starts_with_what_it_covers(page: Path) -> None:
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip(), "a title, then one line on what it covers"


def test_every_command_named_in_the_docs_exists() -> None:
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    named = {
        (page.name, command)
        for page in PAGES
        for snippet in code(page.read_text())
        for command in re.findall(r"(?:^|[\s/])mistral-gateway ([a-z][a-z-]*)", snippet, flags=re.M)
    }
    assert {command for _, command in named} >= {"check", "pull", "convert", "engine", "models"}
    assert sorted((name, command) for name, command in named if command not in commands) == []


def test_every_setting_named_in_the_docs_is_real() -> None:
    unknown = {
        (page.name, f"GATEWAY_{name}")
        for page in PAGES
        for name in re.findall(r"\bGATEWAY_([A-Z][A-Z0-9_]*)", page.read_text())
        if name.lower() not in Settings.model_fields
    }
    assert sorted(unknown) == []


def test_every_metric_is_documented_and_every_documented_metric_is_real() -> None:
    source = (ROOT / "gateway" / "metrics.py").read_text()
    metrics = set(re.findall(r'"(gateway_[a-z_]+)"', source))
    assert metrics, "no metrics found"
    operations = (ROOT / "docs" / "operations.md").read_text()
    section = operations[operations.index("## Metrics") : operations.index("\n## ", operations.index("## Metrics") + 1)]
    listed = {name.removesuffix("_total") for name in re.findall(r"\bgateway_[a-z_]+", section)}
    assert sorted(metrics - listed) == [], "metrics the Metrics section of docs/operations.md does not list"
    assert sorted(listed - metrics) == [], "metrics the Metrics section of docs/operations.md lists, which are not"
    counters = {
        (page.name, name)
        for page in PAGES
        for name in re.findall(r"\b(gateway_[a-z_]+)_total\b", page.read_text())
        if name not in metrics
    }
    assert sorted(counters) == []


def test_every_repository_path_named_in_the_docs_exists() -> None:
    path = re.compile(r"^(?:\.\./)?((?:gateway|tests|deploy|docs|\.ci)/[\w./-]*|\.env\.example|Makefile)$")
    missing = {
        (page.name, match.group(1))
        for page in PAGES
        for snippet in INLINE_CODE.findall(prose(page.read_text()))
        if (match := path.match(snippet)) is not None and not (ROOT / match.group(1)).exists()
    }
    assert sorted(missing) == []


def test_architecture_names_every_package_and_module_of_the_gateway_and_no_other() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    layers = text[text.index("## The layers") : text.index("\n## ", text.index("## The layers") + 1)]
    gateway = ROOT / "gateway"
    actual = {
        f"{p.name}/" if p.is_dir() else p.name
        for p in gateway.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")
    }
    rows = [line.split(" | ")[0] for line in layers.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in INLINE_CODE.findall(row)}
    assert listed == actual
    # What a package's row names inside it (`server.py`, `bundled/`) is there too.
    missing = []
    for line in layers.splitlines():
        package = re.match(r"^\| `(\w+)/` \|", line)
        if package is None:
            continue
        for name in re.findall(r"`(\w+(?:\.py|/))`", line.split(" | ", 1)[1]):
            if not any((gateway / package.group(1)).rglob(name.rstrip("/"))):
                missing.append(f"{package.group(1)}/{name}")
    assert missing == []
