"""Gateway settings: environment variables prefixed ``GATEWAY_``, or a ``.env`` file.

Built once at start-up (by the CLI, or by a test with ``Settings(_env_file=None, ...)``) and passed
down; nothing reads the environment after that.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EngineChoice = Literal["auto", "bundled", "mistralrs", "mistralrs-server"]


class Settings(BaseSettings):
    """Every knob of the gateway. ``.env.example`` documents each one for operators."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the gateway listens on.")
    public_url: str | None = Field(
        None,
        description="The gateway's address as clients reach it (https://llm.example.com), for the URLs it hands "
        "out. Default: the address the client connected to, or what a trusted proxy forwards.",
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1,::1",
        description="Proxies (IP addresses or networks, comma-separated; * for any) whose X-Forwarded-For, "
        "X-Forwarded-Proto and X-Forwarded-Host are believed.",
    )
    allowed_hosts: str = Field(
        "",
        description="Host names the gateway answers to besides the ones a local user types (localhost, *.localhost, "
        "this machine's name, IP addresses) and GATEWAY_PUBLIC_URL's: comma-separated, *.example.com patterns, * for "
        "any. Other names are refused (DNS rebinding).",
    )
    cors_origins: str = Field(
        "",
        description="Origins of browser applications that may call the gateway (comma-separated, "
        "https://*.example.com patterns; * for any, without credentials). Pages of other origins may not send "
        "anything but GET.",
    )
    header_timeout: float = Field(
        10, gt=0, description="Seconds a client gets to send a request's line and headers; then it is disconnected."
    )
    max_connections: int = Field(
        1000, ge=0, description="Open client connections; more are refused with a 503. 0 = no limit."
    )
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="This gateway's name among the nodes behind a router: the x-gateway-node header of every "
        "response, and what /server_info and /get_load say. Default: the host name.",
    )
    peers: str = Field(
        "",
        description="The other nodes behind the same router (base URLs, comma-separated; this node's own may be in "
        "the list). A request for a model whose engine is stopped here is answered 503 model_warm_elsewhere, once, "
        "when one of them has it warm and is not busy with it, so that the router retries it there rather than wait "
        "for a cold start. Empty: every request is served here.",
    )
    peer_interval: float = Field(1, gt=0, description="Seconds between two readings of each peer's /get_load.")
    peer_busy: int = Field(
        4,
        ge=1,
        description="Requests for a model (running and waiting) that make a peer busy with it: a node then starts "
        "its own engine rather than send the peer more.",
    )
    shutdown_notice: float = Field(
        0,
        ge=0,
        description="On SIGTERM, seconds during which /health and /readyz answer 503 while the gateway still serves "
        "everything, so that routers polling them send elsewhere before it stops listening.",
    )

    engine: EngineChoice = Field(
        "auto",
        description="Which engine to run: auto picks GATEWAY_ENGINE_BINARY, then `mistralrs` on PATH, "
        "then `mistralrs-server` on PATH, then the bundled engine server.",
    )
    engine_binary: str | None = Field(
        None, description="Path or name of the `mistralrs-server` or `mistralrs` program."
    )
    engine_port: int = Field(0, ge=0, le=65535, description="Engine port on 127.0.0.1; 0 picks a free one.")
    engine_url: str | None = Field(
        None, description="Use the engine already running at this URL: never spawn it, never stop it."
    )
    engine_args: str = Field("", description="Extra arguments put before the engine's subcommand (shell-quoted).")
    engine_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for the engine processes (JSON object), set over the few variables they get "
        "from the gateway's own environment (gateway/engine/environment.py).",
    )

    models_file: Path | None = Field(
        None, description="The models file (TOML). Default: models.toml in the working directory."
    )
    model_dir: Path = Field(Path("~/.mistral-rs"), description="Where model files are kept.")
    default_model: str | None = Field(None, description="Overrides default_model of the models file.")
    hf_token: SecretStr | None = Field(
        None,
        description="Hugging Face token for gated and private repos, used by the gateway and handed to the engine "
        "as HF_TOKEN. Default: HF_TOKEN, or huggingface_hub's saved login.",
    )

    idle_timeout: float = Field(300, ge=0, description="Stop the engine after this many idle seconds; 0 = never.")
    startup_timeout: float = Field(600, gt=0, description="Seconds the engine may take to become ready.")
    stop_timeout: float = Field(10, ge=0, description="Seconds between SIGTERM and SIGKILL when stopping it.")
    stall_timeout: float = Field(
        300,
        gt=0,
        description="A stream whose engine sends no byte, no complete head or no complete event for this long ends"
        " with an error.",
    )
    request_timeout: float = Field(
        1800, gt=0, description="The whole time an answer from the engine may take, streamed or not."
    )
    loading_interval: float = Field(
        5, gt=0, description="Seconds between `: loading` comments sent to streams waiting for a cold engine."
    )
    shutdown_timeout: float = Field(
        30, ge=0, description="On SIGTERM, seconds in-flight requests get to finish before everything stops."
    )
    max_queue: int = Field(
        1024, ge=1, description="Requests that may wait for a starting engine; beyond that, 429 with Retry-After."
    )
    max_body_mb: float = Field(64, gt=0, description="Largest request body accepted, in MiB.")
    image_ttl: float = Field(3600, gt=0, description="Seconds an image served by URL stays available.")
    backoff_max: float = Field(60, gt=0, description="Longest wait between two failed engine starts.")
    health_timeout: float = Field(
        10,
        gt=0,
        description="After a request to an engine failed, seconds its health check may take before the engine counts "
        "as not answering and is restarted.",
    )
    memory_budget_mb: float = Field(
        0, ge=0, description="Memory the engines may take together, in MB; idle ones stop to make room. 0 = no limit."
    )
    engine_growth_mb: float = Field(
        2048,
        ge=0,
        description="Memory an engine may gain over what it took once loaded (mostly the prefix cache that makes an "
        "agent's next turn fast, which mistral.rs never shrinks on a CPU), in MB; beyond it, the engine is restarted "
        "once idle. 0 = no limit.",
    )

    embedding_cache_mb: float = Field(
        256, ge=0, description="Memory for cached embedding vectors, in MiB; 0 turns the cache off."
    )
    embedding_cache_ttl: float = Field(0, ge=0, description="Seconds a cached embedding is kept; 0 = no limit.")
    cache_url: str | None = Field(
        None, description="A Redis URL (redis://host:6379/0) for an embedding cache shared by gateway replicas."
    )

    api_keys: str | None = Field(
        None, description="API keys for /v1/* and /api/*: comma-separated, or the path of a file with one per line."
    )
    admin_key: str | None = Field(None, description="Key for /status, /events, /admin/* and /logs/* (Bearer).")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="Request log lines as text or JSON.")
    run_dir: Path | None = Field(
        None, description="Scratch folder for engine configs and generated images. Default: a temp dir."
    )

    @field_validator("model_dir", mode="after")
    @classmethod
    def _expand_model_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator(
        "engine_url",
        "public_url",
        "engine_binary",
        "models_file",
        "default_model",
        "hf_token",
        "run_dir",
        "cache_url",
        "api_keys",
        "admin_key",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        # An empty line in .env (GATEWAY_ENGINE_URL=) means "not set", as it reads.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("engine_url", mode="after")
    @classmethod
    def _plain_http(cls, value: str | None) -> str | None:
        # The engine speaks plain HTTP on this machine or a private network, and so does the gateway's client to
        # it (gateway/upstream.py): anything else would only fail at the first request.
        if value is not None:
            parts = urlsplit(value.strip())
            if parts.scheme != "http" or not parts.hostname or parts.path.strip("/") or parts.query:
                raise ValueError(
                    f"must be the engine's plain http:// address, such as http://127.0.0.1:1234 (got {value!r})"
                )
            return value.strip().rstrip("/")
        return value

    @field_validator("engine_env", mode="after")
    @classmethod
    def _no_gateway_variables(cls, value: dict[str, str]) -> dict[str, str]:
        # The gateway's own settings (its keys among them) never reach an engine, not even when asked for.
        refused = sorted(name for name in value if name.upper().startswith("GATEWAY_"))
        if refused:
            raise ValueError(f"engines never get GATEWAY_* variables; remove {', '.join(refused)}")
        return value

    @field_validator("public_url", mode="after")
    @classmethod
    def _public_base_url(cls, value: str | None) -> str | None:
        # Checked here because every image URL is built on it: a typo would only show as broken links.
        if value is None:
            return value
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        printable = all(c.isprintable() and not c.isspace() for c in value)
        extras = parts.query or parts.fragment or parts.username is not None
        # .port raises ValueError (reported as this setting's error) for a port beyond 65535.
        if not printable or extras or parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:
            raise ValueError(f"must be an http:// or https:// base URL such as https://llm.example.com (got {value!r})")
        return value

    @field_validator("node_name", mode="before")
    @classmethod
    def _blank_is_the_host_name(cls, value: object) -> object:
        return socket.gethostname() if isinstance(value, str) and not value.strip() else value

    @field_validator("node_name", mode="after")
    @classmethod
    def _header_value(cls, value: str) -> str:
        # Sent in a header of every response: printable ASCII without spaces, as a host name is.
        value = value.strip()
        if not re.fullmatch(r"[!-~]{1,253}", value):
            raise ValueError(
                f"must be 1 to 253 printable ASCII characters without spaces, as a host name (got {value!r})"
            )
        return value

    @field_validator("forwarded_allow_ips", mode="after")
    @classmethod
    def _addresses_or_networks(cls, value: str) -> str:
        # uvicorn takes a malformed entry for a literal that never matches: say so at start-up instead.
        items = [item.strip() for item in value.split(",") if item.strip()]
        for item in items:
            try:
                if "/" in item:
                    ipaddress.ip_network(item)
                elif item != "*":
                    ipaddress.ip_address(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address, a network such as 10.0.0.0/8, or *") from None
        return ",".join(items)

    def resolved_models_file(self) -> Path | None:
        """The models file to read: the configured one, or ``models.toml`` here when present."""
        if self.models_file is not None:
            return self.models_file.expanduser()
        default = Path("models.toml")
        return default if default.is_file() else None
