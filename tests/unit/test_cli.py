from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import _parser, _settings, main


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


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"GATEWAY_PORT": "abc"}, "GATEWAY_PORT: Input should be a valid integer"),
        ({"GATEWAY_ENGINE_URL": "https://127.0.0.1:1234"}, "GATEWAY_ENGINE_URL: must be the engine's plain http://"),
        ({"GATEWAY_ENGINE_URL": "127.0.0.1:1234"}, "(got '127.0.0.1:1234')"),
        ({"GATEWAY_IDLE_TIMEOUT": "soon"}, "GATEWAY_IDLE_TIMEOUT: Input should be a valid number"),
    ],
)
def test_a_bad_setting_is_one_clear_line_and_exit_2_not_a_traceback(
    env: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir("/")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mistral-gateway: configuration error: ") and says in err
    assert "Traceback" not in err and "errors.pydantic.dev" not in err and err.count("\n") == 1


def test_an_engine_url_is_kept_without_its_trailing_slash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    monkeypatch.setenv("GATEWAY_ENGINE_URL", " http://127.0.0.1:1234/ ")
    assert _settings(_parser().parse_args(["serve"])).engine_url == "http://127.0.0.1:1234"


def test_a_models_file_naming_a_file_outside_the_model_dir_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "a"\nkind = "gguf"\nurl = "http://127.0.0.1:9/x.gguf"\nfile = "../../x"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATEWAY_MODEL_DIR", str(tmp_path / "dir"))
    assert main(["check", "--models-file", str(models)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mistral-gateway: configuration error: ") and "file = '../../x' must name a file" in err
    assert not (tmp_path / "dir").exists() and not (tmp_path.parent / "x").exists()


def test_check_prints_the_isq_type_the_engine_is_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 576, "intermediate_size": 1536}')
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "m"\nkind = "plain"\npath = "{folder}"\n[models.options]\nisq = "auto"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATEWAY_MODEL_DIR", str(tmp_path / "dir"))
    monkeypatch.setenv("GATEWAY_ENGINE", "bundled")  # a CPU build: Q8_0 is its fast type
    assert main(["check", "--models-file", str(models)]) == 0
    out = capsys.readouterr().out
    assert 'in-situ quantization of m: Q8_0 (isq = "auto")' in out and "--isq Q8_0" in out and "--isq auto" not in out
