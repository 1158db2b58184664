"""requirements.lock, which the container image installs with --require-hashes: it must cover what pyproject.toml
names (the runtime dependencies and the engine extra, for Python 3.11 on Linux x86_64), at versions pyproject.toml
accepts, each pinned by hash. That the lock resolves as pip installs it is `make lock-check`'s part (Makefile)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The image's interpreter and machine (deploy/docker/Dockerfile: python:3.11-slim on x86_64).
IMAGE = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Each locked package: its version and its hashes."""
    text = re.sub(r"\\\n", " ", (ROOT / "requirements.lock").read_text())
    pins: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match is not None, f"not pinned with ==: {line[:80]}"
        pins[canonicalize_name(match.group(1))] = (
            Version(match.group(2)),
            re.findall(r"--hash=sha256:([0-9a-f]{64})", line),
        )
    return pins


def wanted() -> list[Requirement]:
    """What pyproject.toml asks for on the image: the runtime dependencies, the engine extra, the build backend."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [
        *pyproject["project"]["dependencies"],
        *pyproject["project"]["optional-dependencies"]["engine"],
        *pyproject["build-system"]["requires"],
    ]
    requirements = [Requirement(name) for name in names]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({**IMAGE, "extra": ""})]


def test_the_lock_pins_every_dependency_pyproject_names_at_a_version_it_accepts() -> None:
    pins = locked()
    for requirement in wanted():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, which pyproject.toml's {requirement} refuses: run `make lock`"
        )
    assert "mistralrs" in pins and "setuptools" in pins  # the engine, and the backend that builds the package


def test_every_locked_package_has_its_hashes() -> None:
    pins = locked()
    assert len(pins) >= 20
    assert [name for name, (_, hashes) in pins.items() if not hashes] == []
