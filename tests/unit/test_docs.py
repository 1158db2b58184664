"""The README is a contract with users: its settings table and commands must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


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
