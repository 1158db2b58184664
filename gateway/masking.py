"""Masking the gateway's secrets in everything it writes and serves.

The secrets are known once, at start: the API keys, the admin key, the Hugging Face token (GATEWAY_HF_TOKEN,
HF_TOKEN, or the models file's ``token_source``), and the password in GATEWAY_CACHE_URL. Text that could carry one
leaves the gateway at a few places, and each is given the same :class:`Masker`:

- every log line, through :class:`MaskingFilter` on the log handlers (the CLI's root handler and uvicorn's), which
  also covers the engines' output the gateway relays into its log;
- each line of an engine's output as it is read (gateway/engine/process.py): its tail goes into error messages, the
  engine's ``last_error`` in /status and the ``engine.*`` events;
- the console's engine log (gateway/console/engine_logs.py: /logs/stream and its history);
- every event (gateway/events.py: /events, /status's summary, the events' log lines).

A gateway with no secret configured builds no masker, and nothing is masked: no cost per request or per line.

Limits: only a secret's exact text is masked (and for the Redis password, its percent-decoded form too), not an
engine's rewriting of it (base64, split over two lines, cut by a terminal). A secret shorter than
:data:`MIN_LENGTH` is not masked, since masking a short key would mask ordinary words in every line: the gateway warns
about it at start. huggingface_hub's saved login (``huggingface-cli login``) is not read: its token is unknown here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from .catalog import Catalog
from .settings import Settings

MASK = "***"
MIN_LENGTH = 8
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def gateway_secrets(
    settings: Settings, *, api_keys: Iterable[str], environ: Mapping[str, str], catalog: Catalog | None = None
) -> dict[str, set[str]]:
    """Each secret the gateway knows, by where it was set (for the warning about short ones)."""
    found: dict[str, set[str]] = {}

    def add(where: str, value: str | None) -> None:
        if value:
            found.setdefault(where, set()).add(value)

    for key in api_keys:
        add("GATEWAY_API_KEYS", key)
    add("GATEWAY_ADMIN_KEY", settings.admin_key)
    if settings.hf_token is not None:
        add("GATEWAY_HF_TOKEN", settings.hf_token.get_secret_value())
    for name in TOKEN_VARIABLES:
        add(name, environ.get(name))
        add(f"GATEWAY_ENGINE_ENV's {name}", settings.engine_env.get(name))
    if settings.cache_url:
        password = urlsplit(settings.cache_url).password
        if password:
            add("the password of GATEWAY_CACHE_URL", password)
            add("the password of GATEWAY_CACHE_URL", unquote(password))
    source = catalog.engine.token_source if catalog is not None else None
    if source is not None and source.startswith("literal:"):
        add("token_source of the models file", source.removeprefix("literal:"))
    elif source is not None and source.startswith("env:"):
        add(f"the variable token_source names ({source})", environ.get(source.removeprefix("env:")))
    return found


class Masker:
    """Replaces each secret in a text by ``***``: the longest first, so that a secret holding another goes whole."""

    def __init__(self, secrets: Iterable[str], *, min_length: int = MIN_LENGTH) -> None:
        unique = {secret for secret in secrets if secret}
        self._secrets = tuple(sorted((s for s in unique if len(s) >= min_length), key=len, reverse=True))
        self.too_short = frozenset(s for s in unique if len(s) < min_length)

    def __bool__(self) -> bool:
        """Whether there is anything to mask."""
        return bool(self._secrets)

    def text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:  # the usual case, no secret in the text, costs one scan in C per secret
                text = text.replace(secret, MASK)
        return text

    def value(self, value: Any) -> Any:
        """``value`` with its strings masked, inside lists, tuples and mappings too (an event's details)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.value(key): self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        return value


def build_masker(secrets: Mapping[str, set[str]], logger: logging.Logger) -> Masker | None:
    """The masker of ``secrets`` (None when there are none to mask), after a warning for each too short to mask."""
    masker = Masker(secret for values in secrets.values() for secret in values)
    for where, values in secrets.items():
        if values & masker.too_short:
            logger.warning(
                "%s holds a secret shorter than %d characters: it is not masked in logs and events, and it is easy "
                "to guess. Use a longer one.",
                where,
                MIN_LENGTH,
            )
    return masker if masker else None


class MaskingFilter(logging.Filter):
    """Masks the secrets of every record that passes a handler: its message, its traceback and its stack."""

    def __init__(self, masker: Masker) -> None:
        super().__init__()
        self._masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self._masker.text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._masker.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self._masker.text(record.stack_info)
        return True


def mask_handlers(masker: Masker, loggers: Iterable[logging.Logger]) -> None:
    """Put one :class:`MaskingFilter` on every handler of ``loggers`` (once, however often it is called)."""
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, MaskingFilter) for f in handler.filters):
                handler.addFilter(MaskingFilter(masker))
