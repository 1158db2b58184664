"""The one error of the model store, and how to tell a machine without network from a flaky link.

Downloads of files and of Hugging Face repos fail in the same words for the same reasons, so both raise
:class:`DownloadError`; the checks, the retry policy and the engine's preparation read its flags instead of
matching on messages. It lives apart from the downloaders so that the small modules they use (checksums, retry)
can raise and classify it without importing a downloader.
"""

from __future__ import annotations

import socket


class DownloadError(Exception):
    """A model file could not be provided; ``message`` names the file, what was expected and what was found.

    ``retryable`` marks trouble that another attempt may cure (a cut connection, a 503); the downloader
    only lets non-retryable ones, or the last retryable one, escape. ``network``: the network, not the request,
    is the trouble (no route to the server, no name resolution, retries used up), so a user offline, behind a proxy
    or in need of a mirror is told what to do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        url: str | None = None,
        retryable: bool = False,
        network: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.file = file
        self.url = url
        self.retryable = retryable
        self.network = network


def name_not_resolved(exc: BaseException) -> bool:
    """Whether a connection failed because the host name did not resolve (a ``socket.gaierror`` underneath)."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> the OS error
        if seen is None:
            return False
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
