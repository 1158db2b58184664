"""What the other nodes of a fleet have warm: how a node whose engine for a model is stopped knows that a request
is better answered elsewhere than after a cold start here.

A router in front of the nodes picks one before it knows what that node has warm (vllm-router round-robins, LiteLLM
shuffles). A cold start costs seconds to minutes and the memory of a second copy of the model, while a peer that
has the model's engine up answers at once. So each node reads its peers' ``GET /get_load`` (open, like the health
probes: gateway/http/node.py) every ``GATEWAY_PEER_INTERVAL`` seconds, and a request for a model whose engine is
stopped here is answered ``503 model_warm_elsewhere`` when a peer has it warm, is serving (not draining), and is
not busy with it. Routers retry a 503 on another node; clients without one (the SDKs) retry the same node.

Three rules keep a bounce from costing more than it saves:

- **Once per request.** A request this node sent elsewhere is served here if it comes back (same model, same body,
  within ``REMEMBER`` seconds): a router whose retry picks the same node again (vllm-router's ``cache_aware``), an SDK
  retrying the node it knows, or a reading that went stale, all end in a cold start rather than a failure.
- **Never to a busy peer.** A peer holding ``GATEWAY_PEER_BUSY`` requests for the model (running and waiting, as its
  last reading said, plus the ones sent its way since) gets no more: under load every node warms up, and the fleet
  spreads the model's requests as it did before.
- **Only on fresh news.** A reading older than ``STALE_READINGS`` intervals (a peer down, a network cut) counts for
  nothing, nor does a peer that failed its last reading.

A node finds itself in the list by its own name (``GATEWAY_NODE_NAME``), so every node can be given the same list.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

if TYPE_CHECKING:  # httpx (and the rich it pulls in) is loaded only by a node that has peers
    import httpx

Clock = Callable[[], float]
STALE_READINGS = 3  # intervals after which a peer's reading counts for nothing
REMEMBER = 60.0  # seconds a request sent elsewhere is remembered, to be served here if it comes back
_REMEMBERED = 4096  # requests remembered at most (their 16-byte digests)


@dataclass(frozen=True)
class Reading:
    """One peer's ``/get_load``, as this node uses it."""

    name: str
    serving: bool
    warm: Mapping[str, int]  # model id -> its requests there (running + waiting), for the models it has warm
    at: float  # when it was read (the clock's time)


@dataclass(frozen=True)
class Elsewhere:
    """Where a request is better answered: a peer's name and its load for the model when last read."""

    node: str
    load: int


def request_key(model: str, *parts: bytes) -> bytes:
    """A request's identity, to know it again when a router or client sends it back: its model and its body."""
    digest = hashlib.blake2b(model.encode(), digest_size=16)
    for part in parts:
        digest.update(b"\0")
        digest.update(part)
    return digest.digest()


