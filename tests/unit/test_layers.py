"""The layers of docs/architecture.md, kept true: every import inside the gateway runs down them, never up, so that a
reader can take the packages from the top (the command line) to the bottom (errors and settings) and never meet a
module that depends on one above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "gateway"
# Top to bottom; a module may import its own package and anything in a lower layer.
LAYERS = (
    ("__main__",),
    ("cli",),
    ("app",),
    ("http",),
    ("dialects",),
    ("serving",),
    ("console",),
    ("cache", "metrics"),
    ("engine",),
    ("models",),
    ("events",),
    ("fleet", "masking"),
    ("upstream",),
    ("chat", "catalog"),
    ("errors", "settings"),
)
LAYER = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """The top-level package or module of ``gateway.x.y``: ``x``."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def imports(path: Path) -> list[str]:
    """The gateway modules ``path`` imports, absolute."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                found += [target] if node.module else [f"{base}.{alias.name}" for alias in node.names]
            elif node.module and node.module.startswith("gateway."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("gateway.")]
    return found


def test_every_top_level_part_has_its_layer() -> None:
    parts = {p.stem for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    parts |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert sorted(parts - set(LAYER)) == [] and sorted(set(LAYER) - parts) == []


def test_no_import_runs_up_the_layers() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        here = part_of(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if not here:
            continue
        for target in imports(path):
            there = part_of(target)
            if there not in LAYER:
                continue  # a name of gateway/__init__.py (its version), below everything
            if there != here and LAYER[there] <= LAYER[here]:
                upward.append(f"{path.relative_to(ROOT.parent)} imports {target}")
    assert upward == []


def test_a_gateway_starts_without_the_libraries_only_downloads_and_peers_need() -> None:
    """httpx pulls in rich and pygments (its command line's): loaded at start, they and the downloaders' libraries
    took 12 MB of a gateway's 61 MB at rest and made every full garbage collection longer (docs/performance.md)."""
    code = (
        "import sys, gateway.app, gateway.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'httpx', 'rich', 'pygments', 'tenacity', 'filelock'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert done.stdout.strip() == "[]", done.stdout
