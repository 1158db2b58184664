"""Tiny random-weight models that the real mistral.rs engine loads in milliseconds.

Tests that drive the real engine (the `mistralrs` wheel, or an engine binary) need model files,
and no machine here can download any. A Qwen3 model with a hidden size of 64 and two layers is a
few hundred kilobytes, loads in a few hundredths of a second and decodes a thousand tokens per
second on a CPU, yet goes through exactly the same loaders, tokenizer, chat template and
scheduler as a real one. What it says is gibberish, but deterministic gibberish: every file here
comes from a seeded numpy generator and a tokenizer trained on fixed sentences, so two calls with
the same arguments write byte-identical files, and greedy decoding (`temperature=0`) gives the
same text on every run.

Three formats, matching what the gateway serves:

- `make_qwen3_safetensors`: a Hugging Face folder (`plain` kind, `Which.Plain`).
- `make_qwen3_gguf`: one self-contained `.gguf` file with the tokenizer and chat template inside
  (`gguf` kind, `Which.GGUF`), unquantised or quantised. From the same seed it holds the same
  weights as the safetensors folder (exactly for F32, rounded for F16, BF16 and the legacy block
  formats): F32, F16 and BF16 give the same greedy text as the folder; quantised files diverge
  after a few tokens, as real quantised models do.
- `make_qwen3_embedding`: a sentence-transformers style Qwen3 embedding folder (`embedding` kind,
  `Which.Embedding(arch=Qwen3Embedding)`). Vectors have `hidden` dimensions and unit norm.

The output head is shaped so that greedy decoding only ever produces printable ASCII text and
never a special token: generations always run to `max_tokens` (finish reason `length`) and chunk
texts are plain strings, which keeps assertions simple. Use `stop_seqs` or a grammar when a test
needs a `stop` finish reason.

Facts these files rely on were measured against mistralrs 0.9.5; see `/work/shared/TINY_MODELS.md`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, TokenType, quants
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "GGUF_QUANTS",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TinySpec",
    "build_tokenizer",
    "make_qwen3_embedding",
    "make_qwen3_gguf",
    "make_qwen3_safetensors",
    "write_tokenizer",
]

#: Special tokens, in id order (0, 1, 2), as in Qwen's vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: The end-of-turn token the chat template emits; the engine stops on it.
EOS_TOKEN = "<|im_end|>"
#: Padding, and the beginning-of-sequence id GGUF requires (Qwen never prepends it).
PAD_TOKEN = "<|endoftext|>"

#: A plain ChatML template. Without any template the engine refuses chat requests ("Received
#: messages for a model which does not have a chat template"). Non-string content (image parts)
#: is reduced to its text parts so that a multimodal-shaped request still renders.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A few fixed sentences: enough text for well over a hundred BPE merges (the engine refuses a
# BPE tokenizer without merges), all ASCII so the learned tokens are printable.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A gateway sits in front of the engine and forwards every request it receives.",
    "Hello, world! How are you today? I am fine, thank you for asking.",
    "Streaming responses arrive as server-sent events, one chunk at a time.",
    "The model loads in a fraction of a second and answers with random words.",
    "Tests should be fast, deterministic and independent of the network.",
    "Embeddings are vectors of floating point numbers with a unit norm.",
    "She sells sea shells on the sea shore; the shells she sells are surely sea shells.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in text too.",
    "Once upon a time there was a small model that lived inside a test suite.",
)

_DEFAULT_VOCAB = 384

# The `gguf` package quantises the legacy formats (32-value blocks); it cannot produce the K
# formats (256-value blocks), so those are synthesised. Rows must hold whole blocks either way.
_LEGACY_QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's "_M" mixes keep the most sensitive tensors one step more precise.
_K_MIXES: dict[str, tuple[str, str]] = {"Q4_K_M": ("Q4_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K")}
#: Every `quant` value `make_qwen3_gguf` accepts.
GGUF_QUANTS: tuple[str, ...] = ("F32", "F16", "BF16", *_LEGACY_QUANTS, *_K_QUANTS, *_K_MIXES)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Qwen3 model; the defaults are what the engine was measured with."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        """Per-head width, hidden / heads; written out explicitly, as Qwen3 configs do."""
        return self.hidden // self.heads

    @property
    def ffn(self) -> int:
        """MLP width: twice the hidden size unless given, which keeps it a multiple of 32."""
        return self.intermediate if self.intermediate is not None else 2 * self.hidden

    def check(self) -> None:
        """Reject shapes the Qwen3 attention cannot take, before writing anything."""
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden ({self.hidden}) must divide by heads ({self.heads}), and heads by kv_heads ({self.kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process: training is deterministic, caching saves time."""
    tokenizer = Tokenizer(models.BPE())
    # The same pre-tokenizer mistral.rs builds for a GGUF `gpt2` tokenizer (GPT-2 regex, no
    # prefix space), so the safetensors and GGUF variants split text identically.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(vocab_size: int = _DEFAULT_VOCAB) -> Tokenizer:
    """Return a fresh `tokenizers.Tokenizer`: byte-level BPE with the three special tokens first.

    The vocabulary holds the 256 byte tokens, the special tokens and as many merges as the fixed
    corpus yields up to `vocab_size` (must be >= 300 so that merges exist).
    """
    if vocab_size < 300:
        raise ValueError("vocab_size must be >= 300: the engine refuses a BPE without merges")
    return Tokenizer.from_str(_tokenizer_json(vocab_size))