def parse(document: Any, at: float) -> Reading:
    """A reading from a peer's ``/get_load`` answer; :class:`ValueError` for anything else."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ValueError("not a gateway's /get_load: no 'models' object")
    warm: dict[str, int] = {}
    for model, load in document["models"].items():
        if not isinstance(load, dict):
            raise ValueError(f"not a gateway's /get_load: models.{model} is not an object")
        if load.get("state") == "ready":
            running, waiting = load.get("running", 0), load.get("waiting", 0)
            if not isinstance(running, int) or not isinstance(waiting, int):
                raise ValueError(f"not a gateway's /get_load: models.{model} has no request counts")
            warm[str(model)] = running + waiting
    return Reading(str(document.get("node") or ""), document.get("serving") is not False, warm, at)


class Peers:
    """The last reading of every peer, and the decision to send a request to one of them."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        own_name: str,
        busy: int,
        interval: float,
        clock: Clock,
        logger: logging.Logger | None = None,
    ) -> None:
        self.urls = [url.strip().rstrip("/") for url in urls if url.strip()]
        self._own_name = own_name
        self._busy = busy
        self._interval = interval
        self._clock = clock
        self._log = logger or logging.getLogger("gateway.fleet")
        self._readings: dict[str, Reading] = {}
        self._sent: dict[tuple[str, str], int] = {}  # (peer url, model) -> requests sent there since its reading
        self._problems: dict[str, str] = {}  # peer url -> why its last reading failed (logged once per change)
        self._bounced: TTLCache[bytes, str] = TTLCache(_REMEMBERED, REMEMBER, timer=clock)
        self.sent_elsewhere: dict[str, int] = {}  # model -> requests sent to a peer, since start

    # ------------------------------------------------------------------------------------------ readings

    def note(self, url: str, reading: Reading) -> None:
        """A peer's new reading; the requests counted as sent its way since the last one are in it now."""
        if reading.name == self._own_name:
            if url in self.urls:
                self.urls.remove(url)  # this node itself: not read again
                self._log.info("peer %s is this node (%s): not asked again", url, reading.name)
            return
        self._readings[url] = reading
        for key in [key for key in self._sent if key[0] == url]:
            del self._sent[key]
        if self._problems.pop(url, None) is not None:
            self._log.info("peer %s (%s) answers again", url, reading.name)

    def failed(self, url: str, why: str) -> None:
        """A reading that failed: the peer's last one counts for nothing."""
        self._readings.pop(url, None)
        if self._problems.get(url) != why:
            self._log.warning("peer %s: cannot read its /get_load (%s)", url, why)
        self._problems[url] = why

    # ------------------------------------------------------------------------------------------ the decision

    def elsewhere(self, model: str, key: bytes) -> Elsewhere | None:
        """Where to send a request for ``model`` (whose engine is stopped here), or None to serve it here. A request
        sent elsewhere is remembered by ``key``: if it comes back, it is served here."""
        if self._bounced.pop(key, None) is not None:
            return None  # sent elsewhere once already, and back: served here
        now, best, best_url = self._clock(), None, ""
        for url, reading in self._readings.items():
            if not reading.serving or now - reading.at > STALE_READINGS * self._interval or model not in reading.warm:
                continue
            load = reading.warm[model] + self._sent.get((url, model), 0)
            if load < self._busy and (best is None or load < best.load):
                best, best_url = Elsewhere(reading.name, load), url
        if best is not None:
            self._sent[(best_url, model)] = self._sent.get((best_url, model), 0) + 1
            self._bounced[key] = best.node
            self.sent_elsewhere[model] = self.sent_elsewhere.get(model, 0) + 1
        return best

    def status(self) -> dict[str, Any]:
        """What the operator's /status shows: every peer's last reading, or why there is none."""
        now = self._clock()
        peers: dict[str, Any] = {}
        for url in self.urls:
            reading = self._readings.get(url)
            if reading is None:
                peers[url] = {"node": None, "error": self._problems.get(url, "not read yet")}
                continue
            peers[url] = {
                "node": reading.name,
                "serving": reading.serving,
                "age_s": round(now - reading.at, 3),
                "warm": dict(reading.warm),
            }
        return {
            "busy": self._busy,
            "interval_s": self._interval,
            "peers": peers,
            "sent_elsewhere": dict(self.sent_elsewhere),
        }

    # ------------------------------------------------------------------------------------------ the reader

    async def run(self, client: httpx.AsyncClient) -> None:
        """Read every peer every interval, until cancelled."""
        while True:
            await asyncio.gather(*(self._read(client, url) for url in list(self.urls)))
            await asyncio.sleep(self._interval)

    async def _read(self, client: httpx.AsyncClient, url: str) -> None:
        import httpx

        try:
            response = await client.get(url + "/get_load", timeout=self._interval)
            if response.status_code != 200:
                self.failed(url, f"{response.status_code} {response.text[:200]!r}")
                return
            reading = parse(response.json(), self._clock())
        except (httpx.HTTPError, ValueError) as exc:
            self.failed(url, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        self.note(url, reading)
