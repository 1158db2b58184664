"""Weight types: what a GGUF file holds (models/metadata.py), whether the engine is fast with it on a machine
(engine/recipes.py), and the file rewritten in a fast type (models/convert.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from gateway.engine.recipes import Machine, isq_choice, plan
from gateway.models.convert import convert, converted_name
from gateway.models.metadata import NotGGUF, read_gguf
from tests.tinymodels import make_qwen3_gguf

AVX512 = Machine("x86_64", frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}), gpu=False)
GPU = Machine("x86_64", frozenset({"avx2"}), gpu=True)


def test_the_header_says_the_weight_type_context_and_template_as_gguf_py_reads_them(tmp_path: Path) -> None:
    path = make_qwen3_gguf(tmp_path / "tiny-Q4_1.gguf", quant="Q4_1")
    header = read_gguf(path)
    reference = gguf.GGUFReader(path)  # the maintained reader, slower: the truth to compare with
    assert header.architecture == "qwen3" and header.context_length == 2048
    assert header.chat_template and "im_start" in header.chat_template
    assert [(t.name, t.type) for t in header.tensors] == [(t.name, t.tensor_type.name) for t in reference.tensors]
    assert sum(t.nbytes for t in header.tensors) == sum(int(t.n_bytes) for t in reference.tensors)
    assert header.weight_type() == "Q4_1"
    assert "tokenizer.ggml.tokens" not in header.metadata  # the vocabulary is read only when asked for
    assert read_gguf(path, vocabulary=True).metadata["tokenizer.ggml.tokens"][:3] == list(
        reference.fields["tokenizer.ggml.tokens"].contents()[:3]
    )
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(NotGGUF):
        read_gguf(tmp_path / "not.gguf")


def test_cpu_features_are_read_from_proc_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_vnni\n\nprocessor\t: 1\n")
    machine = Machine.detect(cpuinfo=cpuinfo, cpu_only=True)
    assert {"avx512f", "avx512_vnni"} <= machine.flags and not machine.gpu
    assert "AVX-512 with VNNI" in Machine("x86_64", machine.flags, gpu=False).describe()


@pytest.mark.parametrize(
    ("weights", "wanted", "serve_as", "fast"),
    [
        ("Q4_1", "auto", "Q8_0", False),  # the slowest path of mistral.rs on a CPU: converted
        ("BF16", "auto", "Q8_0", False),
        ("Q8_0", "auto", None, True),
        ("Q4_0", "auto", None, True),
        ("Q4_K", "auto", None, True),
        ("Q4_1", "as-is", None, False),  # the models file keeps it: still said to be slow
        ("Q8_0", "Q4_0", "Q4_0", True),  # the models file asks for a type
        ("Q4_0", "Q4_0", None, True),
        (None, "auto", None, True),
    ],
)
def test_a_slow_type_is_served_as_q8_0_unless_the_models_file_says_otherwise(
    weights: str | None, wanted: str, serve_as: str | None, fast: bool
) -> None:
    verdict = plan(weights, AVX512, wanted=wanted)
    assert (verdict.serve_as, verdict.fast) == (serve_as, fast), verdict.why
    if weights == "Q4_1":
        assert "slow" in verdict.why and "0.23x" in verdict.why


def test_on_a_gpu_and_for_embeddings_files_are_served_as_they_are() -> None:
    assert plan("Q4_1", GPU).serve_as is None
    assert plan("BF16", AVX512, embedding=True).serve_as is None


def test_isq_never_silently_falls_back_to_a_slow_type() -> None:
    assert isq_choice("auto", [576, 1536], AVX512) == ("Q8_0", None)
    chosen, warning = isq_choice("Q4K", [576, 1536], AVX512)
    assert chosen == "Q4K" and warning is not None and "Q4_1" in warning and "576" in warning and "Q8_0" in warning
    assert isq_choice("Q4K", [1024, 4096], AVX512) == ("Q4K", None)  # every width a multiple of 256
    assert isq_choice("Q8_0", [576], AVX512) == ("Q8_0", None)


def test_a_q4_1_file_converted_to_q8_0_keeps_its_weights_and_metadata(tmp_path: Path) -> None:
    source = make_qwen3_gguf(tmp_path / "tiny-Q4_1.gguf", quant="Q4_1")
    name = converted_name(source, "Q8_0")
    assert name == "tiny-Q8_0.gguf"
    seen: list[tuple[int, int]] = []
    result = convert(source, tmp_path / name, "Q8_0", progress=lambda done, total: seen.append((done, total)))
    assert result.source_type == "Q4_1" and result.converted > 0 and seen[-1][0] == seen[-1][1]
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(tmp_path / name)
    assert read_gguf(tmp_path / name).weight_type() == "Q8_0"
    assert int(after.fields["general.file_type"].contents()) == 7  # "mostly Q8_0"
    for key in ("qwen3.context_length", "tokenizer.chat_template", "tokenizer.ggml.merges"):
        assert after.fields[key].contents() == before.fields[key].contents()
    for old, new in zip(before.tensors, after.tensors, strict=True):
        assert old.name == new.name
        a = gguf.quants.dequantize(old.data, old.tensor_type)
        b = gguf.quants.dequantize(new.data, new.tensor_type)
        assert np.allclose(a, b, atol=2e-2 * max(1e-6, float(np.abs(a).max()))), old.name  # 8-bit rounding only
    assert not (tmp_path / (name + ".partial")).exists()


def test_the_preparer_asks_the_engine_for_the_fast_isq_type_and_says_when_layers_would_fall_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import json
    import logging

    from gateway.catalog import load_catalog
    from gateway.engine.preparation import Preparer
    from gateway.settings import Settings

    for name, hidden in (("odd", 576), ("even", 1024)):
        folder = tmp_path / name
        folder.mkdir()
        config = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_attention_heads": 8, "head_dim": 64}
        (folder / "config.json").write_text(json.dumps(config))
    models = "".join(
        f'[[models]]\nid = "{name}"\nkind = "plain"\npath = "{tmp_path / folder}"\n[models.options]\nisq = "{isq}"\n'
        for name, folder, isq in (("auto", "odd", "auto"), ("odd", "odd", "Q4K"), ("even", "even", "Q4K"))
    )
    (tmp_path / "models.toml").write_text(models)
    catalog = load_catalog(tmp_path / "models.toml", model_dir=tmp_path / "models")
    preparer = Preparer(Settings(_env_file=None, model_dir=tmp_path / "models"), machine=AVX512)
    plans = {model.id: (chosen, warning) for model, chosen, warning in preparer.isq_plans(catalog)}
    assert plans["auto"] == ("Q8_0", None)  # the type the engine is fast with on this CPU
    assert plans["even"] == ("Q4K", None)
    chosen, warning = plans["odd"]
    assert chosen == "Q4K" and warning is not None and "576" in warning and "Q4_1" in warning
    with caplog.at_level(logging.WARNING, logger="gateway.engine"):
        prepared = asyncio.run(preparer.prepare(catalog, None))
    assert {m.id: m.entry.options.isq for m in prepared.models} == {"auto": "Q8_0", "odd": "Q4K", "even": "Q4K"}
    assert [r.getMessage() for r in caplog.records if "576" in r.getMessage()] == [f"model odd: {warning}"]