def _tokenizer_config(chat_template: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def write_tokenizer(
    dest_dir: Path,
    *,
    vocab_size: int = _DEFAULT_VOCAB,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` into `dest_dir`; return the former.

    `chat_template=None` leaves the template out, to test the engine's refusal of chat requests
    for a model without one.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size)  # validates vocab_size
    path = dest_dir / "tokenizer.json"
    path.write_text(_tokenizer_json(vocab_size), encoding="utf-8")
    _write_json(dest_dir / "tokenizer_config.json", _tokenizer_config(chat_template))
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _silent_token_ids(vocab: dict[str, int]) -> list[int]:
    """Ids the output head must never pick: special tokens and anything not printable ASCII.

    Zeroing these rows of the output projection gives them a logit of exactly 0, while the
    maximum over the ~200 remaining random logits is positive with overwhelming probability, so
    greedy decoding never emits them. The result: no early stop by chance, no control tokens and
    no broken UTF-8 in generated text.
    """
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    silent = []
    for token, idx in vocab.items():
        if token in SPECIAL_TOKENS:
            silent.append(idx)
            continue
        raw = [decode.get(ch) for ch in token]
        if any(b is None or not 32 <= b < 127 for b in raw):
            silent.append(idx)
    return sorted(silent)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _qwen3_weights(spec: TinySpec, vocab: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 weights under Hugging Face names, in a fixed order.

    Linear layers draw from N(0, 1/fan_in) so activations keep unit scale through the layers
    and the logits stay varied; norms are ones, as a freshly initialised model has them.
    """
    spec.check()
    rng = np.random.default_rng(seed)
    n_vocab = len(vocab)
    h, hd, ffn = spec.hidden, spec.head_dim, spec.ffn

    def linear(out_features: int, in_features: int) -> np.ndarray:
        scale = 1.0 / math.sqrt(in_features)
        return (rng.standard_normal((out_features, in_features)) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((n_vocab, h)).astype(np.float32),
    }
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ones(h)
        tensors[p + "self_attn.q_proj.weight"] = linear(spec.heads * hd, h)
        tensors[p + "self_attn.k_proj.weight"] = linear(spec.kv_heads * hd, h)
        tensors[p + "self_attn.v_proj.weight"] = linear(spec.kv_heads * hd, h)
        tensors[p + "self_attn.o_proj.weight"] = linear(h, spec.heads * hd)
        tensors[p + "self_attn.q_norm.weight"] = ones(hd)
        tensors[p + "self_attn.k_norm.weight"] = ones(hd)
        tensors[p + "post_attention_layernorm.weight"] = ones(h)
        tensors[p + "mlp.gate_proj.weight"] = linear(ffn, h)
        tensors[p + "mlp.up_proj.weight"] = linear(ffn, h)
        tensors[p + "mlp.down_proj.weight"] = linear(h, ffn)
    tensors["model.norm.weight"] = ones(h)
    head = linear(n_vocab, h)
    head[_silent_token_ids(vocab)] = 0.0
    tensors["lm_head.weight"] = head
    return tensors


def _qwen3_config(spec: TinySpec, vocab_size: int) -> dict[str, Any]:
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "max_window_layers": spec.layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": ids[PAD_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "torch_dtype": "float32",
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------


def make_qwen3_safetensors(
    dest_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    vocab_size: int = _DEFAULT_VOCAB,
    chat_template: str | None = CHATML_TEMPLATE,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a Qwen3 chat model as a Hugging Face folder and return the folder.

    Load it with `Which.Plain(model_id=str(folder))` (or `arch=Architecture.Qwen3`). The folder
    holds `config.json`, `model.safetensors` (the engine looks for this exact name),
    `tokenizer.json`, `tokenizer_config.json` with the chat template, and
    `generation_config.json`. About 200 KB at the default size.
    """
    spec = TinySpec(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, max_position_embeddings=max_position_embeddings
    )
    dest_dir = Path(dest_dir)
    write_tokenizer(dest_dir, vocab_size=vocab_size, chat_template=chat_template)
    vocab = build_tokenizer(vocab_size).get_vocab()
    _write_json(dest_dir / "config.json", _qwen3_config(spec, len(vocab)))
    _write_json(
        dest_dir / "generation_config.json",
        {
            "bos_token_id": vocab[PAD_TOKEN],
            "eos_token_id": [vocab[EOS_TOKEN], vocab[PAD_TOKEN]],
            "pad_token_id": vocab[PAD_TOKEN],
            "do_sample": False,
        },
    )
    _save_safetensors(dest_dir / "model.safetensors", _qwen3_weights(spec, vocab, seed))
    return dest_dir


def make_qwen3_embedding(
    dest_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    vocab_size: int = _DEFAULT_VOCAB,
) -> Path:
    """Write a Qwen3 embedding model folder and return it.

    Load it with `Which.Embedding(model_id=str(folder), arch=EmbeddingArchitecture.Qwen3Embedding)`.
    It mirrors Qwen/Qwen3-Embedding-0.6B's layout: tensors without the `model.` prefix and
    without `lm_head`, and the sentence-transformers files the engine needs: without
    `modules.json` it panics, and without a Pooling module every request fails with "Embedding
    response channel closed unexpectedly". Pooling is last-token, then L2 normalisation, so each
    vector has `hidden` entries and unit norm. Safetensors only: mistral.rs cannot embed with a
    GGUF model.
    """
    spec = TinySpec(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    dest_dir = Path(dest_dir)
    write_tokenizer(dest_dir, vocab_size=vocab_size, chat_template=CHATML_TEMPLATE)
    vocab = build_tokenizer(vocab_size).get_vocab()
    _write_json(dest_dir / "config.json", _qwen3_config(spec, len(vocab)))
    weights = _qwen3_weights(spec, vocab, seed)
    del weights["lm_head.weight"]
    tensors = {name.removeprefix("model."): value for name, value in weights.items()}
    _save_safetensors(dest_dir / "model.safetensors", tensors)
    _write_json(
        dest_dir / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    (dest_dir / "1_Pooling").mkdir(exist_ok=True)
    _write_json(
        dest_dir / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    (dest_dir / "2_Normalize").mkdir(exist_ok=True)
    _write_json(
        dest_dir / "config_sentence_transformers.json",
        {"prompts": {"query": "", "document": ""}, "default_prompt_name": None},
    )
    return dest_dir


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

# Hugging Face name suffix -> GGUF name suffix, per layer. Qwen3 uses NEOX-style rotary
# embeddings, so unlike Llama no q/k permutation is needed.
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{index}.{_GGUF_LAYER_NAMES[module]}.weight"


def _tensor_qtype(gguf_name: str, quant: str) -> str:
    """Which GGML type a tensor gets; 1-D norm weights always stay F32, as llama.cpp keeps them."""
    if quant in _K_MIXES:
        base, sensitive = _K_MIXES[quant]
        important = ("attn_v", "ffn_down", "output.weight")
        return sensitive if any(key in gguf_name for key in important) else base
    return quant


# Byte offsets of the float16 scale fields in each K-quant block (256 values): `d` scales the
# quantised values, `dmin` (absent for the symmetric Q3_K and Q6_K) the block minimums.
_K_SCALE_FIELDS: dict[str, tuple[int, int | None]] = {
    "Q2_K": (80, 82),
    "Q3_K": (108, None),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208, None),
}


def _random_k_quant(shape: tuple[int, int], qtype: str, rng: np.random.Generator, silent_rows: list[int]) -> np.ndarray:
    """Synthesise valid random K-quant blocks, since the `gguf` package cannot quantise to them.

    Any bit pattern is a valid block once its float16 scales are finite, so the blocks are
    random bytes with `d` and `dmin` set afterwards: `dmin` cancels the mean the unsigned
    formats would otherwise have, then both are scaled so the values have a std of
    1/sqrt(fan_in), like the float weights. Rows in `silent_rows` get zero scales, i.e. all-zero
    weights. Checked with the package's `dequantize`.
    """
    ggml_type = GGMLQuantizationType[qtype]
    block_values, block_bytes = GGML_QUANT_SIZES[ggml_type]
    rows, cols = shape
    if cols % block_values:
        raise ValueError(f"{qtype} needs rows that are a multiple of {block_values}, got {cols}")
    blocks = rng.integers(0, 256, size=(rows, cols // block_values, block_bytes), dtype=np.uint8)
    d_at, dmin_at = _K_SCALE_FIELDS[qtype]

    def with_scales(d: float, dmin: float) -> np.ndarray:
        out = blocks.copy()
        out[..., d_at : d_at + 2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
        if dmin_at is not None:
            out[..., dmin_at : dmin_at + 2] = np.frombuffer(np.float16(dmin).tobytes(), dtype=np.uint8)
        return out.reshape(rows, -1)

    def values(packed: np.ndarray) -> np.ndarray:
        return quants.dequantize(packed, ggml_type)

    d, dmin = 1.0, 0.0
    if dmin_at is not None:
        # dequant = d * sc * q - dmin * m: pick the dmin/d ratio that zeroes the mean.
        dmin = float(values(with_scales(1.0, 0.0)).mean() / -values(with_scales(0.0, 1.0)).mean())
    unit = values(with_scales(d, dmin))
    factor = (1.0 / np.sqrt(cols)) / float(unit.std())
    packed = with_scales(d * factor, dmin * factor)
    if silent_rows:
        packed.reshape(rows, -1, block_bytes)[silent_rows, :, d_at : d_at + 2] = 0
        if dmin_at is not None:
            packed.reshape(rows, -1, block_bytes)[silent_rows, :, dmin_at : dmin_at + 2] = 0
    assert np.isfinite(values(packed)).all()
    return packed


def make_qwen3_gguf(
    dest: Path,
    *,
    quant: str = "F32",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    vocab_size: int = _DEFAULT_VOCAB,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Write a self-contained Qwen3 GGUF file and return its path.

    `dest` is the file to write, or an existing directory to write
    `tiny-qwen3-<quant>.gguf` into. Load it with
    `Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name)`: the engine
    needs the folder and the file name apart, and nothing but the file in that folder.

    The tokenizer lives in the metadata (`gpt2` model, `qwen2` pre-tokenizer, merges, token
    types with 3 = control for the special tokens, which would otherwise be split into bytes)
    together with the chat template, so no `tok_model_id` is needed.

    `quant` is one of `GGUF_QUANTS`:

    - F32, F16, BF16 and the legacy block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 hold the same
      seeded weights as `make_qwen3_safetensors`, quantised by the `gguf` package (row lengths
      must be multiples of 32: any hidden size that is).
    - The K-quants Q2_K..Q6_K and the Q4_K_M / Q5_K_M mixes (Q6_K for attn_v, ffn_down and
      output, as llama.cpp's `_M` presets do) hold different, synthesised random weights: the
      package cannot quantise to K formats. They need `hidden` to be a multiple of 256.
    """
    if quant not in GGUF_QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(GGUF_QUANTS)}")
    spec = TinySpec(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    spec.check()
    is_k = quant in _K_QUANTS or quant in _K_MIXES
    if is_k and hidden % 256:
        raise ValueError(f"{quant} needs hidden to be a multiple of 256, got {hidden}")
    if quant in _LEGACY_QUANTS and hidden % 32:
        raise ValueError(f"{quant} needs hidden to be a multiple of 32, got {hidden}")

    dest = Path(dest)
    path = dest / f"tiny-qwen3-{quant}.gguf" if dest.is_dir() else dest
    path.parent.mkdir(parents=True, exist_ok=True)

    vocab = build_tokenizer(vocab_size).get_vocab()
    writer = gguf.GGUFWriter(str(path), "qwen3")
    _add_model_metadata(writer, spec, quant)
    _add_tokenizer_metadata(writer, vocab_size, chat_template)
    _add_tensors(writer, _qwen3_weights(spec, vocab, seed), quant, seed, _silent_token_ids(vocab))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_model_metadata(writer: gguf.GGUFWriter, spec: TinySpec, quant: str) -> None:
    """Add the `qwen3.*` keys mistral.rs reads to size the model."""
    writer.add_name("tiny-qwen3")
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, vocab_size: int, chat_template: str | None) -> None:
    """Embed the tokenizer the way llama.cpp's converter writes Qwen's.

    The engine rebuilds a byte-level BPE from `tokens` and `merges`; special tokens must be
    typed CONTROL or they are split into bytes. GGUF requires a BOS id even though Qwen never
    prepends one (`add_bos_token` false).
    """
    vocab = build_tokenizer(vocab_size).get_vocab()
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda item: item[1])]
    bpe = json.loads(_tokenizer_json(vocab_size))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([int(TokenType.CONTROL if tok in SPECIAL_TOKENS else TokenType.NORMAL) for tok in tokens])
    writer.add_bos_token_id(vocab[PAD_TOKEN])
    writer.add_eos_token_id(vocab[EOS_TOKEN])
    writer.add_pad_token_id(vocab[PAD_TOKEN])
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _add_tensors(
    writer: gguf.GGUFWriter,
    weights: dict[str, np.ndarray],
    quant: str,
    seed: int,
    silent_ids: list[int],
) -> None:
    """Add every weight under its GGUF name, converted or quantised as `quant` asks."""
    # K-quant weights come from their own stream, so the other formats keep exactly the
    # safetensors weights whatever this branch draws.
    k_rng = np.random.default_rng([seed, 1])
    for hf_name, value in weights.items():
        name = _gguf_name(hf_name)
        if value.ndim == 1 or quant == "F32":
            writer.add_tensor(name, value)
            continue
        qtype = _tensor_qtype(name, quant)
        if qtype == "F16":
            writer.add_tensor(name, value.astype(np.float16))
        elif qtype in _K_QUANTS:
            rows = silent_ids if name == "output.weight" else []
            packed = _random_k_quant((value.shape[0], value.shape[1]), qtype, k_rng, rows)
            writer.add_tensor(name, packed, raw_dtype=GGMLQuantizationType[qtype])
        else:
            ggml_type = GGMLQuantizationType[qtype]
            writer.add_tensor(name, quants.quantize(value, ggml_type), raw_dtype=ggml_type)


def _file_type(quant: str) -> int:
    """`general.file_type`, informational only: loaders read each tensor's own type."""
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q3_K": "MOSTLY_Q3_K_M"}
    names |= {"Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}
    return int(LlamaFileType[names.get(quant, f"MOSTLY_{quant}")])


def make_uqff(source_dir: Path, dest_dir: Path, *, quant: str = "Q8_0") -> str:
    """Quantise a safetensors model folder into a UQFF file with the real engine; returns the file name.

    Runs in a child process so the test process never loads the engine. The engine writes the shard as
    ``<name>-0.uqff``, and that exact name is what ``from_uqff`` must be given.
    """
    import subprocess
    import sys

    dest_dir.mkdir(parents=True, exist_ok=True)
    script = (
        "import mistralrs as m\n"
        f"m.Runner(which=m.Which.Plain(model_id={str(source_dir)!r}, "
        f"write_uqff={str(dest_dir / 'tiny.uqff')!r}), in_situ_quant={quant!r})\n"
    )
    subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, env={**os.environ, "RUST_LOG": "error"}
    )
    return "tiny-0.uqff"
