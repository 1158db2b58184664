"""The start-up warning of a gateway that listens beyond this machine with nothing guarding it."""

from __future__ import annotations

import pytest

from gateway.http.auth import exposure_warning


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_no_warning_on_loopback(host: str) -> None:
    assert exposure_warning(host, 8080, api_keys=frozenset(), admin_key=None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gateway.example.com"])
def test_a_reachable_address_without_keys_is_named_with_what_is_open(host: str) -> None:
    warning = exposure_warning(host, 8080, api_keys=frozenset(), admin_key=None)
    assert warning is not None and f"{host}:8080" in warning and "GATEWAY_API_KEYS" in warning
    assert "stopping engines" in warning  # no admin key either: the operator's routes are open too
    with_admin = exposure_warning(host, 8080, api_keys=frozenset(), admin_key="an-admin-key-0123")
    assert with_admin is not None and "stopping engines" not in with_admin


def test_no_warning_once_keys_guard_the_api() -> None:
    assert exposure_warning("0.0.0.0", 8080, api_keys=frozenset({"k" * 20}), admin_key=None) is None
