"""The environment an engine process starts with: an allowlist of the gateway's own, never its secrets.

An engine, and whatever it starts (MCP servers, a tokenizer's helper), can read its own environment and print it;
before this allowlist it inherited the gateway's whole environment, and with it the admin key, the API keys, the
Redis URL with its password and the Hugging Face token. So an engine gets only what a program needs to run and what
mistral.rs reads:

- the system: ``PATH``, ``HOME``, the user's name, the locale (``LANG``, ``LC_*``), the time zone, the temp dir
  (``TMPDIR``), the shared-library path, the certificate bundle and the proxies for the engine's own downloads;
- the GPU runtimes: ``CUDA_*``, ``NVIDIA_*``, ``NCCL_*``, ``CUBLAS*``, ``HIP_*``, ``ROCR_*``, ``ROCM_*``, ``HSA_*``;
- the caches and the hub's own settings: ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``,
  ``XDG_CACHE_HOME`` ...;
- logging and threads: ``RUST_LOG``, ``RUST_BACKTRACE``, ``RAYON_NUM_THREADS``, ``OMP_NUM_THREADS``;
- the engine's own tuning variables, ``MISTRALRS_*`` and ``CANDLE_*``, and ``PYTHON*`` for the bundled engine, which
  is a Python program;
- the variable the models file's ``[engine] token_source = "env:VAR"`` names, and the Hugging Face token as
  ``HF_TOKEN``, but only for an engine that downloads a model itself (a Hugging Face repo with ``prefetch = false``):
  a local or prefetched model needs no token, so its engine never sees one;
- what ``GATEWAY_ENGINE_ENV`` sets, explicitly, over all of the above.

A ``GATEWAY_*`` variable never gets through: none is on the list, and the settings refuse one in
``GATEWAY_ENGINE_ENV``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..catalog import Catalog

_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TEMP",
        "TMP",
        "LD_LIBRARY_PATH",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_HUB_DISABLE_TELEMETRY",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "XDG_CONFIG_HOME",
        "XDG_RUNTIME_DIR",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "RAYON_NUM_THREADS",
        "OMP_NUM_THREADS",
        "GPU_DEVICE_ORDINAL",
    }
)
_PREFIXES = (
    "LC_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "CUBLAS",
    "HIP_",
    "ROCR_",
    "ROCM_",
    "HSA_",
    "MISTRALRS_",
    "CANDLE_",
    "PYTHON",
)
TOKEN_VARIABLE = "HF_TOKEN"


def allowed(name: str) -> bool:
    """Whether the variable ``name`` of the gateway's environment is passed on to engines."""
    return name in _NAMES or name.startswith(_PREFIXES)


def engine_downloads(catalog: Catalog) -> bool:
    """Whether the engine of ``catalog`` (as it is started: prefetched repos are local by then) fetches a model
    from the hub itself, and so may need a token."""
    return any(not model.source.local for model in catalog.models)


def engine_environment(
    environ: Mapping[str, str],
    catalog: Catalog,
    *,
    hf_token: str | None,
    explicit: Mapping[str, str],
) -> dict[str, str]:
    """The environment an engine serving ``catalog`` starts with (pure): the allowed part of ``environ``, the token
    where the engine downloads (``hf_token``, else ``HF_TOKEN`` of ``environ``), then ``explicit``
    (GATEWAY_ENGINE_ENV)."""
    env = {name: value for name, value in environ.items() if allowed(name)}
    if engine_downloads(catalog):
        token = hf_token or environ.get(TOKEN_VARIABLE)
        if token:
            env[TOKEN_VARIABLE] = token
        source = catalog.engine.token_source or ""
        named = source.removeprefix("env:") if source.startswith("env:") else None
        if named and named not in env and named in environ and not named.startswith("GATEWAY_"):
            env[named] = environ[named]  # the token put there above (from GATEWAY_HF_TOKEN) stays
    env.update(explicit)
    return env
