"""What a model's files say about it before any engine loads it: the weight type of a GGUF file, its context length,
its tokenizer and chat template; the same from a Hugging Face folder (``config.json``, ``tokenizer.json``).

GGUF headers are read here with the standard library: ``gguf.GGUFReader`` (the maintained reader, used for
conversion in :mod:`gateway.models.convert`) parses every tensor and every token of the vocabulary into numpy
objects, 2.5 s for a 98 MB file on this project's machine, while the gateway needs a few keys at start-up for
every model of its models file. Reading the key-value section and the tensor table takes milliseconds, and large
arrays (the vocabulary) are only read when asked for.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# GGUF value types (gguf-py's GGUFValueType): sizes and struct formats of the fixed-size ones.
_STRING, _ARRAY = 8, 9
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml tensor types (gguf-py's GGMLQuantizationType): name, (elements, bytes) per block.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
}
_VOCAB_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"})


class NotGGUF(ValueError):
    """The file is not a GGUF file (or is cut short)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    type: str

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.dims:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        _, block, size = next(v for v in GGML_TYPES.values() if v[0] == self.type)
        return self.elements // block * size


@dataclass(frozen=True)
class GGUFHeader:
    """The key-value metadata (large arrays only when asked for) and the tensor table of a GGUF file."""

    metadata: dict[str, Any]
    tensors: tuple[Tensor, ...] = field(default=())

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) and value > 0 else None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    def weight_type(self) -> str | None:
        """The type that holds most of the weights (by bytes), among the 2-D tensors (norms are F32 in every file)."""
        weights: Counter[str] = Counter()
        for tensor in self.tensors:
            if len(tensor.dims) >= 2:
                weights[tensor.type] += tensor.nbytes
        return weights.most_common(1)[0][0] if weights else None

    def weight_types(self) -> dict[str, int]:
        """Bytes of 2-D weights per type."""
        weights: Counter[str] = Counter()
        for tensor in self.tensors:
            if len(tensor.dims) >= 2:
                weights[tensor.type] += tensor.nbytes
        return dict(weights)


def read_gguf(path: Path, *, vocabulary: bool = False) -> GGUFHeader:
    """The header of the GGUF file at ``path``; the vocabulary arrays (tokens, merges, token types) only when
    ``vocabulary``. Raises :class:`NotGGUF` for anything else, and OSError when it cannot be read."""
    with path.open("rb") as file:
        reader = _Reader(file)
        if reader.read(4) != b"GGUF":
            raise NotGGUF(f"{path} is not a GGUF file")
        version = reader.unpack("<I")
        if version not in (2, 3):
            raise NotGGUF(f"{path}: GGUF version {version} is not supported")
        tensor_count, kv_count = reader.unpack("<Q"), reader.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            kind = reader.unpack("<I")
            if kind == _ARRAY and key in _VOCAB_KEYS and not vocabulary:
                reader.skip_array()
            else:
                metadata[key] = reader.value(kind)
        tensors = []
        for _ in range(tensor_count):
            name = reader.string()
            n_dims = reader.unpack("<I")
            dims = tuple(reader.unpack("<Q") for _ in range(n_dims))
            kind = reader.unpack("<I")
            reader.unpack("<Q")  # offset of its data
            type_name = GGML_TYPES.get(kind, (f"type{kind}", 1, 1))[0]
            tensors.append(Tensor(name, dims, type_name))
    return GGUFHeader(metadata, tuple(tensors))


class _Reader:
    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def read(self, size: int) -> bytes:
        data = self._file.read(size)
        if len(data) != size:
            raise NotGGUF("the GGUF header is cut short")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _FIXED:
                fmt = _FIXED[item]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1:]}", self.read(size * count)))
            return [self.value(item) for _ in range(count)]
        if kind not in _FIXED:
            raise NotGGUF(f"unknown GGUF value type {kind}")
        return self.unpack(_FIXED[kind])

    def skip_array(self) -> None:
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item in _FIXED:
            self._file.seek(struct.calcsize(_FIXED[item]) * count, 1)
            return
        for _ in range(count):
            if item == _STRING:
                self._file.seek(self.unpack("<Q"), 1)
            else:
                self.value(item)


# ------------------------------------------------------------------------------------------ Hugging Face folders


def folder_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder; empty when there is none or it does not parse."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_context_length(folder: Path) -> int | None:
    value = folder_config(folder).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def folder_chat_template(folder: Path) -> str | None:
    """The chat template of a Hugging Face folder: ``chat_template.jinja``, else ``tokenizer_config.json``'s."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) else None


def folder_special_tokens(folder: Path) -> dict[str, str]:
    """``bos_token`` and ``eos_token`` of ``tokenizer_config.json`` (templates refer to them)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out
