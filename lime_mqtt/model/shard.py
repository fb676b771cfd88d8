"""A contiguous span of a model's layers, loaded alone, with a KV cache per request.

Only this span's tensors (plus the embedding on the first stage and the final norm and
head on the last) are read, so the process never holds any other layer; they stay in
the checkpoint's own format (float32, bfloat16, float16, or GGUF blocks). Layers the
plan marks as streamed are not held: a background thread reads their tensors from disk
just before they are needed, at most ``slots`` layers at a time, and they are dropped
again once used. The forward pass is :mod:`lime_mqtt.model.lean`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy
import torch

from lime_mqtt.core.errors import ModelError
from lime_mqtt.model import kernels
from lime_mqtt.model.adapter import DecoderAdapter, adapter_for
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.model.kernels import PackedWeight
from lime_mqtt.model.lean import (
    KERNEL_ROWS,
    FusedLayers,
    FusedStep,
    KVCache,
    LayerWeights,
    Rows,
    fused_layer,
    layer_forward,
    prepare_norm,
    project,
    rms_norm,
)

log = logging.getLogger(__name__)

# transformers' rotary types whose frequencies do not depend on the sequence's length
# ("dynamic" and "longrope" change with it): their rows can be kept by position.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ROTARY_MEMO_ROWS = 1 << 16  # positions (times layer kinds) kept; about 1 KB each
ROTARY_ROWS_AHEAD = 32  # positions made at once when one is missing


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
    """Import and load all code a shard of this model runs, so that memory measured
    afterwards is data: transformers' config and rotary modules (about 100 MB here) and
    the engine's kernels."""
    adapter_for(checkpoint.config)
    kernels.library()
    try:
        checkpoint.tensors  # noqa: B018  (the file headers: a GGUF file's parsed once, here)
    except ModelError:
        pass  # no tensors yet: they come over MQTT


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
        its own. ``device`` must be "cpu": the engine's kernels are CPU code."""
        if spec.stop > checkpoint.num_layers:
            raise ModelError(f"layer range stops at {spec.stop}, the model has {checkpoint.num_layers}")
        if torch.device(device).type != "cpu":
            raise ModelError(f"the engine runs on the CPU, not {device!r}")
        started = time.perf_counter()
        self.checkpoint = checkpoint
        self.spec = spec
        self.layer_delay_s = layer_delay_ms / 1000
        self.device = torch.device(device)
        self.config = checkpoint.config
        self.adapter: DecoderAdapter = adapter_for(self.config)
        self.dtype = checkpoint.compute_dtype
        self.param_count = 0
        self.layers: list[LayerWeights | None] = []
        streamed_keys = []
        for index in range(spec.start, spec.stop):
            if random_weights:  # shapes from the config: the device may have none of its tensors
                generator = torch.Generator().manual_seed(index)
                state = {name: torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(self.dtype)
                         for name, shape in self.adapter.layer_shapes(self.config, index).items()}
                self.layers.append(self._layer(state))
            elif index in spec.streamed:
                streamed_keys.append((index, checkpoint.keys_with_prefix(self.adapter.layer_prefix(index))))
                self.layers.append(None)
            else:
                self.layers.append(self._load_layer(index))
        self.embed: PackedWeight | None = None
        self.norm: torch.Tensor | None = None
        self.head: PackedWeight | None = None
        if spec.embed:
            self.embed = self._matrix(self.adapter.embed_key)
        if spec.head:
            norm_key = self.adapter.norm_prefix + "weight"
            norm = checkpoint.read([norm_key])[norm_key]
            self.norm = _vector(norm, self.dtype)
            self.param_count += int(norm.numel()) if isinstance(norm, torch.Tensor) else norm.out * norm.n
            head_key = self.adapter.head_source_key(self.config, set(checkpoint.tensors))
            tied = head_key == self.adapter.embed_key and self.embed is not None
            self.head = self.embed if tied else self._matrix(head_key)  # tied: one copy for both
        if self.norm is not None:
            self.norm = prepare_norm(self.adapter, self.norm)
        self._norm32 = self.norm.to(torch.float32).contiguous() if self.norm is not None else None  # _final_norm
        # A lone decode row's embedding, read as numpy (_lone_row): float32 rows only.
        self._embed_rows = self.embed.data.numpy() if self.embed is not None and self.embed.fmt == "F32" else None
        self._embed_scale = numpy.float32(self.config.hidden_size**0.5)  # scaled embeddings, in float32
        self._probe = torch.zeros(1, 1, self.config.hidden_size, dtype=self.dtype)  # what the rotary module sees
        self.rotary = self.adapter.build_rotary(self.config)
        # A decode step's rotary rows, by (layer kind, position): the same for every request,
        # so each is computed once (_rotary_tables); only where the frequencies do not depend
        # on the sequence's length.
        self._rotary_memo: dict[tuple[str | None, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rotary_static = getattr(self.rotary, "rope_type", None) in STATIC_ROPE_TYPES
        self._layer_kinds = sorted(set(self.adapter.layer_types[spec.start : spec.stop]))  # sliding, full, ...
        self._whole: FusedLayers | None = None  # all layers in one kernel call (_fused_whole)
        self._whole_built = False
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
            f"streamed={len(s.streamed)}, params={self.param_count}, dtype={self.dtype})"
        )

    # ----- weights ------------------------------------------------------------------------------

    def _layer(self, state: dict[str, Any]) -> LayerWeights:
        return LayerWeights(self.adapter, state, self.dtype)

    def _load_layer(self, index: int) -> LayerWeights:
        prefix = self.adapter.layer_prefix(index)
        keys = self.checkpoint.keys_with_prefix(prefix)
        if not keys:
            raise ModelError(f"the checkpoint has no tensors for layer {index} ({prefix}*)")
        state = {k[len(prefix):]: v for k, v in self.checkpoint.read(keys).items()}
        self.param_count += sum(_numel(v) for v in state.values())
        return self._layer(state)

    def _matrix(self, key: str) -> PackedWeight:
        item = self.checkpoint.read([key])[key]
        self.param_count += _numel(item)
        return item if isinstance(item, PackedWeight) else PackedWeight.of(item)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights this shard holds (streamed layers not counted)."""
        total = sum(layer.nbytes for layer in self.layers if layer is not None)
        for matrix in (self.embed, self.head):
            if matrix is not None:
                total += matrix.nbytes
        if self.embed is not None and self.head is not None and self.embed.data.data_ptr() == self.head.data.data_ptr():
            total -= self.head.nbytes
        if self.norm is not None:
            total += int(self.norm.numel()) * self.norm.element_size()
        return total

    @property
    def resident(self) -> bool:
        """Every layer in memory and no emulated delay: a step's time is its arithmetic."""
        return not self.spec.streamed and not self.layer_delay_s

    def formats(self) -> set[str]:
        """The formats of the matrices this shard holds (F32, BF16, F16, Q4_1, ...)."""
        found = {m.fmt for m in (self.embed, self.head) if m is not None}
        for layer in self.layers:
            if layer is not None:
                found |= {v.fmt for v in vars(layer).values() if isinstance(v, PackedWeight)}
        return found

    def set_streamed(self, streamed: tuple[int, ...], stream: LayerStream | None, slots: int) -> None:
        """Change, in place and between steps, which layers are read from disk (through
        ``stream``, the device's reader) and which are held; a layer no longer held gives
        its memory back. Results are the same bits either way."""
        old, new = set(self.spec.streamed), set(streamed)
        for index in sorted(new - old):
            offset = index - self.spec.start
            layer = self.layers[offset]
            if layer is not None:
                self.param_count -= sum(_numel(v) for v in vars(layer).values() if isinstance(v, (torch.Tensor,
                                                                                                    PackedWeight)))
            self.layers[offset] = None
        for index in sorted(old - new):
            self.layers[index - self.spec.start] = self._load_layer(index)
        if self.stream is not None and self._own_stream:
            self.stream.close()
        self._whole, self._whole_built = None, False  # the layers held changed
        self.spec = replace(self.spec, streamed=tuple(sorted(new)), slots=max(1, slots))
        self._prefixes = {i: self.adapter.layer_prefix(i) for i in self.spec.streamed}
        self.stream, self._own_stream = (stream if new else None), False

    def close(self) -> None:
        """Stop reading streamed layers (the shard is being replaced)."""
        if self.stream is not None and self._own_stream:
            self.stream.close()

    # ----- caches -------------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        a = self.adapter
        return KVCache(self.spec.start, self.spec.stop - self.spec.start, a.kv_heads, a.head_dim, self.dtype)

    def _align_cache(self, cache: KVCache, pos: int) -> None:
        """Before a step at ``pos``: forget what a first attempt of a retried step stored."""
        if self.spec.start == self.spec.stop:
            return
        seen = cache.get_seq_length()
        if seen > pos:
            cache.crop(pos)
        elif seen < pos:
            raise ModelError(f"step at position {pos} but the cache holds only {seen} tokens")

    # ----- forward passes -----------------------------------------------------------------------

    def batch_rows(self, max_batch: int) -> int:
        """Rows a batch is padded to: none, as every row count gives each row the same bits
        (the engine's kernels sum each output in one fixed order)."""
        return 1

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        if self.embed is None:
            raise ModelError("the first stage needs token ids")
        ids = torch.tensor(tokens, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.embed.out):
            raise ModelError(f"token id out of range [0, {self.embed.out})")
        if self.embed.fmt in ("F32", "F16", "BF16"):
            x = torch.nn.functional.embedding(ids, self.embed.data)
        else:
            x = kernels.rows(self.embed, ids).to(self.dtype)
        if self.adapter.family.scaled_embedding:
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def _make_room(self, rows: Rows) -> None:
        """Before a step: each cache cut back to the step's position and with room for its rows."""
        for cache, start, count in zip(rows.caches, rows.starts, rows.counts, strict=True):
            self._align_cache(cache, start)
            cache.reserve(start + count)

    @staticmethod
    def _filled(rows: Rows) -> None:
        """After a step: each cache holds its rows."""
        for cache, start, count in zip(rows.caches, rows.starts, rows.counts, strict=True):
            cache.length = start + count

    def _run(self, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        """All of this shard's layers on ``x`` [R, hidden]."""
        self._make_room(rows)
        if not self.layers:
            return x
        tables = self._rotary_tables(x.view(1, x.shape[0], -1), rows)
        fused = self.dtype == torch.float32 and rows.total <= KERNEL_ROWS
        steps = {kind: FusedStep.of(rows, kind, *table) for kind, table in tables.items()} if fused else {}
        if fused:
            x = x.to(torch.float32).clone()  # the kernel works in place
        whole = self._fused_whole(tables) if fused and not self.layer_delay_s else None
        x = whole.run(steps, x) if whole is not None else self._layer_by_layer(x, rows, tables, steps)
        self._filled(rows)
        return x

    def _layer_by_layer(self, x: torch.Tensor, rows: Rows, tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        steps: dict[str, FusedStep]) -> torch.Tensor:
        """Each layer in turn, held or streamed from disk; fused when ``steps`` are given."""
        fused = bool(steps)
        for offset in range(len(self.layers)):
            index = self.spec.start + offset
            if self.layer_delay_s:
                time.sleep(self.layer_delay_s)
            kind = self.adapter.layer_types[index]
            cos, sin = tables[kind]
            window = self.adapter.window(index)
            layer = self.layers[offset]
            if layer is not None:
                spec = layer.fused(self.adapter, int(cos.shape[-1])) if fused else None
                if spec is not None:
                    x = fused_layer(spec, steps[kind], x, offset, window)
                else:
                    x = layer_forward(self.adapter, layer, x, rows, offset, window, cos, sin)
                continue
            if self.stream is None:
                raise ModelError(f"layer {index} is streamed but no reader is set")
            weights = self.stream.take(index)
            try:
                prefix = self._prefixes[index]
                streamed = self._layer({k[len(prefix):]: v for k, v in weights.items()})
                spec = streamed.fused(self.adapter, int(cos.shape[-1])) if fused else None
                if spec is not None:
                    x = fused_layer(spec, steps[kind], x, offset, window)
                else:
                    x = layer_forward(self.adapter, streamed, x, rows, offset, window, cos, sin)
            finally:
                del weights
                self.stream.release()
        return x

    def _fused_whole(self, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> FusedLayers | None:
        """All of this shard's layers as one kernel call, made on the first fused step (the
        rotary widths are the same on every step); None: layer by layer."""
        if not self._whole_built:
            self._whole_built = True
            widths = {kind: int(cos.shape[-1]) for kind, (cos, _) in tables.items()}
            indexes = range(self.spec.start, self.spec.stop)
            kinds = [self.adapter.layer_types[index] for index in indexes]
            specs = [layer.fused(self.adapter, widths[kind]) if layer is not None else None
                     for layer, kind in zip(self.layers, kinds, strict=True)]
            self._whole = FusedLayers.of(specs, kinds, [self.adapter.window(index) for index in indexes])
        return self._whole

    def _rotary_tables(self, probe: torch.Tensor, rows: Rows) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer kind, the rotary cos and sin [R, 1, rotary dim] of the step's rows
        (``probe``: [1, R, hidden] of the compute dtype, for the rotary module).

        A decode step's (one new position per sequence) come from ``_rotary_memo``, each
        row made by the call that makes it without the memo (the rotary module on that one
        position, as transformers' decode step calls it): the same bits, without the
        module's half a dozen torch operations per step (about 0.2 ms on each stage, with
        the caches cold after the previous step's weights)."""
        by_kind = self.adapter.family.rotary_by_layer_type
        if self._rotary_static and all(count == 1 for count in rows.counts):
            made: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}  # one table unless by kind
            for kind in self._layer_kinds:
                key = kind if by_kind else None
                if key not in made:
                    parts = [self._rotary_row(probe, key, start) for start in rows.starts]
                    made[key] = parts[0] if len(parts) == 1 else (torch.cat([c for c, _ in parts]),
                                                                  torch.cat([s for _, s in parts]))
            return {kind: made[kind if by_kind else None] for kind in self._layer_kinds}
        positions = rows.positions().view(1, -1)
        shared = None if by_kind else self._rotary_call(probe, positions, None)
        tables = {}
        for kind in self._layer_kinds:
            cos, sin = shared if shared is not None else self._rotary_call(probe, positions, kind)
            tables[kind] = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # [R, 1, rotary dim]
        return tables

    def _rotary_row(self, probe: torch.Tensor, kind: str | None, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self._rotary_memo.get((kind, position))
        if row is not None:
            return row
        # The next positions too, each alone (the same bits), while the code is warm: the
        # sequence's next steps will want them.
        rows = {}
        for at in range(position, position + ROTARY_ROWS_AHEAD):
            cos, sin = self._rotary_call(probe[:, :1], torch.tensor([[at]]), kind)
            rows[(kind, at)] = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # [1, 1, rotary dim]
        if len(self._rotary_memo) < ROTARY_MEMO_ROWS:
            self._rotary_memo.update(rows)
        return rows[(kind, position)]

    def _rotary_call(self, probe: torch.Tensor, positions: torch.Tensor, kind: str | None) -> Any:
        return self.rotary(probe, positions) if kind is None else self.rotary(probe, positions, kind)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm of hidden states [R, hidden]: float32 ones by the kernels'
        norm (the arithmetic of the layers' own norms there: one C call, not half a dozen
        torch operations on the last stage's path), others as transformers computes it."""
        if x.dtype != torch.float32:
            if self.norm is None:
                raise ModelError("this shard has no head")
            return rms_norm(self.adapter, x, self.norm)
        x = x.contiguous()
        y = torch.empty_like(x)
        self._norm_rows(x.data_ptr(), int(x.shape[0]), y.data_ptr())
        return y

    def _norm_rows(self, x: int, rows: int, y: int) -> None:
        """The kernels' final norm of ``rows`` float32 rows at address ``x`` into ``y``."""
        if self._norm32 is None:
            raise ModelError("this shard has no head")
        kernels.rms_norm_at(x, rows, self.config.hidden_size, self._norm32, self.adapter.eps, y)

    def _lone_output(self, x: numpy.ndarray, batched: bool) -> torch.Tensor | numpy.ndarray:
        """What a lone row from :meth:`_lone_row` gives: its hidden state [1, 1, H], or on the
        last stage its logits [vocab] (normed in place first)."""
        if self.head is None:
            return x.reshape(1, 1, -1)
        self._norm_rows(x.ctypes.data, 1, x.ctypes.data)
        return self._logits(torch.from_numpy(x), batched)[0]

    def _logits(self, x: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] of final hidden states ``x`` [rows, hidden]."""
        if self.norm is None or self.head is None:
            raise ModelError("this shard has no head")
        logits = project(x, self.head, None, self.dtype, batched)
        cap = self.adapter.final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward_batch(
        self,
        caches: list[KVCache],  # one per sequence
        positions: list[int],
        rows: int,
        tokens: list[int] | None = None,
        hidden: list[torch.Tensor | numpy.ndarray] | None = None,
    ) -> list[torch.Tensor | numpy.ndarray]:
        """One decode step (one new token) of several sequences at once, each on its own
        cache: one matrix product per weight for all of them, and each sequence's result
        the same bits as alone (``rows`` is kept for callers; no padding is needed).
        Returns, per sequence, its hidden state [1, 1, H] (a numpy array from the one-call
        path of a lone sequence, else a tensor) or, on the last stage, its logits [vocab]."""
        count = len(positions)
        if not 0 < count <= KERNEL_ROWS:
            raise ModelError(f"a batch of {count} sequences is not in [1, {KERNEL_ROWS}]")
        if self.embed is not None:
            if tokens is None or len(tokens) != count:
                raise ModelError("the first stage needs one token id per sequence")
        elif hidden is None or len(hidden) != count:
            raise ModelError("a later stage needs one hidden state per sequence")
        lone = self._lone_row(caches[0], positions[0], tokens, hidden[0] if hidden else None) if count == 1 else None
        if lone is not None:
            return [self._lone_output(lone, batched=True)]
        return self._forward_rows(caches, positions, tokens, hidden)

    @torch.inference_mode()
    def _forward_rows(self, caches: list[KVCache], positions: list[int], tokens: list[int] | None,
                      hidden: list[torch.Tensor | numpy.ndarray] | None) -> list[torch.Tensor | numpy.ndarray]:
        """:meth:`forward_batch` through :meth:`_run` (torch's inference mode, which the
        path of a lone row does without: entering and leaving it costs 50 us with cold
        caches)."""
        count = len(positions)
        if self.embed is not None:
            x = self._embed(tokens)  # type: ignore[arg-type]
        else:
            assert hidden is not None
            # One sequence: its own tensor (_run copies it before the kernel works in place).
            parts = [_tensor(h).reshape(1, -1) for h in hidden]
            x = (parts[0] if count == 1 else torch.cat(parts)).to(self.dtype)
        x = self._run(x, Rows(caches, positions, [1] * count, batched=True))
        if self.head is None or self.norm is None:
            return [x[i : i + 1].view(1, 1, -1) for i in range(count)]
        logits = self._logits(self._final_norm(x), batched=True)
        return [logits[i] for i in range(count)]

    def _lone_row(self, cache: KVCache, pos: int, tokens: list[int] | None, hidden: Any) -> numpy.ndarray | None:
        """One row (a decode step of one sequence) through all of this shard's layers in one
        kernel call, on a numpy array [1, hidden] from its input to its output: the same
        bits as :meth:`_run`, without the dozen torch calls around the kernel, each of which
        costs tens of microseconds on every stage, its caches cold after the previous
        step's weights (docs/benchmarks.md). None when the shard does not run that way (not
        float32, a layer streamed or not fused, layers slowed down, or before its first
        fused step has made the one-call layers)."""
        whole = self._whole
        if whole is None or self.layer_delay_s:
            return None
        x = self._first_row(tokens) if self.embed is not None else _fresh_row(hidden)
        if x.shape != (1, self.config.hidden_size):
            raise ModelError(f"a hidden state of {x.size} values; the model's hidden size is {self.config.hidden_size}")
        rows = Rows([cache], [pos], [1], batched=True)
        self._make_room(rows)
        tables = self._rotary_tables(self._probe, rows)
        whole.run_at({kind: FusedStep.of(rows, kind, *table) for kind, table in tables.items()}, x.ctypes.data)
        self._filled(rows)
        return x

    def _first_row(self, tokens: list[int] | None) -> numpy.ndarray:
        """A lone token's embedding, a new float32 array [1, hidden] (scaled as the family
        scales it, in float32 as transformers does)."""
        if tokens is None or len(tokens) != 1:
            raise ModelError("the first stage needs one token id")
        assert self.embed is not None
        token = tokens[0]
        if self._embed_rows is None:
            return self._embed(tokens).to(torch.float32).numpy()  # a new tensor: the kernel may write to it
        if not 0 <= token < self.embed.out:
            raise ModelError(f"token id out of range [0, {self.embed.out})")
        x = self._embed_rows[token : token + 1].copy()
        if self.adapter.family.scaled_embedding:
            x *= self._embed_scale
        return x

    def forward(
        self,
        cache: KVCache,  # this request's
        pos: int,
        tokens: list[int] | None = None,
        hidden: torch.Tensor | numpy.ndarray | None = None,
        logits: bool = True,
    ) -> torch.Tensor | numpy.ndarray | None:
        """Run this span on one step of one request.

        Input: ``tokens`` (first stage) or ``hidden`` [1, S, H]. Output: hidden states
        [1, S, H] (a numpy array from the one-call path of one row), or, on the last stage,
        the logits of the last position [vocab] (``None`` with ``logits=False``: a leading
        prefill chunk only fills the cache).
        """
        if self.embed is not None:
            if tokens is None:
                raise ModelError("the first stage needs token ids")
            lone = self._lone_row(cache, pos, tokens, None) if len(tokens) == 1 else None
        else:
            if hidden is None:
                raise ModelError("a later stage needs hidden states")
            lone = self._lone_row(cache, pos, None, hidden) if hidden.shape[-2:-1] == (1,) else None
        if lone is not None:
            return self._lone_output(lone, batched=False) if logits or self.head is None else None
        return self._forward_span(cache, pos, tokens, hidden, logits)

    @torch.inference_mode()
    def _forward_span(self, cache: KVCache, pos: int, tokens: list[int] | None,
                      hidden: torch.Tensor | numpy.ndarray | None, logits: bool) -> torch.Tensor | None:
        """:meth:`forward` through :meth:`_run`, in torch's inference mode."""
        if self.embed is not None:
            x = self._embed(tokens)  # type: ignore[arg-type]
        else:
            assert hidden is not None
            x = _tensor(hidden)
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        count = int(x.shape[0])
        if count == 0:
            raise ModelError("a step needs at least one token")
        x = self._run(x, Rows([cache], [pos], [count]))
        if self.norm is None or self.head is None:
            return x.view(1, count, -1)
        if not logits:
            return None
        # Norm over all positions, then keep the last, as transformers does.
        last = self._final_norm(x)[-1:]
        return self._logits(last)[0]


def _tensor(hidden: torch.Tensor | numpy.ndarray) -> torch.Tensor:
    """Hidden states as a tensor (the wire gives numpy arrays, sharing their memory)."""
    return torch.from_numpy(hidden) if isinstance(hidden, numpy.ndarray) else hidden


def _fresh_row(hidden: torch.Tensor | numpy.ndarray) -> numpy.ndarray:
    """One hidden state as a new float32 array [1, hidden], which the kernel may write to."""
    if isinstance(hidden, torch.Tensor):
        hidden = hidden.detach().to(torch.float32).numpy()
    return numpy.array(hidden, dtype=numpy.float32).reshape(1, -1)


def _numel(item: Any) -> int:
    if isinstance(item, PackedWeight):
        return item.out * item.n
    return int(item.numel())


def _vector(item: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(item, PackedWeight):
        return item.dense().view(-1).to(dtype)
    return item  # type: ignore[no-any-return]
