"""Command lines for both engine dialects.

Every flag and config field below was checked against mistral.rs's own argument definitions
(github EricLBuehler/mistral.rs), at these versions:

| what                                  | tags (commits)                          | source                          |
|---------------------------------------|-----------------------------------------|---------------------------------|
| legacy global flags and subcommands   | v0.8.4 (6f753eba), v0.7.0 (b5af2605)    | mistralrs-server/src/main.rs    |
| legacy subcommand flags               | v0.8.4, v0.7.0                          | mistralrs-core model_selected.rs|
| multi-model JSON, required fields     | v0.8.4, v0.7.0                          | main.rs ModelConfigParsed       |
| `mistralrs serve` flag placement      | v0.9.2 (d184053f), v0.8.0, v0.7.0       | mistralrs-cli/src/args/         |
| `mistralrs from-config` TOML schema   | v0.9.2, v0.8.4                          | mistralrs-cli/src/config/mod.rs |
| served ids (pipeline names)           | v0.8.4, v0.9.0, v0.9.1 (1fdb4515)       | mistralrs-core pipeline/gguf.rs |
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from gateway.catalog import Catalog, parse_catalog
from gateway.engine.command import CommandError, build_command
from gateway.engine.discovery import EngineProgram

LEGACY = EngineProgram(("mistralrs-server",), "legacy", "mistralrs-server", (0, 8, 4))
LEGACY_07 = EngineProgram(("mistralrs-server",), "legacy", "mistralrs-server", (0, 7, 0))
SERVE = EngineProgram(("mistralrs",), "serve", "mistralrs", (0, 9, 2))
SERVE_090 = EngineProgram(("mistralrs",), "serve", "mistralrs", (0, 9, 0))


def catalog(text: str, tmp_path: Path) -> Catalog:
    return parse_catalog(text, origin="models.toml", model_dir=tmp_path)


def gguf_file(tmp_path: Path, name: str = "q.gguf", folder: str = "g") -> Path:
    path = tmp_path / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_legacy_single_gguf(tmp_path: Path) -> None:
    path = gguf_file(tmp_path)
    cat = catalog(
        f'[[models]]\nid = "chat"\nkind = "gguf"\npath = "{path}"\ntokenizer = "Qwen/Qwen3-1.7B"\n'
        '[models.options]\nmax_seq_len = 2048\nisq = "Q4K"\ndtype = "f32"\n',
        tmp_path,
    )
    cmd = build_command(LEGACY, cat, port=4321, run_dir="/run")
    assert cmd.argv == [
        "mistralrs-server",
        "--serve-ip",
        "127.0.0.1",
        "--port",
        "4321",
        "--max-seqs",
        "1",
        "--isq",
        "Q4K",
        "gguf",
        "--quantized-model-id",
        str(path.parent),
        "--quantized-filename",
        "q.gguf",
        "--tok-model-id",
        "Qwen/Qwen3-1.7B",
        "--dtype",
        "f32",
        "--max-seq-len",
        "2048",
    ]
    assert cmd.files == {}
    assert cmd.engine_ids == {"chat": ("Qwen/Qwen3-1.7B",)}


@pytest.mark.parametrize(
    ("kind", "options", "expected"),
    [
        (
            "plain",
            'arch = "qwen3"\nmax_batch_size = 4',
            ["plain", "--model-id", "X", "--arch", "qwen3", "--max-batch-size", "4"],
        ),
        # embedding refuses --max-seq-len/--max-batch-size: they are left out.
        (
            "embedding",
            'arch = "qwen3embedding"\nmax_seq_len = 512',
            ["embedding", "--model-id", "X", "--arch", "qwen3embedding"],
        ),
        ("diffusion", 'arch = "flux"', ["diffusion", "--model-id", "X", "--arch", "flux"]),
        ("speech", 'arch = "dia"', ["speech", "--model-id", "X", "--arch", "dia"]),
        ("vision-plain", "max_num_images = 2", ["multimodal-plain", "--model-id", "X", "--max-num-images", "2"]),
    ],
)
def test_legacy_single_model_kinds(kind: str, options: str, expected: list[str], tmp_path: Path) -> None:
    cat = catalog(f'[[models]]\nid = "m"\nkind = "{kind}"\nrepo = "X"\n[models.options]\n{options}\n', tmp_path)
    cmd = build_command(LEGACY, cat, port=1, run_dir="/run")
    assert cmd.argv[5:] == expected
    assert cmd.engine_ids == {"m": ("X",)}


def test_legacy_before_08_says_vision_plain(tmp_path: Path) -> None:
    cat = catalog('[[models]]\nid = "m"\nkind = "vision-plain"\nrepo = "X"\n', tmp_path)
    assert build_command(LEGACY_07, cat, port=1, run_dir="/r").argv[5] == "vision-plain"


def test_legacy_multi_model_json_has_every_required_field_and_aliases(tmp_path: Path) -> None:
    path = gguf_file(tmp_path)
    cat = catalog(
        f"""
