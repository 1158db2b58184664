from __future__ import annotations

from pathlib import Path

import pytest

from gateway.catalog import load_catalog, parse_catalog
from gateway.errors import ConfigError


def parse(text: str, tmp_path: Path, **kw: object) -> object:
    return parse_catalog(text, origin="models.toml", model_dir=tmp_path, **kw)  # type: ignore[arg-type]


def test_builtin_default_is_the_4d_pair(tmp_path: Path) -> None:
    catalog = load_catalog(None, model_dir=tmp_path)
    assert catalog.default_model == "Qwen/Qwen3-1.7B"
    assert catalog.default_embedding_model == "Qwen/Qwen3-Embedding-0.6B"
    chat = catalog.find("Qwen/Qwen3-1.7B")
    assert chat is not None and chat.kind == "gguf"
    assert chat.source.filename == "Qwen3-1.7B-Q8_0.gguf" and chat.entry.url
    assert chat.source.model_id == str(tmp_path / "Qwen")  # downloaded into the model dir, as the 4D component did
    assert chat.engine_id == "Qwen/Qwen3-1.7B"  # the tokenizer id names a GGUF pipeline


def test_local_gguf_file_splits_into_folder_and_file(tmp_path: Path) -> None:
    gguf = tmp_path / "m" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    catalog = parse(f'[[models]]\nid = "tiny"\nkind = "gguf"\npath = "{gguf}"\naliases = ["gpt-4o-mini"]\n', tmp_path)
    model = catalog.find("gpt-4o-mini")  # type: ignore[attr-defined]
    assert model.source.model_id == str(gguf.parent) and model.source.filename == "tiny.gguf"
    assert model.engine_id == str(gguf.parent)
    assert catalog.default_model == "tiny"  # type: ignore[attr-defined]


def test_defaults_follow_kinds(tmp_path: Path) -> None:
    text = """
[[models]]
id = "emb"
kind = "embedding"
[[models]]
id = "chat"
kind = "plain"
"""
    catalog = parse(text, tmp_path)
    assert catalog.default_model == "chat"  # type: ignore[attr-defined]
    assert catalog.default_embedding_model == "emb"  # type: ignore[attr-defined]
    assert catalog.default_for({"embedding"}) == "emb"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[[models]\nid = 1", ["models.toml", "not valid TOML"]),
        ('[[models]]\nid = "a"\nkind = "llama"\n', ["id = 'a'", "unknown kind 'llama'", "plain, gguf"]),
        ('[[models]]\nid = "a"\nkind = "plain"\n[[models]]\nid = "a"\nkind = "plain"\n', ["'a' is already used"]),
        ('[[models]]\nid = "a"\nkind = "plain"\naliases = ["b"]\n[[models]]\nid = "b"\nkind = "plain"\n', ["'b'"]),
        ('default_model = "nope"\n[[models]]\nid = "a"\nkind = "plain"\n', ["default_model = 'nope'", "use one of: a"]),
        ('default_embedding_model = "a"\n[[models]]\nid = "a"\nkind = "plain"\n', ["is a plain model"]),
        ('[[models]]\nid = "a"\nkind = "plain"\ncolour = "red"\n', ["unknown key 'colour'"]),
        ('[[models]]\nid = "a"\nkind = "plain"\n[models.options]\nturbo = true\n', ["unknown key 'options.turbo'"]),
        ('[[models]]\nkind = "plain"\n', ["'id' is required"]),
        ('[[models]]\nid = "a"\nkind = "gguf"\nrepo = "org/x-GGUF"\n', ["needs `file`"]),
        ('[[models]]\nid = "a"\nkind = "plain"\npath = "/no/such/dir"\n', ["'/no/such/dir' does not exist"]),
        ('[[models]]\nid = "a"\nkind = "embedding"\nrepo = "x"\nfile = "e.gguf"\n', ["cannot embed with a GGUF"]),
        ('[[models]]\nid = "a"\nkind = "plain"\nurl = "http://x/y"\n', ["`url` needs `file`"]),
        ("models = []\n", ["models"]),
        ('[engine]\nturbo = 1\n[[models]]\nid = "a"\nkind = "plain"\n', ["[engine]", "unknown key 'turbo'"]),
        ('[engine]\ntoken_source = "hf_abc"\n[[models]]\nid = "a"\nkind = "plain"\n', ["[engine]", "env:VAR"]),
        ('[engine]\npaged_attn = true\ncpu = true\n[[models]]\nid = "a"\nkind = "plain"\n', ["cannot be used"]),
        ('[engine]\nmcp_config = "/no/mcp.json"\n[[models]]\nid = "a"\nkind = "plain"\n', ["mcp_config"]),
        ('[[models]]\nid = "a"\nkind = "diffusion"\n', ['arch = "flux"']),
        # Names a download writes under stay inside the model dir, and say so at start.
        ('[[models]]\nid = "a"\nkind = "gguf"\nurl = "http://x/y"\nfile = "../../x"\n', ["'../../x'", "model dir"]),
        ('[[models]]\nid = "a"\nkind = "gguf"\nurl = "http://x/y"\nfile = "/etc/x.gguf"\n', ["'/etc/x.gguf'"]),
        ('[[models]]\nid = "a"\nkind = "gguf"\nrepo = "o/r"\nfile = "a/../../x.gguf"\n', ["inside its folder"]),
        ('[[models]]\nid = "a"\nkind = "plain"\nrepo = "o/r"\nfiles = ["../*"]\n', ["files entry '../*'"]),
        ('[[models]]\nid = "a"\nkind = "plain"\nrepo = "o/../../r"\n', ["repo 'o/../../r' is not a Hugging Face"]),
        ('[[models]]\nid = "../../etc"\nkind = "plain"\n', ["id (the Hugging Face repo", "'../../etc'"]),
        ('[[models]]\nid = "/abs/x"\nkind = "plain"\n', ["'/abs/x' is not a Hugging Face"]),
    ],
)
def test_broken_files_name_file_entry_and_fix(text: str, needles: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, tmp_path)
    message = str(info.value)
    assert message.startswith("models.toml")
    for needle in needles:
        assert needle in message


def test_gateway_default_model_overrides_the_file(tmp_path: Path) -> None:
    text = '[[models]]\nid = "a"\nkind = "plain"\n[[models]]\nid = "b"\nkind = "plain"\n'
    assert parse(text, tmp_path, default_model="b").default_model == "b"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="names no model"):
        parse(text, tmp_path, default_model="c")


def test_missing_models_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the models file"):
        load_catalog(tmp_path / "absent.toml", model_dir=tmp_path)
