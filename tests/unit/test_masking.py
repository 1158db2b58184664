"""The masker: which secrets the gateway knows, how they are masked, and the log filter."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from gateway.catalog import parse_catalog
from gateway.masking import MASK, Masker, MaskingFilter, build_masker, gateway_secrets, mask_handlers
from gateway.settings import Settings

LOCAL = '[[models]]\nid = "m"\nkind = "plain"\nrepo = "org/m"\nprefetch = false\n'


def test_the_secrets_come_from_the_settings_the_environment_and_the_models_file(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        admin_key="admin-key-123456",
        hf_token="hf_setting_token",
        cache_url="redis://user:p%40ssword99@redis:6379/0",
        engine_env={"HF_TOKEN": "hf_engine_env_token"},
    )
    environ = {"HF_TOKEN": "hf_environ_token", "HUGGING_FACE_HUB_TOKEN": "hf_legacy_token", "PATH": "/bin"}
    literal = parse_catalog(
        '[engine]\ntoken_source = "literal:hf_literal_token"\n' + LOCAL, origin="m.toml", model_dir=tmp_path
    )
    found = gateway_secrets(settings, api_keys=["api-key-one-1", "api-key-two-2"], environ=environ, catalog=literal)
    everything = set().union(*found.values())
    assert everything == {
        "api-key-one-1",
        "api-key-two-2",
        "admin-key-123456",
        "hf_setting_token",
        "hf_environ_token",
        "hf_legacy_token",
        "hf_engine_env_token",
        "p%40ssword99",
        "p@ssword99",
        "hf_literal_token",
    }
    named = parse_catalog('[engine]\ntoken_source = "env:MY_TOKEN"\n' + LOCAL, origin="m.toml", model_dir=tmp_path)
    found = gateway_secrets(
        Settings(_env_file=None), api_keys=[], environ={"MY_TOKEN": "my-token-value"}, catalog=named
    )
    assert set().union(*found.values()) == {"my-token-value"}
    # A Redis URL with no password, no keys, no token: nothing to mask.
    bare = Settings(_env_file=None, cache_url="redis://redis:6379/0")
    assert gateway_secrets(bare, api_keys=[], environ={"PATH": "/bin"}) == {}


def test_a_password_alone_in_a_redis_url_is_found() -> None:
    settings = Settings(_env_file=None, cache_url="redis://:hunter2hunter2@redis:6379/0")
    assert gateway_secrets(settings, api_keys=[], environ={}) == {
        "the password of GATEWAY_CACHE_URL": {"hunter2hunter2"}
    }


def test_each_secret_is_masked_wherever_it_is_and_the_longest_first() -> None:
    masker = Masker(["secret-key-1", "secret-key-12345"])
    assert masker.text("a secret-key-12345 and secret-key-1.") == f"a {MASK} and {MASK}."
    assert masker.text("nothing here") == "nothing here"
    nested = {"error": "bad secret-key-1", "list": ["secret-key-1", 3], "secret-key-1": None}
    assert masker.value(nested) == {"error": f"bad {MASK}", "list": [MASK, 3], MASK: None}


def test_a_short_secret_is_not_masked_but_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    masker = Masker(["a", "long-enough-key"])
    assert masker.text("a long-enough-key") == f"a {MASK}" and masker.too_short == {"a"}
    assert not Masker([]) and not Masker(["short"]) and Masker(["long-enough"])
    with caplog.at_level(logging.WARNING):
        built = build_masker({"GATEWAY_ADMIN_KEY": {"abc"}}, logging.getLogger("tests.masking"))
    assert built is None  # nothing long enough: nothing to mask, no cost
    assert "GATEWAY_ADMIN_KEY holds a secret shorter than 8 characters" in caplog.text


def test_the_log_filter_masks_messages_arguments_and_tracebacks() -> None:
    masker = Masker(["admin-key-123456"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("tests.masking.filter")
    logger.propagate = False
    logger.addHandler(handler)
    mask_handlers(masker, [logger])
    mask_handlers(masker, [logger])  # twice: still one filter
    assert sum(isinstance(f, MaskingFilter) for f in handler.filters) == 1
    try:
        logger.warning("key %s in an argument", "admin-key-123456")
        logger.warning("key admin-key-123456 in the message, %d args", 0)
        try:
            raise ValueError("failed with admin-key-123456")
        except ValueError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "admin-key-123456" not in written
    assert f"key {MASK} in an argument" in written and f"key {MASK} in the message, 0 args" in written
    assert f"ValueError: failed with {MASK}" in written
