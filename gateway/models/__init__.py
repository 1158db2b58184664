"""Model files: downloading ``url`` models into the model dir (see :mod:`gateway.models.download`)."""

from __future__ import annotations

from .download import Downloader, DownloadError, ProgressView, is_retryable, render_progress

__all__ = ["DownloadError", "Downloader", "ProgressView", "is_retryable", "render_progress"]
