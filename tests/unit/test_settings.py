from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_lists_every_setting_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / ".env.example").read_text()
    names = re.findall(r"^GATEWAY_([A-Z_]+)=", text, flags=re.M)
    assert sorted(n.lower() for n in names) == sorted(Settings.model_fields)
    for line in text.splitlines():
        if line.startswith("GATEWAY_"):
            key, value = line.split("=", 1)
            monkeypatch.setenv(key, value)
    from_example = Settings(_env_file=None)
    defaults = Settings.model_construct()
    for name in Settings.model_fields:
        if name == "model_dir":
            assert from_example.model_dir == Path("~/.mistral-rs").expanduser()
            continue
        assert getattr(from_example, name) == getattr(defaults, name), name


def test_defaults_serve_on_loopback_8080() -> None:
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port, settings.idle_timeout, settings.startup_timeout) == (
        "127.0.0.1",
        8080,
        300,
        600,
    )
    assert settings.engine_url is None and settings.engine_port == 0


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("GATEWAY_PORT=9999\nGATEWAY_IDLE_TIMEOUT=0\nGATEWAY_ENGINE_URL=\n")
    settings = Settings(_env_file=env)
    assert settings.port == 9999 and settings.idle_timeout == 0 and settings.engine_url is None


def test_models_file_defaults_to_models_toml_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)
    assert settings.resolved_models_file() is None
    (tmp_path / "models.toml").write_text("")
    assert settings.resolved_models_file() == Path("models.toml")


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("https://llm.example.com/", "https://llm.example.com"),
        (" http://10.0.0.5:8080/llm ", "http://10.0.0.5:8080/llm"),
        ("", None),
    ],
)
def test_public_url_is_a_base_url(given: str, kept: str | None) -> None:
    assert Settings(_env_file=None, public_url=given).public_url == kept


@pytest.mark.parametrize(
    "bad",
    [
        "llm.example.com",
        "ftp://llm.example.com",
        "https://",
        "https://x/?a=1",
        "https://x/#top",
        "https://user:pw@x",
        "https://x:99999",
        "https://a b.example",
    ],
)
def test_public_url_refuses_what_is_no_base_url(bad: str) -> None:
    with pytest.raises(ValueError, match="public_url"):
        Settings(_env_file=None, public_url=bad)


def test_forwarded_allow_ips_are_addresses_or_networks() -> None:
    assert Settings(_env_file=None).forwarded_allow_ips == "127.0.0.1,::1"
    allowed = Settings(_env_file=None, forwarded_allow_ips=" 10.0.0.0/8, fd00::1 ,").forwarded_allow_ips
    assert allowed == "10.0.0.0/8,fd00::1"
    assert Settings(_env_file=None, forwarded_allow_ips="*").forwarded_allow_ips == "*"
    assert Settings(_env_file=None, forwarded_allow_ips="").forwarded_allow_ips == ""  # trust no proxy
    for bad in ("localhost", "10.0.0.1/8", "10.0.0.0/33"):
        with pytest.raises(ValueError, match="forwarded_allow_ips"):
            Settings(_env_file=None, forwarded_allow_ips=bad)


def test_connection_defences_default_on() -> None:
    settings = Settings(_env_file=None)
    assert (settings.header_timeout, settings.max_connections) == (10, 1000)
    with pytest.raises(ValueError, match="header_timeout"):
        Settings(_env_file=None, header_timeout=0)


def test_the_node_name_is_the_host_name_unless_set_and_must_fit_in_a_header() -> None:
    import socket

    assert Settings(_env_file=None).node_name == socket.gethostname()
    assert Settings(_env_file=None, node_name=" ").node_name == socket.gethostname()
    assert Settings(_env_file=None, node_name=" gw-2.eu ").node_name == "gw-2.eu"
    for bad in ("gw 2", "gw\r\nx-evil: 1", "caf\u00e9"):
        with pytest.raises(ValueError, match="printable ASCII"):
            Settings(_env_file=None, node_name=bad)
