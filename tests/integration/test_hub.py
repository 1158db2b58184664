"""Hugging Face prefetch with huggingface_hub for real, against a local stand-in for the hub (tests/fakehub.py):
the fetcher on its own, then whole gateway_processes with the fake engine."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.events import EventBus
from gateway.models.errors import DownloadError
from gateway.models.hub import HfHub, HubFetcher, Snapshot, recorded_files
from tests.fakehub import FakeHub, Request
from tests.helpers import FakeSleep, Gateway, free_port

Start = Callable[..., Gateway]
REPO = "org/tiny-chat"
FILES = {
    "config.json": b'{"architectures": ["Qwen3ForCausalLM"]}',
    "tokenizer.json": b'{"model": {}}',
    "model.safetensors": bytes(range(256)) * 2048,  # 512 KiB
    "onnx/model.onnx": b"o" * 4096,
    "README.md": b"# tiny\n",
}
TOKEN = "hf_test_token_never_logged_8c1f"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub({REPO: FILES}) as running:
        yield running


def repo_requests(hub: FakeHub) -> list[Request]:
    # huggingface_hub also asks the hub for things of its own (e.g. /api/agent-harnesses): only ours count.
    return [r for r in hub.log() if REPO in r.path]


def fetcher(hub: FakeHub, tmp_path: Path, *, token: str | None = None, **kwargs: Any) -> tuple[HubFetcher, EventBus]:
    bus = EventBus()
    real = HfHub(token=token, endpoint=hub.url, cache_dir=tmp_path / "hf-cache")
    return HubFetcher(tmp_path / "models", hub=real, events=bus, **kwargs), bus


def snapshot(tmp_path: Path, patterns: tuple[str, ...] | None = None, revision: str | None = None) -> Snapshot:
    return Snapshot(REPO, revision, patterns, tmp_path / "models" / REPO)


# ------------------------------------------------------------------------------------- the fetcher


async def test_snapshot_fetches_the_selected_files_once(hub: FakeHub, tmp_path: Path) -> None:
    hub.revisions[REPO] = {"v1": hub.commit(REPO)}
    fetch, bus = fetcher(hub, tmp_path)
    snap = snapshot(tmp_path, ("*.json", "*.safetensors"), revision="v1")
    folder = await fetch.ensure(snap)
    assert sorted(hub.file_gets()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all((folder / name).read_bytes() == FILES[name] for name in hub.file_gets())
    assert not (folder / "onnx").exists() and not (folder / "README.md").exists()
    # The revision is asked once; everything after is pinned to the commit it names.
    paths = [r.path for r in repo_requests(hub)]
    assert paths[0] == f"/api/models/{REPO}/revision/v1"
    assert all(hub.commit(REPO) in p for p in paths[1:])
    done = bus.history()[-1]
    assert done.type == "download.done" and done.details["files"] == 3 and done.details["commit"] == hub.commit(REPO)
    assert bus.summary()["downloads"][REPO]["state"] == "done"
    assert recorded_files(snap) == {name: len(FILES[name]) for name in hub.file_gets()}

    before = len(hub.log())
    again, bus2 = fetcher(hub, tmp_path)  # as a restarted gateway would
    assert await again.ensure(snap) == folder
    assert len(hub.log()) == before and bus2.history()[-1].type == "download.present"


async def test_a_whole_repo_without_patterns(hub: FakeHub, tmp_path: Path) -> None:
    fetch, _ = fetcher(hub, tmp_path)
    folder = await fetch.ensure(snapshot(tmp_path))
    assert sorted(hub.file_gets()) == sorted(FILES)
    assert (folder / "onnx" / "model.onnx").read_bytes() == FILES["onnx/model.onnx"]
    assert repo_requests(hub)[0].path == f"/api/models/{REPO}"  # no revision: the hub's default branch


async def test_missing_repo_fails_at_once_naming_it(hub: FakeHub, tmp_path: Path) -> None:
    hub.missing.add(REPO)
    fetch, bus = fetcher(hub, tmp_path, sleep=FakeSleep())
    with pytest.raises(DownloadError) as info:
        await fetch.ensure(snapshot(tmp_path))
    message = info.value.message
    # 401 without a token; this process may have one (HF_TOKEN, a saved login), which makes it a 404.
    assert re.search(rf"Hugging Face repo {REPO!r} was not found on the hub \(it answered 40[14]\)", message)
    assert "GATEWAY_HF_TOKEN" in message and not info.value.retryable
    assert len(repo_requests(hub)) == 1 and bus.history()[-1].type == "download.failed"
    with_token, _ = fetcher(hub, tmp_path, token=TOKEN)
    with pytest.raises(DownloadError, match="was not found on the hub \\(it answered 404\\)"):
        await with_token.ensure(snapshot(tmp_path))


async def test_gated_repo_needs_the_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.gated.add(REPO)
    hub.token = TOKEN
    fetch, _ = fetcher(hub, tmp_path, sleep=FakeSleep())
    with pytest.raises(DownloadError) as info:
        await fetch.ensure(snapshot(tmp_path, ("*.json",)))
    assert (
        f"Hugging Face repo {REPO!r} is gated" in info.value.message
        and "accept its terms" in info.value.message.lower()
    )
    assert recorded_files(snapshot(tmp_path, ("*.json",))) is None
    wrong, _ = fetcher(hub, tmp_path, token="hf_wrong", sleep=FakeSleep())
    with pytest.raises(DownloadError, match="is gated: the hub answered 403"):
        await wrong.ensure(snapshot(tmp_path, ("*.json",)))
    right, _ = fetcher(hub, tmp_path, token=TOKEN)
    await right.ensure(snapshot(tmp_path, ("*.json",)))
    assert repo_requests(hub)[-1].authorization == f"Bearer {TOKEN}"


async def test_unknown_revision_and_unmatched_patterns_are_clear(hub: FakeHub, tmp_path: Path) -> None:
    fetch, _ = fetcher(hub, tmp_path, sleep=FakeSleep())
    with pytest.raises(DownloadError, match=r"has no revision 'v9'\. Fix `revision`"):
        await fetch.ensure(snapshot(tmp_path, revision="v9"))
    with pytest.raises(DownloadError, match=r"no file matches \['\*\.gguf'\].*Fix `files`"):
        await fetch.ensure(snapshot(tmp_path, ("*.gguf",)))
    assert hub.file_gets() == []


async def test_hub_errors_and_an_unreachable_hub_are_retried(hub: FakeHub, tmp_path: Path) -> None:
    hub.status, hub.status_times = 503, 1
    sleep = FakeSleep()
    fetch, bus = fetcher(hub, tmp_path, sleep=sleep)
    await fetch.ensure(snapshot(tmp_path, ("*.json",)))
    assert sleep.delays == [1.0] and [e.type for e in bus.history()].count("download.retry") == 1
    assert "503" in next(e for e in bus.history() if e.type == "download.retry").details["error"]

    # Nothing listens on that port: connection refused.
    nowhere = HfHub(endpoint=f"http://127.0.0.1:{free_port()}", cache_dir=tmp_path / "hf-cache")
    gone = HubFetcher(tmp_path / "models", hub=nowhere, sleep=FakeSleep(), attempts=3)
    with pytest.raises(DownloadError) as info:
        await gone.ensure(snapshot(tmp_path, ("*.safetensors",)))
    assert (
        f"Could not fetch Hugging Face repo {REPO!r}" in info.value.message and "after 3 attempts" in info.value.message
    )


def fill_hf_cache(hub: FakeHub, cache_dir: Path, patterns: list[str] | None = None) -> Path:
    """What a machine that used the repo before holds: huggingface_hub's own cache (no local_dir)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(REPO, allow_patterns=patterns, cache_dir=cache_dir, endpoint=hub.url))


