"""A contiguous span of a model's layers, loaded alone, with a KV cache per request.

The skeleton is built on the meta device; only this span's tensors (plus the
embedding on the first stage and the final norm and head on the last) are read from
safetensors and assigned, so the process never holds any other layer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from lime_mqtt.errors import ModelError
from lime_mqtt.model.adapter import DecoderAdapter, adapter_for
from lime_mqtt.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """Layers ``[start, stop)``; ``embed``: holds the token embedding; ``head``: norm + head."""

    start: int
    stop: int
    embed: bool
    head: bool

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"bad layer range [{self.start}, {self.stop})")


def import_runtime(checkpoint: Checkpoint) -> None:
    """Import all code a shard of this model runs, so that memory measured afterwards is data.

    Importing transformers' config and modelling modules costs about 100 MB here; a
    device measures its baseline after this and before any weight is read.
    """
    import transformers.masking_utils  # noqa: F401
    from transformers import DynamicCache  # noqa: F401

    adapter_for(checkpoint.config)


def _load_module(module: nn.Module, checkpoint: Checkpoint, prefix: str) -> int:
    """Assign ``module``'s parameters from the tensors under ``prefix``; strict. Returns numel."""
    keys = checkpoint.keys_with_prefix(prefix)
    state = {k[len(prefix):]: v for k, v in checkpoint.read(keys).items()}
    expected = set(module.state_dict().keys())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelError(f"{prefix}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    module.load_state_dict(state, strict=True, assign=True)
    return sum(t.numel() for t in state.values())


class Shard:
    """Runs layers ``[start, stop)`` of one model for many requests, each with its own cache."""

    def __init__(self, checkpoint: Checkpoint, spec: ShardSpec, device: str = "cpu") -> None:
        if spec.stop > checkpoint.num_layers:
            raise ModelError(f"layer range stops at {spec.stop}, the model has {checkpoint.num_layers}")
        started = time.perf_counter()
        self.checkpoint = checkpoint
        self.spec = spec
        self.device = torch.device(device)
        self.config = checkpoint.config
        self.adapter: DecoderAdapter = adapter_for(self.config)
        self.param_count = 0
        with torch.device("meta"):
            self.layers = nn.ModuleList(
                [self.adapter.build_layer(self.config, i) for i in range(spec.start, spec.stop)]
            )
            self.embed = nn.Embedding(self.config.vocab_size, self.config.hidden_size) if spec.embed else None
            self.norm = self.adapter.build_norm(self.config) if spec.head else None
            self.head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False) if spec.head else None
        for offset, layer in enumerate(self.layers):
            self.param_count += _load_module(layer, checkpoint, self.adapter.layer_prefix(spec.start + offset))
        if self.embed is not None:
            self.param_count += _load_module(self.embed, checkpoint, self.adapter.embed_key.removesuffix("weight"))
        if self.norm is not None and self.head is not None:
            self.param_count += _load_module(self.norm, checkpoint, self.adapter.norm_prefix)
            head_key = self.adapter.head_source_key(self.config, set(checkpoint.tensors))
            weight = checkpoint.read([head_key])[head_key]
            self.head.load_state_dict({"weight": weight}, strict=True, assign=True)
            self.param_count += weight.numel()
        self.rotary = self.adapter.build_rotary(self.config)
        for module in (self.layers, self.embed, self.norm, self.head, self.rotary):
            if module is not None:
                module.to(self.device).eval()
        log.info("loaded %r in %.2f s", self, time.perf_counter() - started)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Shard(layers=[{s.start}, {s.stop}), embed={s.embed}, head={s.head}, "
            f"params={self.param_count}, device={self.device})"
        )

    def new_cache(self):  # -> transformers.DynamicCache
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(
        self,
        cache,  # transformers.DynamicCache of this request
        pos: int,
        tokens: list[int] | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this span on one step of one request.

        Input: ``tokens`` (first stage) or ``hidden`` [1, S, H]. Output: hidden states
        [1, S, H], or, on the last stage, the logits of the last position [vocab].
        """
        from transformers.masking_utils import create_causal_mask

        if self.embed is not None:
            if tokens is None:
                raise ModelError("the first stage needs token ids")
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, S]
            x = self.embed(ids)  # [1, S, H]
        else:
            if hidden is None:
                raise ModelError("a later stage needs hidden states")
            x = hidden.to(self.device)
        seen = cache.get_seq_length(self.spec.start) if self.spec.start < self.spec.stop else pos
        if seen > pos:
            # A retried step: forget what the first attempt stored, then compute it again.
            for index in range(self.spec.start, self.spec.stop):
                cache.layers[index].crop(pos - seen)
        elif seen < pos:
            raise ModelError(f"step at position {pos} but the cache holds only {seen} tokens")
        if self.layers:
            position_ids = torch.arange(pos, pos + x.shape[1], device=self.device).unsqueeze(0)  # [1, S]
            if x.shape[1] == 1 and self.config._attn_implementation == "sdpa":
                mask = None  # what create_causal_mask returns for one new token under sdpa, minus its cost
            else:
                mask = create_causal_mask(
                    config=self.config,
                    inputs_embeds=x,
                    attention_mask=None,
                    cache=cache,
                    position_ids=position_ids,
                    layer_idx=self.spec.start,
                )
            position_embeddings = self.rotary(x, position_ids=position_ids)
            for layer in self.layers:
                x = layer(
                    x,
                    attention_mask=mask,
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                )
        if self.norm is None or self.head is None:
            return x
        # Norm over all positions, then keep the last: the same order of operations as
        # transformers (a norm of the sliced row alone rounds differently).
        last = self.norm(x)[:, -1:, :]  # [1, 1, H]
        return self.head(last)[0, -1]  # [vocab]
