"""Per-architecture parts of a decoder-only model, behind one small adapter.

lime-mqtt runs transformers' own decoder-layer modules, so the math is exactly the
library's. What differs between families is only where the pieces live in the
checkpoint and which classes build them; a new family whose checkpoint follows the
common ``model.layers.{i}`` layout is one line in ``_FAMILIES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lime_mqtt.core.errors import ModelError

# model_type -> class-name prefix in transformers.models.<model_type>.modeling_<model_type>
_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}


@dataclass(frozen=True)
class DecoderAdapter:
    """Where each piece of a decoder-only checkpoint lives and how to build it."""

    model_type: str
    layer_cls: type[nn.Module]
    norm_cls: type[nn.Module]
    rotary_cls: type[nn.Module]
    embed_key: str = "model.embed_tokens.weight"
    norm_prefix: str = "model.norm."
    head_key: str = "lm_head.weight"

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def build_layer(self, config: Any, index: int) -> nn.Module:
        return self.layer_cls(config, index)

    def build_norm(self, config: Any) -> nn.Module:
        return self.norm_cls(config.hidden_size, eps=config.rms_norm_eps)

    def build_rotary(self, config: Any) -> nn.Module:
        # Rotary frequencies are computed, not stored: build them for real on the CPU.
        with torch.device("cpu"):
            return self.rotary_cls(config=config)

    def head_source_key(self, config: Any, keys: set[str]) -> str:
        """The checkpoint key of the output head (the embedding when weights are tied)."""
        if self.head_key in keys:
            return self.head_key
        if getattr(config, "tie_word_embeddings", False):
            return self.embed_key
        raise ModelError(f"checkpoint has no {self.head_key} and embeddings are not tied")


def adapter_for(config: Any) -> DecoderAdapter:
    """The adapter for ``config.model_type``, or a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    prefix = _FAMILIES.get(str(model_type))
    if prefix is None:
        supported = ", ".join(sorted(_FAMILIES))
        raise ModelError(f"model type {model_type!r} is not supported (supported: {supported})")
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return DecoderAdapter(
        model_type=str(model_type),
        layer_cls=getattr(module, f"{prefix}DecoderLayer"),
        norm_cls=getattr(module, f"{prefix}RMSNorm"),
        rotary_cls=getattr(module, f"{prefix}RotaryEmbedding"),
    )
