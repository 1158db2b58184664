from __future__ import annotations

import pytest

from gateway.cli import _parser, _settings


@pytest.mark.parametrize(
    ("argv", "port", "models_file"),
    [
        ([], 8080, None),
        (["--port", "9000"], 9000, None),
        (["--port", "9000", "serve"], 9000, None),  # a flag before the subcommand is kept
        (["serve", "--port", "9001"], 9001, None),
        (["--models-file", "/x.toml", "check"], 8080, "/x.toml"),
        (["check", "--models-file", "/y.toml"], 8080, "/y.toml"),
        (["pull", "--models-file", "/z.toml", "some/model"], 8080, "/z.toml"),
    ],
)
def test_flags_before_or_after_the_subcommand(
    argv: list[str], port: int, models_file: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("GATEWAY_PORT", "GATEWAY_MODELS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir("/")  # no .env here
    settings = _settings(_parser().parse_args(argv))
    assert settings.port == port
    assert (str(settings.models_file) if settings.models_file else None) == models_file


def test_environment_is_used_when_no_flag_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "7777")
    monkeypatch.chdir("/")
    assert _settings(_parser().parse_args(["serve"])).port == 7777
    assert _settings(_parser().parse_args(["serve", "--port", "7778"])).port == 7778
