"""Hugging Face prefetch without a hub: snapshot plans, records, error words, retries, and what the engine gets.

The hub itself is an in-memory :class:`MemoryHub` here; tests/integration/test_hub.py runs huggingface_hub for
real against tests/fakehub.py.
"""

from __future__ import annotations

import errno
import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import Model, parse_catalog
from gateway.engine.pool import EnginePool
from gateway.errors import ConfigError, EngineStartFailed
from gateway.models.download import Downloader
from gateway.models.errors import DownloadError
from gateway.models.hub import HubFetcher, Listing, Snapshot, explain, recorded_files, snapshot_of, write_record
from tests.fakes.engines import FakeSpawner, make_pool
from tests.helpers import FakeSleep, Recorder

FILES = {"config.json": b"{}", "model.safetensors": b"w" * 1000, "tokenizer.json": b"t" * 10, "onnx/model.onnx": b"o"}


def model(toml_entry: str, tmp_path: Path) -> Model:
    catalog = parse_catalog(f'[[models]]\nid = "m"\n{toml_entry}\n', origin="m.toml", model_dir=tmp_path)
    return catalog.models[0]


# ------------------------------------------------------------------------------------------ plans


def test_models_file_takes_files_and_prefetch(tmp_path: Path) -> None:
    entry = model('kind = "plain"\nrepo = "org/x"\nfiles = ["*.json"]\nprefetch = false', tmp_path).entry
    assert entry.files == ["*.json"] and entry.prefetch is False
    assert model('kind = "plain"\nrepo = "org/x"', tmp_path).entry.prefetch is True
    with pytest.raises(ConfigError, match="`files` selects files of a Hugging Face `repo`"):
        model(f'kind = "plain"\npath = "{tmp_path}"\nfiles = ["*.json"]', tmp_path)


def test_snapshot_goes_to_model_dir_slash_repo_with_the_right_patterns(tmp_path: Path) -> None:
    whole = snapshot_of(model('kind = "plain"\nrepo = "org/x"\nrevision = "v1"', tmp_path), tmp_path)
    assert whole == Snapshot("org/x", "v1", None, tmp_path / "org" / "x")
    some = snapshot_of(model('kind = "embedding"\nfiles = ["*.json", "*.safetensors"]', tmp_path), tmp_path)
    assert some.repo == "m" and some.patterns == ("*.json", "*.safetensors")
    # A GGUF repo holds every quantisation: only the model's file (plus what `files` asks for).
    gguf = snapshot_of(model('kind = "gguf"\nrepo = "org/x-GGUF"\nfile = "x-Q4_K_M.gguf"', tmp_path), tmp_path)
    assert gguf.patterns == ("x-Q4_K_M.gguf",)
    both = model('kind = "gguf"\nrepo = "org/x-GGUF"\nfile = "x.gguf"\nfiles = ["*.json"]', tmp_path)
    assert snapshot_of(both, tmp_path).patterns == ("*.json", "x.gguf")
    with pytest.raises(ConfigError, match="is not a Hugging Face repository id"):  # refused at start
        model('kind = "plain"\nrepo = "../etc"', tmp_path)


def test_a_record_stands_only_while_every_file_is_there_at_its_size(tmp_path: Path) -> None:
    snap = Snapshot("org/x", None, ("*.json",), tmp_path / "org" / "x")
    assert recorded_files(snap) is None
    (snap.folder / "sub").mkdir(parents=True)
    (snap.folder / "config.json").write_bytes(b"{}")
    (snap.folder / "sub" / "a.json").write_bytes(b"[1]")
    write_record(snap, "c" * 40, {"config.json": 2, "sub/a.json": 3})
    assert recorded_files(snap) == {"config.json": 2, "sub/a.json": 3}
    # Another revision or other patterns are other snapshots, with records of their own.
    assert recorded_files(Snapshot("org/x", "v2", ("*.json",), snap.folder)) is None
    assert recorded_files(Snapshot("org/x", None, None, snap.folder)) is None
    (snap.folder / "sub" / "a.json").write_bytes(b"[12]")
    assert recorded_files(snap) is None
    (snap.folder / "sub" / "a.json").unlink()
    assert recorded_files(snap) is None
    snap.marker.write_text("{not json")
    assert recorded_files(snap) is None


