"""The bundled engine parses exactly the command lines the launcher builds for mistralrs-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.catalog import parse_catalog
from gateway.engine.bundled.args import ArgsError, parse_args
from gateway.engine.bundled.runners import is_quantized
from gateway.engine.command import build_command
from gateway.engine.discovery import BUNDLED


def test_single_model_command_from_the_launcher(tmp_path: Path) -> None:
    gguf = tmp_path / "g" / "tiny-Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    catalog = parse_catalog(
        f'[engine]\nmax_seqs = 4\n[[models]]\nid = "c"\nkind = "gguf"\npath = "{gguf}"\ntokenizer = "T"\n'
        '[models.options]\nisq = "Q4K"\nmax_seq_len = 512\n',
        origin="m.toml",
        model_dir=tmp_path,
    )
    cmd = build_command(BUNDLED, catalog, port=5555, run_dir=str(tmp_path))
    assert cmd.argv[:3] == list(BUNDLED.argv)
    args = parse_args(cmd.argv[3:])
    assert (args.host, args.port, args.max_seqs, args.isq) == ("127.0.0.1", 5555, 4, "Q4K")
    (load,) = args.models
    assert load.kind == "gguf" and load.served_id == "T" == cmd.engine_ids["c"][0]
    assert load.fields["quantized_model_id"] == str(gguf.parent) and load.fields["quantized_filename"] == gguf.name
    assert "--max-seq-len" in args.unsupported  # said on stderr, not silently dropped
    assert is_quantized(load)


def test_multi_model_command_from_the_launcher(tmp_path: Path) -> None:
    for name in ("chat", "emb"):
        (tmp_path / name).mkdir()
    catalog = parse_catalog(
        f'[[models]]\nid = "chat"\nkind = "plain"\npath = "{tmp_path / "chat"}"\n'
        f'[[models]]\nid = "emb"\nkind = "embedding"\npath = "{tmp_path / "emb"}"\n',
        origin="m.toml",
        model_dir=tmp_path,
    )
    cmd = build_command(BUNDLED, catalog, port=1, run_dir=str(tmp_path))
    for name, text in cmd.files.items():
        (tmp_path / name).write_text(text)
    args = parse_args(cmd.argv[3:])
    assert [(m.served_id, m.kind) for m in args.models] == [("chat", "plain"), ("emb", "embedding")]
    assert args.default_model_id == "chat"
    assert not any(is_quantized(m) for m in args.models)


def test_strict_like_clap(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["plain", "-m", "x", "--port", "1"])  # a global flag after the subcommand
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--port", "1", "plain"])  # -m is required
    config = tmp_path / "mm.json"
    config.write_text(json.dumps({"a": {"GGUF": {"quantized_model_id": "/m"}}}))
    with pytest.raises(ArgsError, match="missing field `quantized_filename`"):
        parse_args(["--port", "1", "multi-model", "--config", str(config)])
    config.write_text(json.dumps({"a": {"Plain": {"model_id": "x"}}, "b": {"Plain": {"model_id": "x"}}}))
    with pytest.raises(ArgsError, match="Model ID conflict"):
        parse_args(["--port", "1", "multi-model", "--config", str(config)])
    assert "--seed" in parse_args(["--port", "1", "--seed", "3", "plain", "-m", "x"]).unsupported[0]
