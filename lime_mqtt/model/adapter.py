"""What differs between the families of decoder-only models, as data.

The engine (:mod:`lime_mqtt.model.lean`) runs one forward pass for every family over
plain tensors; a family is the handful of choices below: where its tensors live in the
checkpoint, which norm it uses and where, its activation, whether queries and keys are
normed, fused projections, scaled embeddings, soft-capping and which layers attend
through a sliding window. Rotary frequencies come from transformers' own rotary
module for the family, so every RoPE variant it knows (scaling, partial rotary, a
local base for sliding layers) is computed by the library.

Supported: Llama (and SmolLM2), Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 (text).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lime_mqtt.core.errors import ModelError


@dataclass(frozen=True)
class Family:
    prefix: str  # class-name prefix in transformers.models.<module>.modeling_<module>
    module: str
    norm: str = "llama"  # "llama": w * x.to(dtype); "gemma": ((1 + w) * x) in float32, then dtype
    sandwich: bool = False  # norms after attention and around the MLP too (Gemma 2 and 3)
    qk_norm: bool = False  # queries and keys normed per head before RoPE (Qwen3, Gemma 3)
    fused: bool = False  # qkv_proj and gate_up_proj (Phi-3)
    activation: str = "silu"
    scaled_embedding: bool = False  # embeddings times sqrt(hidden) (Gemma)
    rotary_by_layer_type: bool = False  # one rotary table per layer type (Gemma 3)


_FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "llama"),
    "mistral": Family("Mistral", "mistral"),
    "qwen2": Family("Qwen2", "qwen2"),
    "qwen3": Family("Qwen3", "qwen3", qk_norm=True),
    "phi3": Family("Phi3", "phi3", fused=True),
    "gemma2": Family("Gemma2", "gemma2", norm="gemma", sandwich=True, activation="gelu_pytorch_tanh",
                     scaled_embedding=True),
    "gemma3_text": Family("Gemma3", "gemma3", norm="gemma", sandwich=True, qk_norm=True,
                          activation="gelu_pytorch_tanh", scaled_embedding=True, rotary_by_layer_type=True),
}


@dataclass(frozen=True)
class DecoderAdapter:
    """One model's family and the numbers of its config the forward pass needs."""

    model_type: str
    family: Family
    rotary_cls: type[nn.Module]
    layer_cls: type[nn.Module]  # transformers' decoder layer (its parameter shapes)
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scaling: float
    attn_softcap: float | None
    final_softcap: float | None
    layer_types: tuple[str, ...]  # "full_attention" or "sliding_attention", per layer
    sliding_window: int | None
    embed_key: str = "model.embed_tokens.weight"

    norm_prefix: str = "model.norm."
    head_key: str = "lm_head.weight"

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def window(self, index: int) -> int | None:
        """How many positions layer ``index`` attends to (itself included); None: all."""
        if self.layer_types[index] == "sliding_attention":
            return self.sliding_window
        return None

    def build_rotary(self, config: Any) -> nn.Module:
        # Rotary frequencies are computed, not stored: build them for real on the CPU.
        with torch.device("cpu"):
            return self.rotary_cls(config=config)

    def layer_shapes(self, config: Any, index: int) -> dict[str, tuple[int, ...]]:
        """The tensors of layer ``index`` (names after the layer prefix) and their shapes,
        from transformers' layer built on the meta device (no memory)."""
        with torch.device("meta"):
            layer = self.layer_cls(config, index)
        return {name: tuple(t.shape) for name, t in layer.state_dict().items()}

    def head_source_key(self, config: Any, keys: set[str]) -> str:
        """The checkpoint key of the output head (the embedding when weights are tied)."""
        if self.head_key in keys:
            return self.head_key
        if getattr(config, "tie_word_embeddings", False):
            return self.embed_key
        raise ModelError(f"checkpoint has no {self.head_key} and embeddings are not tied")


def supported_types() -> list[str]:
    return sorted(_FAMILIES)


def adapter_for(config: Any) -> DecoderAdapter:
    """The adapter for ``config.model_type``, or a clear error naming the supported ones."""
    model_type = str(getattr(config, "model_type", None))
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ModelError(f"model type {model_type!r} is not supported (supported: {', '.join(supported_types())})")
    module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    layers = int(config.num_hidden_layers)
    sliding = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral, Phi-3: the window, when set, is every layer's
        types = ["sliding_attention" if sliding else "full_attention"] * layers
    if len(types) != layers:
        raise ModelError(f"config has {len(types)} layer types for {layers} layers")
    pre_attn = getattr(config, "query_pre_attn_scalar", None)
    return DecoderAdapter(
        model_type=model_type,
        family=family,
        rotary_cls=getattr(module, f"{family.prefix}RotaryEmbedding"),
        layer_cls=getattr(module, f"{family.prefix}DecoderLayer"),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        eps=float(config.rms_norm_eps),
        scaling=float(pre_attn) ** -0.5 if pre_attn else head_dim**-0.5,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        layer_types=tuple(str(t) for t in types),
        sliding_window=int(sliding) if sliding else None,
    )
