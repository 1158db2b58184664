"""The engine's environment: what of the gateway's gets through, and the token only where the engine downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.catalog import Catalog, parse_catalog
from gateway.engine.discovery import EngineProgram
from gateway.engine.environment import allowed, engine_downloads, engine_environment
from gateway.engine.launcher import plan_launch
from gateway.errors import ConfigError
from gateway.settings import Settings

GATEWAY_ENVIRON = {
    "PATH": "/usr/bin",
    "HOME": "/home/u",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp/x",
    "CUDA_VISIBLE_DEVICES": "0",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "HIP_VISIBLE_DEVICES": "1",
    "ROCR_VISIBLE_DEVICES": "1",
    "HF_HOME": "/models/hf",
    "HF_HUB_CACHE": "/models/hf/hub",
    "XDG_CACHE_HOME": "/cache",
    "RUST_LOG": "warn",
    "RAYON_NUM_THREADS": "2",
    "MISTRALRS_DEBUG": "1",
    "CANDLE_NCCL": "x",
    "PYTHONPATH": "/src",
    # What must not get through:
    "GATEWAY_ADMIN_KEY": "admin-key-123456",
    "GATEWAY_API_KEYS": "api-key-123456",
    "GATEWAY_CACHE_URL": "redis://:hunter2hunter2@redis:6379/0",
    "GATEWAY_HF_TOKEN": "hf_gateway_token",
    "HF_TOKEN": "hf_env_token",
    "HUGGING_FACE_HUB_TOKEN": "hf_legacy_token",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "OPENAI_API_KEY": "sk-openai",
    "MY_TOKEN": "mine",
}
PASSED = {
    name for name in GATEWAY_ENVIRON if not name.startswith(("GATEWAY_", "HF_TOKEN", "HUGGING_", "AWS", "OPENAI"))
}
PASSED -= {"MY_TOKEN"}

LOCAL = '[[models]]\nid = "local"\nkind = "plain"\npath = "{dir}"\n'
FETCHED = '[[models]]\nid = "fetched"\nkind = "plain"\nrepo = "org/fetched"\nprefetch = false\n'


def catalog(tmp_path: Path, toml: str) -> Catalog:
    return parse_catalog(toml.format(dir=tmp_path), origin="m.toml", model_dir=tmp_path / "models")


def test_only_the_allowlist_gets_through(tmp_path: Path) -> None:
    env = engine_environment(GATEWAY_ENVIRON, catalog(tmp_path, LOCAL), hf_token="hf_setting", explicit={})
    assert set(env) == PASSED
    assert all(env[name] == GATEWAY_ENVIRON[name] for name in env)
    assert not any(allowed(name) for name in GATEWAY_ENVIRON if name.startswith("GATEWAY_"))


def test_the_token_goes_only_to_an_engine_that_downloads(tmp_path: Path) -> None:
    local, fetched = catalog(tmp_path, LOCAL), catalog(tmp_path, FETCHED)
    assert not engine_downloads(local) and engine_downloads(fetched)
    assert "HF_TOKEN" not in engine_environment(GATEWAY_ENVIRON, local, hf_token="hf_setting", explicit={})
    # The setting first; else the gateway's own HF_TOKEN.
    assert engine_environment(GATEWAY_ENVIRON, fetched, hf_token="hf_setting", explicit={})["HF_TOKEN"] == "hf_setting"
    assert engine_environment(GATEWAY_ENVIRON, fetched, hf_token=None, explicit={})["HF_TOKEN"] == "hf_env_token"
    assert "HF_TOKEN" not in engine_environment({"PATH": "/bin"}, fetched, hf_token=None, explicit={})


def test_the_variable_a_token_source_names_goes_where_the_engine_downloads(tmp_path: Path) -> None:
    source = '[engine]\ntoken_source = "env:MY_TOKEN"\n'
    fetched = catalog(tmp_path, source + FETCHED)
    assert engine_environment(GATEWAY_ENVIRON, fetched, hf_token=None, explicit={})["MY_TOKEN"] == "mine"
    local = catalog(tmp_path, source + LOCAL)
    assert "MY_TOKEN" not in engine_environment(GATEWAY_ENVIRON, local, hf_token=None, explicit={})


def test_gateway_engine_env_is_set_over_everything(tmp_path: Path) -> None:
    explicit = {"RUST_LOG": "debug", "OPENAI_API_KEY": "for-an-mcp-server"}
    env = engine_environment(GATEWAY_ENVIRON, catalog(tmp_path, LOCAL), hf_token=None, explicit=explicit)
    assert env["RUST_LOG"] == "debug" and env["OPENAI_API_KEY"] == "for-an-mcp-server"


def test_no_gateway_variable_can_be_asked_for(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="GATEWAY_ADMIN_KEY"):
        Settings(_env_file=None, engine_env={"GATEWAY_ADMIN_KEY": "x"})
    with pytest.raises(ConfigError, match="never get GATEWAY_"):
        catalog(tmp_path, '[engine]\ntoken_source = "env:GATEWAY_HF_TOKEN"\n' + FETCHED)


def test_the_launch_plan_carries_the_allowlisted_environment(tmp_path: Path) -> None:
    program = EngineProgram(("mistralrs-server",), "legacy", "mistralrs-server", (0, 8, 4))
    settings = Settings(_env_file=None, hf_token="hf_setting", admin_key="admin-key-123456", engine_env={"X": "1"})
    plan = plan_launch(
        program, catalog(tmp_path, LOCAL), port=1234, run_dir=tmp_path, settings=settings, environ=GATEWAY_ENVIRON
    )
    assert set(plan.env) == PASSED | {"X"}
    assert "admin-key-123456" not in str(plan.env) and "hf_setting" not in str(plan.env)


def test_the_token_setting_is_not_undone_by_an_empty_hf_token(tmp_path: Path) -> None:
    # engine_catalog names env:HF_TOKEN as the token source; the gateway's own HF_TOKEN may be set and empty.
    fetched = catalog(tmp_path, '[engine]\ntoken_source = "env:HF_TOKEN"\n' + FETCHED)
    env = engine_environment({"HF_TOKEN": ""}, fetched, hf_token="hf_setting", explicit={})
    assert env["HF_TOKEN"] == "hf_setting"
