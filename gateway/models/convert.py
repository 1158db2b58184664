"""A GGUF file rewritten with its weights in another type, for the engine's fast kernels (gateway/engine/recipes.py).

The ``gguf`` package (llama.cpp's own gguf-py) reads the file, dequantizes each weight tensor and quantizes it to
Q8_0 or Q4_0; tensors that are already of a fast type (the usual Q8_0 or Q6_K token embedding), 1-D tensors
(norms, F32 everywhere) and rows the target's blocks do not divide are copied as they are. Every key of the
metadata is copied (tokenizer, chat template, context length), ``general.file_type`` says the new type.

The file is written tensor by tensor (the header first, with each tensor's size computed up front), so a
conversion holds one tensor in memory at a time, and to a temporary name renamed at the end: an interrupted
conversion never leaves a file that looks complete. From a 4- or 5-bit source, Q8_0 keeps the weights as they
were to within 8-bit rounding; Q4_0 halves the size again at some loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metadata import read_gguf

# llama.cpp's LlamaFileType for the types this module writes ("mostly Q8_0", "mostly Q4_0").
_FILE_TYPES = {"Q8_0": 7, "Q4_0": 2}
_FAST = frozenset({"Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "F32"})

Progress = Callable[[int, int], None]  # bytes of tensors read so far, of all


@dataclass(frozen=True)
class Converted:
    path: Path
    source_type: str | None
    target: str
    converted: int  # tensors requantized
    kept: int  # tensors copied as they were
    bytes: int


def converted_name(source: Path, target: str) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct.Q8_0.gguf`` (the type in the name replaced
    when it is there, added otherwise)."""
    stem = source.name.removesuffix(".gguf")
    header = read_gguf(source)
    current = header.weight_type()
    if current and current.lower() in stem.lower():
        index = stem.lower().rindex(current.lower())
        stem = stem[:index] + target + stem[index + len(current) :]
    else:
        stem = f"{stem}.{target}"
    return stem + ".gguf"


def convert(
    source: Path, target_path: Path, target: str = "Q8_0", *, only_slow: bool = True, progress: Progress | None = None
) -> Converted:
    """Write ``source`` with its weights in ``target`` (Q8_0 or Q4_0) to ``target_path``: those of a slow type
    (``only_slow``), or every quantized weight of another type. Blocking: run it in a worker thread."""
    import gguf
    import numpy as np

    if target not in _FILE_TYPES:
        raise ValueError(f"cannot convert to {target}: use Q8_0 or Q4_0")
    qtype = gguf.GGMLQuantizationType[target]
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    partial = target_path.with_name(target_path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, _FILE_TYPES[target])
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)

    plan: list[tuple[Any, bool]] = []  # each tensor, and whether it is requantized
    for tensor in reader.tensors:
        rows = [int(d) for d in reversed(tensor.shape.tolist())]  # numpy order: the last is the row length
        requantize = (
            (tensor.tensor_type.name not in _FAST or not only_slow)
            and tensor.tensor_type.name not in (target, "F32")
            and len(rows) >= 2
            and rows[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0
        )
        if requantize:
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(rows, qtype)))
            writer.add_tensor_info(tensor.name, rows, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor_info(
                tensor.name, list(tensor.data.shape), tensor.data.dtype, int(tensor.n_bytes), tensor.tensor_type
            )
        plan.append((tensor, requantize))

    total = sum(int(tensor.n_bytes) for tensor, _ in plan)
    done = converted = 0
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, requantize in plan:
        if requantize:
            rows = [int(d) for d in reversed(tensor.shape.tolist())]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows).astype(np.float32)
            writer.write_tensor_data(gguf.quants.quantize(values, qtype))
            converted += 1
        else:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        done += int(tensor.n_bytes)
        if progress is not None:
            progress(done, total)
    writer.close()
    os.replace(partial, target_path)
    return Converted(
        target_path,
        read_gguf(source).weight_type(),
        target,
        converted,
        len(plan) - converted,
        target_path.stat().st_size,
    )
