"""The sha256 of model files without a download: the models file's value, the check, and the cached record."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gateway.models.checksums import check_sha256, normalise_sha256, read_sha256_cache, write_sha256_cache
from gateway.models.errors import DownloadError

SHA = hashlib.sha256(b"a model file").hexdigest()


def test_sha256_is_normalised_and_checked_for_shape() -> None:
    assert normalise_sha256(None, "a") is None
    assert normalise_sha256(" SHA256:" + SHA.upper() + " ", "a") == SHA
    with pytest.raises(DownloadError) as caught:
        normalise_sha256("abc", "a.gguf")
    assert "'a.gguf'" in caught.value.message and "64 hexadecimal digits" in caught.value.message


def test_sha_check_names_the_file_the_expected_and_the_found_hash() -> None:
    check_sha256("a.gguf", "downloaded from x", None, SHA)
    with pytest.raises(DownloadError) as caught:
        check_sha256("a.gguf", "downloaded from x", "0" * 64, SHA)
    message = caught.value.message
    assert "'a.gguf'" in message and "0" * 64 in message and SHA in message


def test_sha_cache_is_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(b"hello")
    assert read_sha256_cache(path) is None
    write_sha256_cache(path, SHA)
    assert json.loads((tmp_path / "m.bin.sha256").read_text())["size"] == 5
    assert read_sha256_cache(path) == SHA
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert read_sha256_cache(path) is None
    write_sha256_cache(path, SHA)
    path.write_bytes(b"hello!")
    os.utime(path, ns=(stat.st_atime_ns, path.stat().st_mtime_ns))
    assert read_sha256_cache(path) is None  # same mtime, other size
    (tmp_path / "m.bin.sha256").write_text("not json")
    assert read_sha256_cache(path) is None
