"""A contiguous span of a model's layers, loaded alone, with a KV cache per request.

The skeleton is built on the meta device; only this span's tensors (plus the
embedding on the first stage and the final norm and head on the last) are read from
safetensors and assigned, so the process never holds any other layer. Layers the plan
marks as streamed stay on the meta device: a background thread reads their tensors
from disk just before they are needed, at most ``slots`` layers at a time, and they are
dropped again once used.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lime_mqtt.core.errors import ModelError
from lime_mqtt.model.adapter import DecoderAdapter, adapter_for
from lime_mqtt.model.checkpoint import Checkpoint

if TYPE_CHECKING:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """Layers ``[start, stop)``; ``embed``: holds the token embedding; ``head``: norm + head."""

    start: int
    stop: int
    embed: bool
    head: bool
    streamed: tuple[int, ...] = ()  # layers read from disk for every step
    slots: int = 2  # streamed layers in memory at once (one in use, the rest read ahead)

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"bad layer range [{self.start}, {self.stop})")
        if any(not self.start <= i < self.stop for i in self.streamed):
            raise ValueError(f"streamed layers {self.streamed} outside [{self.start}, {self.stop})")
        if self.streamed and self.slots < 1:
            raise ValueError("streaming needs at least one slot")


class LayerStream:
    """Reads streamed layers in the order a step uses them, ahead of time, in a thread.

    The reader cycles through the layers for ever; it takes a slot before reading a
    layer and the consumer gives it back after computing with it, so at most ``slots``
    layers are in memory. While the rest of the pipeline works on a token, the reader
    fills the free slots with the first layers of the next step (the cost model's
    read-ahead). If a step is abandoned half-way (an error), :meth:`take` skips layers
    until the one it asks for comes round again.
    """

    def __init__(self, checkpoint: Checkpoint, layer_keys: list[tuple[int, list[str]]], slots: int) -> None:
        self._checkpoint = checkpoint
        self._layers = layer_keys
        self._slots = threading.Semaphore(slots)
        self._ready: queue.Queue[tuple[int, dict[str, Any]] | BaseException] = queue.Queue()
        self._closed = threading.Event()
        self.bytes_read = 0
        self.wait_s = 0.0  # time the consumer waited for the disk
        self._thread = threading.Thread(target=self._read_ahead, name="lime-layer-stream", daemon=True)
        self._thread.start()

    def _read_ahead(self) -> None:
        while not self._closed.is_set():
            for index, keys in self._layers:
                while not self._slots.acquire(timeout=0.2):
                    if self._closed.is_set():
                        return
                if self._closed.is_set():
                    return
                try:
                    state = self._checkpoint.read(keys, drop_page_cache=True)
                except Exception as exc:  # handed to the consumer, which raises it in its step
                    self._ready.put(exc)
                    return
                self.bytes_read += sum(t.nbytes for t in state.values())
                self._ready.put((index, state))
                del state  # the slot's memory now belongs to the consumer

    def take(self, index: int) -> dict[str, Any]:
        """The tensors of layer ``index`` (blocks until read); call :meth:`release` after use."""
        started = time.perf_counter()
        try:
            for _ in range(2 * len(self._layers)):
                item = self._ready.get(timeout=120)
                if isinstance(item, BaseException):
                    raise ModelError(f"reading streamed layer {index} failed: {item}") from item
                if item[0] == index:
                    return item[1]
                self._slots.release()  # a layer of an abandoned step
        except queue.Empty:
            raise ModelError(f"streamed layer {index} was not read within 120 s") from None
        finally:
            self.wait_s += time.perf_counter() - started
        raise ModelError(f"layer {index} is not streamed by this shard")

    def release(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


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

    def __init__(
        self, checkpoint: Checkpoint, spec: ShardSpec, device: str = "cpu", layer_delay_ms: float = 0.0,
        random_weights: bool = False, stream: LayerStream | None = None,
    ) -> None:
        """``layer_delay_ms`` emulates a slower device (benchmarks): every layer of every
        step takes that much longer, as its measurement at start sees too.
        ``random_weights``: the layers get random values of the right shapes instead of
        the checkpoint's (for timing a layer on a device that does not have it).
        ``stream``: a reader shared with the device's other segments (an interleaved
        plan), which must read this shard's streamed layers; by default the shard reads
        its own."""
        if spec.stop > checkpoint.num_layers:
            raise ModelError(f"layer range stops at {spec.stop}, the model has {checkpoint.num_layers}")
        started = time.perf_counter()
        self.checkpoint = checkpoint
        self.spec = spec
        self.layer_delay_s = layer_delay_ms / 1000
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
        streamed_keys = []
        for offset, layer in enumerate(self.layers):
            prefix = self.adapter.layer_prefix(spec.start + offset)
            if random_weights:
                layer.to_empty(device="cpu")
                generator = torch.Generator().manual_seed(spec.start + offset)
                for parameter in layer.parameters():
                    parameter.data.normal_(0.0, 0.02, generator=generator)
                self.param_count += sum(p.numel() for p in layer.parameters())
            elif spec.start + offset in spec.streamed:
                streamed_keys.append((spec.start + offset, checkpoint.keys_with_prefix(prefix)))
            else:
                self.param_count += _load_module(layer, checkpoint, prefix)
        if self.embed is not None:
            self.param_count += _load_module(self.embed, checkpoint, self.adapter.embed_key.removesuffix("weight"))
        if self.norm is not None and self.head is not None:
            self.param_count += _load_module(self.norm, checkpoint, self.adapter.norm_prefix)
            head_key = self.adapter.head_source_key(self.config, set(checkpoint.tensors))
            weight = checkpoint.read([head_key])[head_key]
            self.head.load_state_dict({"weight": weight}, strict=True, assign=True)
            self.param_count += weight.numel()
        self.rotary = self.adapter.build_rotary(self.config)
        for offset, layer in enumerate(self.layers):
            if spec.start + offset not in spec.streamed:
                layer.to(self.device)
            layer.eval()
        for module in (self.embed, self.norm, self.head, self.rotary):
            if module is not None:
                module.to(self.device).eval()
        self._prefixes = {i: self.adapter.layer_prefix(i) for i in spec.streamed}
        self._own_stream = stream is None and bool(streamed_keys)
        self.stream = stream if stream is not None else (
            LayerStream(checkpoint, streamed_keys, spec.slots) if streamed_keys else None
        )
        log.info("loaded %r in %.2f s", self, time.perf_counter() - started)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Shard(layers=[{s.start}, {s.stop}), embed={s.embed}, head={s.head}, "
            f"streamed={len(s.streamed)}, params={self.param_count}, device={self.device})"
        )

    def set_streamed(self, streamed: tuple[int, ...], stream: LayerStream | None, slots: int) -> None:
        """Change, in place and between steps, which layers are read from disk (through
        ``stream``, the device's reader) and which are held; a layer no longer held gives
        its memory back. Results are the same bits either way."""
        old, new = set(self.spec.streamed), set(streamed)
        for index in sorted(new - old):
            offset = index - self.spec.start
            self.param_count -= sum(p.numel() for p in self.layers[offset].parameters())
            with torch.device("meta"):
                self.layers[offset] = self.adapter.build_layer(self.config, index).eval()
        for index in sorted(old - new):
            offset = index - self.spec.start
            self.param_count += _load_module(self.layers[offset], self.checkpoint, self.adapter.layer_prefix(index))
            self.layers[offset].to(self.device).eval()
        if self.stream is not None and self._own_stream:
            self.stream.close()
        self.spec = replace(self.spec, streamed=tuple(sorted(new)), slots=max(1, slots))
        self._prefixes = {i: self.adapter.layer_prefix(i) for i in self.spec.streamed}
        self.stream, self._own_stream = (stream if new else None), False

    def close(self) -> None:
        """Stop reading streamed layers (the shard is being replaced)."""
        if self.stream is not None and self._own_stream:
            self.stream.close()

    def batch_rows(self, max_batch: int) -> int:
        """The fewest rows from which every row count up to ``max_batch`` gives each row
        the same bits (probed once on this machine's kernels with this model's matrix
        shapes); :meth:`forward_batch` pads smaller batches to it."""
        if getattr(self, "_batch_floor", None) is None:
            self._batch_floor = stable_row_floor(self.config, max_batch, self.device)
        return self._batch_floor

    @torch.inference_mode()
    def forward_batch(
        self,
        caches: list[DynamicCache],  # one per sequence
        positions: list[int],
        rows: int,
        tokens: list[int] | None = None,
        hidden: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """One decode step (one new token) of several sequences at once.

        Every matrix product runs on ``rows`` rows (the ones beyond the sequences are
        zero padding), and attention runs per sequence on its own cache. CPU matrix
        kernels round differently for some row counts (here: 1, then 2-3, then 4 and
        more) but never let one row change another, so with ``rows`` at least
        :meth:`batch_rows` a sequence's result is the same bits whether it runs alone or
        with others. (They are not the bits of a one-row product, which is what
        :meth:`forward` computes, like transformers: within about 5e-5.) Returns, per
        sequence, its hidden state [1, 1, H] or, on the last stage, its logits [vocab].
        """
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        count = len(positions)
        if not 0 < count <= rows:
            raise ModelError(f"a batch of {count} sequences does not fit {rows} rows")
        if self.embed is not None:
            if tokens is None or len(tokens) != count:
                raise ModelError("the first stage needs one token id per sequence")
            ids = torch.tensor(tokens + [0] * (rows - count), dtype=torch.long, device=self.device).view(rows, 1)
            x = self.embed(ids)  # [rows, 1, H]
        else:
            if hidden is None or len(hidden) != count:
                raise ModelError("a later stage needs one hidden state per sequence")
            x = torch.zeros(rows, 1, self.config.hidden_size, dtype=hidden[0].dtype, device=self.device)
            for i, h in enumerate(hidden):
                x[i] = h.reshape(1, -1).to(self.device)
        for cache, pos in zip(caches, positions, strict=True):
            self._align_cache(cache, pos)
        position_ids = torch.tensor(positions + [0] * (rows - count), device=self.device).view(rows, 1)
        cos, sin = self.rotary(x, position_ids=position_ids)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)

        def run_layer(layer: Any, x: torch.Tensor) -> torch.Tensor:
            attn = layer.self_attn
            residual = x
            h = layer.input_layernorm(x)
            shape = (rows, 1, -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outputs = []
            for i, cache in enumerate(caches):
                keys, values = cache.update(k[i : i + 1], v[i : i + 1], attn.layer_idx)
                out, _ = attention(attn, q[i : i + 1], keys, values, None, dropout=0.0, scaling=attn.scaling)
                outputs.append(out.reshape(1, 1, -1))
            padding = torch.zeros(rows - count, 1, outputs[0].shape[-1], dtype=x.dtype, device=self.device)
            x = residual + attn.o_proj(torch.cat([*outputs, padding]).contiguous())
            residual = x
            return cast(torch.Tensor, residual + layer.mlp(layer.post_attention_layernorm(x)))

        for offset, layer in enumerate(self.layers):
            index = self.spec.start + offset
            if self.layer_delay_s:
                time.sleep(self.layer_delay_s)
            if self.stream is None or index not in self.spec.streamed:
                x = run_layer(layer, x)
                continue
            weights = self.stream.take(index)
            try:
                prefix = self._prefixes[index]
                state = {"layer." + k[len(prefix):]: v for k, v in weights.items()}
                x = torch.func.functional_call(_LayerCall(layer, run_layer), state, (x,), strict=False)
            finally:
                del weights
                self.stream.release()
        if self.norm is None or self.head is None:
            return [x[i : i + 1] for i in range(count)]
        logits = self.head(self.norm(x))[:, -1]  # [rows, vocab]
        return [logits[i] for i in range(count)]

    def _align_cache(self, cache: DynamicCache, pos: int) -> None:
        """Before a step at ``pos``: forget what a first attempt of a retried step stored."""
        seen = cache.get_seq_length(self.spec.start) if self.spec.start < self.spec.stop else pos
        if seen > pos:
            for index in range(self.spec.start, self.spec.stop):
                # the layers of a DynamicCache are DynamicLayer; its type says any cache layer
                cast("DynamicLayer", cache.layers[index]).crop(pos - seen)
        elif seen < pos:
            raise ModelError(f"step at position {pos} but the cache holds only {seen} tokens")

    def new_cache(self) -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(
        self,
        cache: DynamicCache,  # this request's
        pos: int,
        tokens: list[int] | None = None,
        hidden: torch.Tensor | None = None,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Run this span on one step of one request.

        Input: ``tokens`` (first stage) or ``hidden`` [1, S, H]. Output: hidden states
        [1, S, H], or, on the last stage, the logits of the last position [vocab] (``None``
        with ``logits=False``: a leading prefill chunk only fills the cache).
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
        self._align_cache(cache, pos)  # a retried step: forget what the first attempt stored
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
            arguments = {"attention_mask": mask, "position_embeddings": position_embeddings,
                         "position_ids": position_ids, "cache": cache, "use_cache": True}
            for offset, layer in enumerate(self.layers):
                index = self.spec.start + offset
                if self.layer_delay_s:
                    time.sleep(self.layer_delay_s)
                if self.stream is None or index not in self.spec.streamed:
                    x = layer(x, **arguments)
                    continue
                weights = self.stream.take(index)
                try:
                    x = torch.func.functional_call(layer, {k[len(self._prefixes[index]):]: v for k, v in
                                                          weights.items()}, (x,), arguments, strict=True)
                finally:
                    del weights
                    self.stream.release()
        if self.norm is None or self.head is None:
            return cast(torch.Tensor, x)  # the layers' output; nn.Module calls are typed Any
        if not logits:
            return None
        # Norm over all positions, then keep the last: the same order of operations as
        # transformers (a norm of the sliced row alone rounds differently).
        last = self.norm(x)[:, -1:, :]  # [1, 1, H]
        return cast(torch.Tensor, self.head(last)[0, -1])  # [vocab]


def stable_row_floor(config: Any, max_batch: int, device: torch.device) -> int:
    """The smallest row count ``m`` (at least 2) such that a matrix product gives each row
    the same bits for every row count from ``m`` to ``max_batch``, for the matrix shapes
    of this model's layers; ``max_batch`` if there is none. Random matrices, a few ms."""
    if max_batch <= 1:
        return 1
    generator = torch.Generator().manual_seed(0)
    hidden = int(config.hidden_size)
    inner = int(getattr(config, "intermediate_size", 4 * hidden))
    shapes = [(hidden, hidden), (inner, hidden), (hidden, inner)]
    floor = 2
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator).to(device)
        row = torch.randn(1, in_features, generator=generator).to(device)
        results = {}
        for count in range(2, max_batch + 1):
            batch = torch.randn(count, in_features, generator=generator).to(device)
            batch[0] = row[0]
            results[count] = torch.nn.functional.linear(batch, weight)[0]
        # the smallest m whose result every larger count up to max_batch repeats
        m = max_batch
        while m > 2 and torch.equal(results[m - 1], results[max_batch]):
            m -= 1
        floor = max(floor, m)
    return floor


class _LayerCall(nn.Module):
    """A streamed layer's batched step, as a module call (for ``functional_call``)."""

    def __init__(self, layer: nn.Module, run: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.layer = layer
        self._run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.layer, x)
