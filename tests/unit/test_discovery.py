from __future__ import annotations

from pathlib import Path

import pytest

from gateway.engine.discovery import BUNDLED, find_engine, probe_version
from gateway.errors import EngineNotInstalled


def which_from(found: dict[str, str]) -> object:
    return lambda name: found.get(name)


@pytest.mark.parametrize(
    ("on_path", "bundled", "expected"),
    [
        ({"mistralrs": "/b/mistralrs", "mistralrs-server": "/b/mistralrs-server"}, True, "mistralrs"),
        ({"mistralrs-server": "/b/mistralrs-server"}, True, "mistralrs-server"),
        ({}, True, "bundled"),
    ],
)
def test_auto_order(on_path: dict[str, str], bundled: bool, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.engine.discovery.probe_version", lambda argv: None)
    program = find_engine(
        choice="auto",
        binary=None,
        which=which_from(on_path),  # type: ignore[arg-type]
        has_bundled=lambda: bundled,
    )
    assert program.name == expected
    assert program.dialect == ("serve" if expected == "mistralrs" else "legacy")


def test_nothing_installed_says_what_to_install() -> None:
    with pytest.raises(EngineNotInstalled, match=r"pip install 'mistral-gateway\[engine\]'"):
        find_engine(choice="auto", binary=None, which=lambda n: None, has_bundled=lambda: False)
    with pytest.raises(EngineNotInstalled, match="GATEWAY_ENGINE=bundled"):
        find_engine(choice="bundled", binary=None, which=lambda n: None, has_bundled=lambda: False)


def test_forced_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.engine.discovery.probe_version", lambda argv: None)
    on_path = which_from({"mistralrs": "/b/mistralrs", "mistralrs-server": "/b/mistralrs-server"})
    assert find_engine(choice="bundled", binary=None, which=on_path, has_bundled=lambda: True) == BUNDLED  # type: ignore[arg-type]
    forced = find_engine(choice="mistralrs-server", binary=None, which=on_path, has_bundled=lambda: True)  # type: ignore[arg-type]
    assert forced.argv == ("/b/mistralrs-server",)
    custom = tmp_path / "engine-build"
    custom.write_text("#!/bin/sh\n")
    custom.chmod(0o755)
    # An unusual file name: GATEWAY_ENGINE says which dialect it speaks.
    program = find_engine(choice="mistralrs-server", binary=str(custom), which=lambda n: None)
    assert program.dialect == "legacy" and program.argv == (str(custom),)
    with pytest.raises(EngineNotInstalled, match="GATEWAY_ENGINE_BINARY"):
        find_engine(choice="auto", binary="/nope/mistralrs", which=lambda n: None)


def test_version_probe(tmp_path: Path) -> None:
    script = tmp_path / "mistralrs-server"
    script.write_text("#!/bin/sh\necho 'mistralrs-server 0.8.4'\n")
    script.chmod(0o755)
    assert probe_version((str(script),)) == (0, 8, 4)
    script.write_text("#!/bin/sh\nexit 2\n")
    assert probe_version((str(script),)) is None
    assert probe_version((str(tmp_path / "absent"),)) is None
