"""Model files: downloading ``url`` models into the model dir (see :mod:`gateway.models.download`)."""

from __future__ import annotations

from .download import Downloader
from .errors import DownloadError
from .retry import is_retryable

__all__ = ["DownloadError", "Downloader", "is_retryable"]