def test_errors_are_worded_and_sorted_into_retry_or_not(tmp_path: Path) -> None:
    snap = Snapshot("org/x", None, None, tmp_path / "org" / "x")
    url = "https://hub.test/org/x"
    missing = explain(ModuleNotFoundError("No module named 'huggingface_hub'"), snap, url)
    assert (
        not missing.retryable
        and "pip install huggingface_hub" in missing.message
        and "prefetch = false" in missing.message
    )
    assert explain(ConnectionError("refused"), snap, url).retryable
    assert explain(TimeoutError(), snap, url).retryable
    full = explain(OSError(errno.ENOSPC, "No space left on device"), snap, url)
    assert not full.retryable and "disk space" in full.message and "GATEWAY_MODEL_DIR" in full.message
    bad = explain(ValueError("Repo id must be in the form 'repo_name'"), snap, url)
    assert not bad.retryable and "'org/x'" in bad.message
    own = DownloadError("as it is", file="org/x")
    assert explain(own, snap, url) is own


# --------------------------------------------------------------------------------- the fetcher


class MemoryHub:
    """The Hub protocol over a dict of files; ``failures`` are raised by the next listings, one each;
    ``cache`` is what ``cached()`` finds (None: nothing in the hub client's cache)."""

    def __init__(self, files: Mapping[str, bytes] = FILES) -> None:
        self.files = dict(files)
        self.calls: list[str] = []
        self.failures: list[BaseException] = []
        self.leave_out: set[str] = set()  # files download() does not write (a download that lies)
        self.cache: Path | None = None

    def url(self, repo: str) -> str:
        return f"https://hub.test/{repo}"

    def listing(self, snapshot: Snapshot) -> Listing:
        self.calls.append("listing")
        if self.failures:
            raise self.failures.pop(0)
        chosen = {
            name: len(content)
            for name, content in self.files.items()
            if snapshot.patterns is None or any(fnmatch.fnmatch(name, p) for p in snapshot.patterns)
        }
        return Listing("c" * 40, chosen)

    def cached(self, snapshot: Snapshot) -> Path | None:
        self.calls.append("cached")
        return self.cache

    def download(self, snapshot: Snapshot, commit: str) -> None:
        self.calls.append("download")
        for name, content in self.files.items():
            if name in self.leave_out:
                continue
            if snapshot.patterns is None or any(fnmatch.fnmatch(name, p) for p in snapshot.patterns):
                (snapshot.folder / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot.folder / name).write_bytes(content)


class EscapingHub(MemoryHub):
    """A hub (or a mirror) that lists a file outside the repo's folder, and would write it if asked."""

    def listing(self, snapshot: Snapshot) -> Listing:
        self.calls.append("listing")
        return Listing("c" * 40, {"config.json": 2, "../../escaped.txt": 3})


def fetcher(tmp_path: Path, hub: MemoryHub, **kwargs: Any) -> tuple[HubFetcher, Recorder, FakeSleep]:
    events, sleep = Recorder(), FakeSleep()
    return HubFetcher(tmp_path, hub=hub, events=events, sleep=sleep, **kwargs), events, sleep


