"""Model files: downloading ``url`` models into the model dir (see :mod:`gateway.models.download`)."""

from __future__ import annotations

from .download import Downloader, is_retryable
from .errors import DownloadError

__all__ = ["DownloadError", "Downloader", "is_retryable"]