default_model = "chat"
[[models]]
id = "emb"
kind = "embedding"
repo = "Qwen/Qwen3-Embedding-0.6B"
[models.options]
arch = "qwen3embedding"
[[models]]
id = "chat"
kind = "gguf"
path = "{path}"
[models.options]
isq = "Q8_0"
[[models]]
id = "see"
kind = "vision-plain"
repo = "google/gemma-3-4b-it"
[[models]]
id = "img"
kind = "diffusion"
repo = "black-forest-labs/FLUX.1-schnell"
[models.options]
arch = "flux"
""",
        tmp_path,
    )
    cmd = build_command(LEGACY, cat, port=9, run_dir="/run")
    assert cmd.argv == [
        "mistralrs-server",
        "--serve-ip",
        "127.0.0.1",
        "--port",
        "9",
        "--max-seqs",
        "1",
        "multi-model",
        "--config",
        "/run/multi-model.json",
        "--default-model-id",
        "chat",
    ]
    config = json.loads(cmd.files["multi-model.json"])
    by_alias = {entry["alias"]: entry for entry in config.values()}
    assert by_alias["chat"] == {
        "GGUF": {
            "quantized_model_id": str(path.parent),
            "quantized_filename": "q.gguf",
            "dtype": "auto",
            "max_seq_len": 4096,
            "max_batch_size": 1,
        },
        "alias": "chat",
        "in_situ_quant": "Q8_0",
    }
    assert by_alias["emb"]["Embedding"] == {"model_id": "Qwen/Qwen3-Embedding-0.6B", "arch": "qwen3embedding"}
    assert by_alias["see"]["MultimodalPlain"] == {
        "model_id": "google/gemma-3-4b-it",
        "dtype": "auto",
        "max_seq_len": 4096,
        "max_batch_size": 1,
        "max_num_images": 1,
        "max_image_length": 1024,
    }
    assert by_alias["img"]["DiffusionPlain"] == {
        "model_id": "black-forest-labs/FLUX.1-schnell",
        "arch": "flux",
        "dtype": "auto",
    }
    # With aliases the engine answers to the configured ids exactly.
    assert cmd.engine_ids == {"emb": ("emb",), "chat": ("chat",), "see": ("see",), "img": ("img",)}


def test_serve_single_gguf_puts_server_flags_before_the_type(tmp_path: Path) -> None:
    path = gguf_file(tmp_path)
    cat = catalog(f'[[models]]\nid = "c"\nkind = "gguf"\npath = "{path}"\ntokenizer = "Qwen/Qwen3-1.7B"\n', tmp_path)
    cmd = build_command(SERVE, cat, port=7, run_dir="/run", extra_args=["--no-ui"])
    assert cmd.argv == [
        "mistralrs",
        "serve",
        "--port",
        "7",
        "--host",
        "127.0.0.1",
        "--max-seqs",
        "1",
        "--no-ui",
        "text",
        "--model-id",
        str(path.parent),
        "--format",
        "gguf",
        "--quantized-file",
        "q.gguf",
        "--tok-model-id",
        "Qwen/Qwen3-1.7B",
    ]
    # 0.9.1 changed a GGUF pipeline's name from the tokenizer id to the -m value.
    assert cmd.engine_ids == {"c": (str(path.parent), "Qwen/Qwen3-1.7B")}
    assert build_command(SERVE_090, cat, port=7, run_dir="/r").engine_ids == {
        "c": ("Qwen/Qwen3-1.7B", str(path.parent))
    }


def test_serve_embedding_leaves_out_arch_which_it_would_reject(tmp_path: Path) -> None:
    cat = catalog(
        '[[models]]\nid = "e"\nkind = "embedding"\nrepo = "E"\n[models.options]\narch = "qwen3embedding"\n', tmp_path
    )
    assert build_command(SERVE, cat, port=7, run_dir="/r").argv[6:] == ["embedding", "--model-id", "E"]


def test_from_config_toml(tmp_path: Path) -> None:
    path = gguf_file(tmp_path)
    cat = catalog(
        f"""