async def test_fetches_once_then_finds_the_snapshot_complete_without_the_hub(tmp_path: Path) -> None:
    hub = MemoryHub()
    fetch, events, _ = fetcher(tmp_path, hub)
    snap = Snapshot("org/x", None, ("*.json", "*.safetensors"), tmp_path / "org" / "x")
    assert await fetch.ensure(snap) == snap.folder
    assert sorted(p.name for p in snap.folder.iterdir() if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not (snap.folder / "onnx").exists() and hub.calls == ["listing", "download"]
    assert events.types()[0] == "download.started" and events.types()[-1] == "download.done"
    started, done = events.of("download.started")[0], events.of("download.done")[0]
    assert started["file"] == "org/x" and started["total"] == 1012 and started["files"] == 3
    assert done["bytes"] == 1012 and done["commit"] == "c" * 40 and done["url"] == "https://hub.test/org/x"
    assert await fetch.ensure(snap) == snap.folder
    assert hub.calls == ["listing", "download"]  # complete: no hub at all
    assert events.of("download.present")[0]["bytes"] == 1012


async def test_network_trouble_is_retried_with_backoff_and_events(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.failures = [ConnectionError("refused"), TimeoutError("slow")]
    fetch, events, sleep = fetcher(tmp_path, hub, backoff_min=1, backoff_max=30)
    snap = Snapshot("org/x", None, None, tmp_path / "org" / "x")
    await fetch.ensure(snap)
    assert sleep.delays == [1, 2] and [e["attempt"] for e in events.of("download.retry")] == [1, 2]
    assert "ConnectionError" in events.of("download.retry")[0]["error"]
    assert events.types()[-1] == "download.done"


async def test_an_unreachable_hub_falls_back_at_once_to_a_complete_copy_in_its_clients_cache(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.cache = tmp_path / "hf" / "snapshots" / "c0ffee"
    (hub.cache / "sub").mkdir(parents=True)
    (hub.cache / "config.json").write_bytes(b"{}")
    (hub.cache / "sub" / "model.safetensors").write_bytes(b"w" * 100)
    hub.failures = [ConnectionError("refused")] * 5
    fetch, events, sleep = fetcher(tmp_path, hub)
    snap = Snapshot("org/x", None, None, tmp_path / "org" / "x")
    assert await fetch.ensure(snap) == hub.cache
    assert sleep.delays == [] and hub.calls == ["listing", "cached"]  # no retry, no download
    present = events.of("download.present")[0]
    assert (present["path"], present["bytes"], present["files"]) == (str(hub.cache), 102, 2)
    assert present["source"] == "huggingface_hub cache" and not (tmp_path / "org" / "x").exists()


async def test_a_refusal_does_not_fall_back_to_the_cache(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.cache = tmp_path / "cached"
    hub.cache.mkdir()
    (hub.cache / "config.json").write_bytes(b"{}")
    hub.failures = [ValueError("Repo id must be in the form 'repo_name'")]
    fetch, _, _ = fetcher(tmp_path, hub)
    with pytest.raises(DownloadError):
        await fetch.ensure(Snapshot("org/x", None, None, tmp_path / "org" / "x"))
    assert "cached" not in hub.calls


async def test_gives_up_after_attempts_that_complete_nothing(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.failures = [ConnectionError("refused")] * 5
    fetch, events, sleep = fetcher(tmp_path, hub, attempts=3)
    with pytest.raises(DownloadError) as info:
        await fetch.ensure(Snapshot("org/x", None, None, tmp_path / "org" / "x"))
    assert (
        "Could not fetch Hugging Face repo 'org/x' from https://hub.test/org/x after 3 attempts" in info.value.message
    )
    assert not info.value.retryable and len(sleep.delays) == 2
    assert events.of("download.failed")[0]["error"] == info.value.message


async def test_a_refusal_is_not_retried(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.failures = [DownloadError("Hugging Face repo 'org/x' is gated", file="org/x")]
    fetch, events, sleep = fetcher(tmp_path, hub)
    with pytest.raises(DownloadError, match="is gated"):
        await fetch.ensure(Snapshot("org/x", None, None, tmp_path / "org" / "x"))
    assert sleep.delays == [] and hub.calls == ["listing"] and events.types()[-1] == "download.failed"


async def test_a_download_that_misses_files_is_not_recorded_and_is_tried_again(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.leave_out = {"tokenizer.json"}
    fetch, _, sleep = fetcher(tmp_path, hub, attempts=2)
    snap = Snapshot("org/x", None, None, tmp_path / "org" / "x")
    with pytest.raises(DownloadError, match=r"1 files are missing after the download \(tokenizer.json\)"):
        await fetch.ensure(snap)
    # The first attempt completed files (not a stall), the second did not: two retries, then it gives up.
    assert hub.calls.count("download") == 3 and len(sleep.delays) == 2
    assert recorded_files(snap) is None
    hub.leave_out = set()
    await fetch.ensure(snap)
    assert recorded_files(snap) is not None


# ----------------------------------------------------------------------------- what the engine gets


def make_pool_for(tmp_path: Path, toml: str, hub: MemoryHub, **settings: Any) -> tuple[EnginePool, FakeSpawner]:
    """A pool whose preparer downloads with the real Downloader and HubFetcher (the hub in memory)."""
    spawner = FakeSpawner()
    model_dir = tmp_path / "models"
    pool = make_pool(
        tmp_path,
        toml,
        spawner=spawner,
        downloader=lambda: Downloader(model_dir),
        hub=lambda: HubFetcher(model_dir, hub=hub, sleep=FakeSleep()),
        **settings,
    )
    return pool, spawner


REPO_MODEL = '[[models]]\nid = "chat"\nkind = "plain"\nrepo = "org/chat"\n'


async def test_the_engine_loads_a_prefetched_repo_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = MemoryHub()
    sup, spawner = make_pool_for(tmp_path, REPO_MODEL, hub)
    endpoint = await sup.ensure_ready("chat")
    argv = spawner.argvs[0]
    folder = tmp_path / "models" / "org" / "chat"
    assert argv[argv.index("--model-id") + 1] == str(folder.resolve()) and (folder / "config.json").exists()
    assert "chat" in endpoint.engine_ids  # clients keep the configured id
    assert "--token-source" not in argv and "HF_TOKEN" not in spawner.envs[0]  # no token: nothing passed
    await sup.aclose()


async def test_the_token_goes_to_the_environment_of_an_engine_that_downloads_only(tmp_path: Path) -> None:
    sup, spawner = make_pool_for(tmp_path, REPO_MODEL + "prefetch = false\n", MemoryHub(), hf_token="hf_secret_123")
    await sup.ensure_ready("chat")
    argv = spawner.argvs[0]
    assert argv[argv.index("--token-source") + 1] == "env:HF_TOKEN"
    assert spawner.envs[0]["HF_TOKEN"] == "hf_secret_123" and "hf_secret_123" not in " ".join(argv)
    await sup.aclose()
    # A prefetched repo loads from its folder: the gateway used the token, the engine gets none.
    sup, spawner = make_pool_for(tmp_path / "1", REPO_MODEL, MemoryHub(), hf_token="hf_secret_123")
    await sup.ensure_ready("chat")
    assert "--token-source" not in spawner.argvs[0] and "HF_TOKEN" not in spawner.envs[0]
    await sup.aclose()
    # The models file's own token_source wins.
    own = REPO_MODEL + 'prefetch = false\n[engine]\ntoken_source = "cache"\n'
    sup, spawner = make_pool_for(tmp_path / "2", own, MemoryHub(), hf_token="hf_secret_123")
    await sup.ensure_ready("chat")
    argv = spawner.argvs[0]
    assert argv[argv.index("--token-source") + 1] == "cache" and argv.count("--token-source") == 1
    await sup.aclose()


async def test_hf_token_in_the_environment_counts_as_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    sup, spawner = make_pool_for(tmp_path, REPO_MODEL + "prefetch = false\n", MemoryHub())
    await sup.ensure_ready("chat")
    argv = spawner.argvs[0]
    assert argv[argv.index("--token-source") + 1] == "env:HF_TOKEN" and spawner.envs[0]["HF_TOKEN"] == "hf_from_env"
    await sup.aclose()


async def test_prefetch_false_leaves_the_repo_to_the_engine(tmp_path: Path) -> None:
    hub = MemoryHub()
    sup, spawner = make_pool_for(tmp_path, REPO_MODEL + "prefetch = false\n", hub)
    await sup.ensure_ready("chat")
    argv = spawner.argvs[0]
    assert argv[argv.index("--model-id") + 1] == "org/chat" and hub.calls == []
    await sup.aclose()


async def test_a_hub_refusal_fails_the_start_naming_the_model(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.failures = [DownloadError("Hugging Face repo 'org/chat' was not found on the hub", file="org/chat")]
    sup, spawner = make_pool_for(tmp_path, REPO_MODEL, hub)
    with pytest.raises(EngineStartFailed, match="Model 'chat' could not be downloaded: Hugging Face repo 'org/chat'"):
        await sup.ensure_ready("chat")
    assert spawner.argvs == []
    await sup.aclose()


async def test_no_file_is_written_outside_the_repos_folder(tmp_path: Path) -> None:
    hub = EscapingHub()
    fetch, events, _ = fetcher(tmp_path / "models", hub)
    snap = Snapshot("org/x", None, None, tmp_path / "models" / "org" / "x")
    with pytest.raises(DownloadError, match=re.escape("'../../escaped.txt' that would be written outside")):
        await fetch.ensure(snap)
    assert hub.calls == ["listing"] and events.types()[-1] == "download.failed"
    # A repo folder that is a link out of the model dir is refused before the hub is asked.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "models" / "org").mkdir(parents=True, exist_ok=True)
    (tmp_path / "models" / "org" / "y").symlink_to(elsewhere, target_is_directory=True)
    plain = MemoryHub()
    fetch, _, _ = fetcher(tmp_path / "models", plain)
    with pytest.raises(DownloadError, match="outside the model dir"):
        await fetch.ensure(Snapshot("org/y", None, None, tmp_path / "models" / "org" / "y"))
    assert plain.calls == [] and list(elsewhere.iterdir()) == []
    assert not list(tmp_path.glob("**/escaped.txt"))