async def test_an_unreachable_hub_loads_a_complete_copy_from_huggingface_hubs_cache(
    hub: FakeHub, tmp_path: Path
) -> None:
    cached = fill_hf_cache(hub, tmp_path / "hf-cache", ["*.json", "*.safetensors"])
    hub.status = 503  # from now on the hub answers nothing useful
    sleep = FakeSleep()
    fetch, bus = fetcher(hub, tmp_path, sleep=sleep)
    folder = await fetch.ensure(snapshot(tmp_path, ("*.json", "*.safetensors")))
    assert folder == cached and (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert sleep.delays == []  # at once, not after the retries
    present = next(e for e in bus.history() if e.type == "download.present").details
    assert present["source"] == "huggingface_hub cache" and present["files"] == 3
    assert not (tmp_path / "models" / REPO).exists()

    # What the cache does not hold completely is not taken from it: the onnx file was never fetched.
    with pytest.raises(DownloadError, match="after 2 attempts"):
        await HubFetcher(
            tmp_path / "models",
            hub=HfHub(endpoint=hub.url, cache_dir=tmp_path / "hf-cache"),
            sleep=FakeSleep(),
            attempts=2,
        ).ensure(snapshot(tmp_path, ("onnx/*",)))


# ------------------------------------------------------------------------------------- the gateway


def models_toml(extra: str = "") -> str:
    return f"""
[[models]]
id = "tiny-chat"
kind = "plain"
repo = "{REPO}"
files = ["*.json", "*.safetensors"]
{extra}
"""


def hub_env(hub: FakeHub, tmp_path: Path, **more: str) -> dict[str, str]:
    # HF_TOKEN="" makes the runner's own token (if any) invisible: these tests decide what is configured.
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", **more}


def chat(gw: Gateway) -> httpx.Response:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(gw.v1 + "/chat/completions", json=body, timeout=60)


def test_a_repo_model_is_fetched_before_the_first_start_and_loaded_from_its_folder(
    gateway_processes: Start, hub: FakeHub, tmp_path: Path
) -> None:
    gw = gateway_processes(models_toml(), env=hub_env(hub, tmp_path))
    folder = Path(gw.env["GATEWAY_MODEL_DIR"]) / REPO
    assert hub.log() == [] and not folder.exists()  # nothing happens before a request needs it
    reply = chat(gw)
    assert reply.status_code == 200 and reply.json()["model"] == "tiny-chat"
    assert sorted(hub.file_gets()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    spawn = gw.spawns()[0]
    argv = spawn["argv"]
    assert argv[argv.index("--model-id") + 1] == str(folder.resolve())
    assert "--token-source" not in argv and spawn["hf_token_set"] is False  # no token: nothing passed
    assert gw.status()["downloads"][REPO]["state"] == "done"

    # Restarts find the snapshot complete: no request reaches the hub, in this gateway or a new one.
    before = len(hub.log())
    assert httpx.post(gw.url + "/admin/engine/stop", timeout=30).status_code == 200
    assert chat(gw).status_code == 200
    again = gateway_processes(models_toml(), env=hub_env(hub, tmp_path, GATEWAY_MODEL_DIR=gw.env["GATEWAY_MODEL_DIR"]))
    assert chat(again).status_code == 200
    assert len(hub.log()) == before and len(gw.spawns()) == 2 and len(again.spawns()) == 1
    assert again.status()["downloads"][REPO]["state"] == "present"


def test_prefetch_false_leaves_the_repo_to_the_engine(gateway_processes: Start, hub: FakeHub, tmp_path: Path) -> None:
    gw = gateway_processes(models_toml("prefetch = false"), env=hub_env(hub, tmp_path))
    assert chat(gw).status_code == 200
    argv = gw.spawns()[0]["argv"]
    assert argv[argv.index("--model-id") + 1] == REPO
    assert hub.log() == [] and not (Path(gw.env["GATEWAY_MODEL_DIR"]) / REPO).exists()


@pytest.mark.parametrize("engine", ["mistralrs-server", "mistralrs"])
def test_the_token_reaches_the_hub_but_no_command_line_or_log(
    gateway_processes: Start, hub: FakeHub, tmp_path: Path, engine: str
) -> None:
    hub.gated.add(REPO)
    hub.token = TOKEN
    env = hub_env(hub, tmp_path, GATEWAY_HF_TOKEN=TOKEN, GATEWAY_LOG_LEVEL="debug")
    gw = gateway_processes(models_toml(), env=env, engine=engine)
    assert chat(gw).status_code == 200
    assert {r.authorization for r in repo_requests(hub)} == {f"Bearer {TOKEN}"}
    spawn = gw.spawns()[0]
    argv = spawn["argv"]
    # The engine loads the prefetched folder: it downloads nothing, so it gets no token (gateway/engine/environment.py).
    assert "--token-source" not in argv and spawn["hf_token_set"] is False
    assert TOKEN not in " ".join(argv) and TOKEN not in gw.log()


@pytest.mark.parametrize("engine", ["mistralrs-server", "mistralrs"])
def test_an_engine_that_fetches_its_repo_gets_the_token_in_its_environment_only(
    gateway_processes: Start, hub: FakeHub, tmp_path: Path, engine: str
) -> None:
    env = hub_env(hub, tmp_path, GATEWAY_HF_TOKEN=TOKEN, GATEWAY_LOG_LEVEL="debug")
    gw = gateway_processes(models_toml("prefetch = false"), env=env, engine=engine)
    assert chat(gw).status_code == 200
    spawn = gw.spawns()[0]
    argv = spawn["argv"]
    assert argv[argv.index("--token-source") + 1] == "env:HF_TOKEN" and spawn["hf_token_set"] is True
    assert TOKEN not in " ".join(argv) and TOKEN not in gw.log()
    assert "--token-source env:HF_TOKEN" in gw.log()  # the logged command line says where the token is


def test_a_missing_or_gated_repo_is_a_clear_503_naming_it(
    gateway_processes: Start, hub: FakeHub, tmp_path: Path
) -> None:
    hub.missing.add(REPO)
    gw = gateway_processes(models_toml(), env=hub_env(hub, tmp_path))
    reply = chat(gw)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_download_failed"
    message = reply.json()["error"]["message"]
    assert (
        f"Model 'tiny-chat' could not be downloaded: Hugging Face repo {REPO!r} was not found on the hub "
        "(it answered 401)" in message
    )
    assert "HTTPS_PROXY" not in message  # not a network trouble: no advice about proxies
    assert gw.spawns() == [] and gw.status()["downloads"][REPO]["state"] == "failed"

    hub.missing.clear()
    hub.gated.add(REPO)
    hub.token = TOKEN
    gated = gateway_processes(models_toml(), env=hub_env(hub, tmp_path))
    reply = chat(gated)
    assert reply.status_code == 503
    message = reply.json()["error"]["message"]
    assert f"Hugging Face repo {REPO!r} is gated" in message and "GATEWAY_HF_TOKEN" in message
    assert gated.spawns() == []


def test_offline_a_gateway_serves_a_repo_model_from_huggingface_hubs_cache(
    gateway_processes: Start, hub: FakeHub, tmp_path: Path
) -> None:
    cached = fill_hf_cache(hub, tmp_path / "hf-home" / "hub", ["*.json", "*.safetensors"])
    before = len(repo_requests(hub))
    gw = gateway_processes(models_toml(), env=hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"))
    reply = chat(gw)
    assert reply.status_code == 200, reply.text
    argv = gw.spawns()[0]["argv"]
    assert argv[argv.index("--model-id") + 1] == str(cached)
    assert len(repo_requests(hub)) == before  # offline means offline
    download = gw.status()["downloads"][REPO]
    assert download["state"] == "present" and download["path"] == str(cached)
    assert "loading the copy in huggingface_hub's cache" in gw.log()


def test_pull_fetches_repo_models_ahead(hub: FakeHub, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    models = tmp_path / "models.toml"
    models.write_text(models_toml())
    env = {
        **os.environ,
        **hub_env(hub, tmp_path),
        "GATEWAY_MODELS_FILE": str(models),
        "GATEWAY_MODEL_DIR": str(tmp_path / "dir"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "pull", "tiny-chat"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dir" / REPO / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert sorted(hub.file_gets()) == ["config.json", "model.safetensors", "tokenizer.json"]