default_model = "chat"
[[models]]
id = "emb"
kind = "embedding"
repo = "Qwen/Qwen3-Embedding-0.6B"
[[models]]
id = "chat"
kind = "gguf"
path = "{path}"
tokenizer = "Qwen/Qwen3-1.7B"
[models.options]
isq = "Q4K"
max_seq_len = 1024
""",
        tmp_path,
    )
    cmd = build_command(SERVE, cat, port=5, run_dir="/run")
    assert cmd.argv == ["mistralrs", "from-config", "--file", "/run/mistralrs.toml"]
    config = tomllib.loads(cmd.files["mistralrs.toml"])
    assert config["command"] == "serve" and config["server"] == {"port": 5, "host": "127.0.0.1"}
    assert "default_model_id" not in config  # the first entry is the default instead (see command.py)
    first, second = config["models"]
    assert first == {
        "kind": "text",
        "model_id": str(path.parent),
        "format": {"format": "gguf", "quantized_file": "q.gguf", "tok_model_id": "Qwen/Qwen3-1.7B"},
        "quantization": {"in_situ_quant": "Q4K"},
        "device": {"max_seq_len": 1024},
    }
    assert second == {"kind": "embedding", "model_id": "Qwen/Qwen3-Embedding-0.6B"}


def test_serve_refuses_two_models_that_would_share_an_engine_id(tmp_path: Path) -> None:
    a, b = gguf_file(tmp_path, "a.gguf"), gguf_file(tmp_path, "b.gguf")
    cat = catalog(
        f'[[models]]\nid = "a"\nkind = "gguf"\npath = "{a}"\n[[models]]\nid = "b"\nkind = "gguf"\npath = "{b}"\n',
        tmp_path,
    )
    with pytest.raises(CommandError, match="folder of its own"):
        build_command(SERVE, cat, port=1, run_dir="/r")
    # The legacy dialect gives each an alias, so the same pair is fine there.
    assert build_command(LEGACY, cat, port=1, run_dir="/r").engine_ids == {"a": ("a",), "b": ("b",)}


def test_builtin_default_command(tmp_path: Path) -> None:
    from gateway.catalog import load_catalog

    cmd = build_command(LEGACY, load_catalog(None, model_dir=tmp_path), port=3, run_dir="/run")
    config = json.loads(cmd.files["multi-model.json"])
    gguf = next(e for e in config.values() if "GGUF" in e)["GGUF"]
    assert gguf["quantized_model_id"] == str(tmp_path / "Qwen")
    assert gguf["quantized_filename"] == "Qwen3-1.7B-Q8_0.gguf"
    assert gguf["tok_model_id"] == "Qwen/Qwen3-1.7B"
    assert cmd.argv[-1] == "Qwen/Qwen3-1.7B"


SERVE_FLAGS = {"--port", "--host", "--max-seqs", "--token-source", "--mcp-config", "--no-ui"}


def test_engine_table_in_both_dialects(tmp_path: Path) -> None:
    mcp = tmp_path / "mcp.json"
    mcp.write_text('{"servers": []}')
    one = f"""
[engine]
max_seqs = 8
paged_attn = false
cpu = true
token_source = "env:HF_TOKEN"
mcp_config = "{mcp}"
[[models]]
id = "m"
kind = "plain"
repo = "Qwen/Qwen3-0.6B"
"""
    cat = catalog(one, tmp_path)
    legacy = build_command(LEGACY, cat, port=1, run_dir="/r").argv
    assert legacy[5:16] == [
        "--max-seqs",
        "8",
        "--no-paged-attn",
        "--cpu",
        "--token-source",
        "env:HF_TOKEN",
        "--mcp-config",
        str(mcp),
        "plain",
        "--model-id",
        "Qwen/Qwen3-0.6B",
    ]
    serve = build_command(SERVE, cat, port=1, run_dir="/r").argv
    split = serve.index("text")
    # Server-level flags before the model type, model-level ones after it.
    assert {a for a in serve[2:split] if a.startswith("--")} <= SERVE_FLAGS
    assert serve[split:] == ["text", "--model-id", "Qwen/Qwen3-0.6B", "--cpu", "--paged-attn", "off"]
    two = one + '[[models]]\nid = "e"\nkind = "embedding"\nrepo = "E"\n'
    config = tomllib.loads(build_command(SERVE, catalog(two, tmp_path), port=1, run_dir="/r").files["mistralrs.toml"])
    assert config["global"] == {"token_source": "env:HF_TOKEN"}
    assert config["runtime"] == {"max_seqs": 8, "mcp_config": str(mcp)}
    assert config["paged_attn"] == {"mode": "off"}
    assert all(m["device"] == {"cpu": True} for m in config["models"])


def test_quantized_models_run_one_sequence_at_a_time_on_binaries_only(tmp_path: Path) -> None:
    from gateway.engine.discovery import BUNDLED

    q8 = gguf_file(tmp_path, "tiny-Q8_0.gguf", "q")
    f32 = gguf_file(tmp_path, "tiny-F32.gguf", "f")
    quant = catalog(f'[[models]]\nid = "q"\nkind = "gguf"\npath = "{q8}"\n', tmp_path)
    plain = catalog(f'[[models]]\nid = "f"\nkind = "gguf"\npath = "{f32}"\n', tmp_path)
    assert "--max-seqs" in build_command(LEGACY, quant, port=1, run_dir="/r").argv
    assert "--max-seqs" not in build_command(LEGACY, plain, port=1, run_dir="/r").argv
    # The bundled engine lets one request at a time prefill instead, and keeps decoding batched.
    assert "--max-seqs" not in build_command(BUNDLED, quant, port=1, run_dir="/r").argv
    isq = catalog('[[models]]\nid = "p"\nkind = "plain"\nrepo = "X"\n[models.options]\nisq = "Q4K"\n', tmp_path)
    assert build_command(SERVE, isq, port=1, run_dir="/r").argv[6:8] == ["--max-seqs", "1"]
    chosen = catalog(f'[engine]\nmax_seqs = 4\n[[models]]\nid = "q"\nkind = "gguf"\npath = "{q8}"\n', tmp_path)
    argv = build_command(LEGACY, chosen, port=1, run_dir="/r").argv
    assert argv[argv.index("--max-seqs") + 1] == "4"
