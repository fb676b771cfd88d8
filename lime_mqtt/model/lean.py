"""The engine's forward pass over plain tensors, for every family in :mod:`.adapter`.

One step runs ``R`` rows: the new tokens of one or more sequences (a prompt chunk of one
sequence, or one token each of a batch). Each operation is the one transformers runs,
in the same order and dtype (norms in float32 where the family does, activations in the
model's dtype between operations), without its modules, masks and cache objects:

- **Projections** of float32 and GGUF-block matrices, up to :data:`KERNEL_ROWS` rows,
  run on the engine's own kernels (:mod:`.kernels`): the weights are read once for all
  rows, in their own format, with float32 sums, and each row's result is the same bits
  in any batch. Longer prompt chunks use torch's matrix products on the (dequantized)
  weights. bfloat16 and float16 matrices use torch's products (see :func:`project`).
- **float32 steps of up to :data:`KERNEL_ROWS` rows** (float32 or GGUF weights) run each
  layer in one kernel call (:func:`fused_layer`): norms, projections, RoPE, the cache
  write, attention of every row on its own sequence's cache, the MLP. A shard whose
  layers are all held runs all of them in one call (:class:`FusedLayers`).
- **Attention** otherwise (longer chunks; bfloat16 and float16 models) uses torch's
  attention per sequence as transformers calls it (see :func:`attention`).
  Sliding-window layers attend to their last ``window`` positions.
- **The KV cache** (:class:`KVCache`) is one buffer per sequence and shard, in the
  model's dtype, grown in steps.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lime_mqtt.core.errors import ModelError
from lime_mqtt.model import kernels
from lime_mqtt.model.adapter import DecoderAdapter
from lime_mqtt.model.kernels import PackedWeight

KERNEL_ROWS = 32  # rows up to which projections and attention run on the engine's kernels
_GROW = 64  # the cache grows by at least this many positions
WORK_AHEAD = 256  # positions of attention scores a kept step's work buffer has room for ahead


class KVCache:
    """Keys and values of one sequence for layers ``[start, start + layers)``.

    ``k``/``v``: [layers, kv_heads, capacity, head_dim] in the model's dtype; positions
    ``[0, length)`` are filled."""

    def __init__(self, start: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.start, self.layers, self.kv_heads, self.head_dim, self.dtype = start, layers, kv_heads, head_dim, dtype
        self.k = torch.empty(layers, kv_heads, 0, head_dim, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0
        self.fused: dict[str, FusedStep] = {}  # by layer kind: this sequence's last step (FusedStep.of)

    def __deepcopy__(self, memo: dict[int, Any]) -> KVCache:
        """A copy with buffers of its own, and no kept kernel step (one points into these)."""
        copied = KVCache(self.start, self.layers, self.kv_heads, self.head_dim, self.dtype)
        copied.k, copied.v, copied.length = self.k.clone(), self.v.clone(), self.length
        return copied

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    @property
    def nbytes(self) -> int:
        return 2 * int(self.k.numel()) * self.k.element_size()

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions (grows by a quarter or :data:`_GROW`, whichever is more)."""
        if total <= self.capacity:
            return
        capacity = max(total, self.capacity + max(_GROW, self.capacity // 4))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty(self.layers, self.kv_heads, capacity, self.head_dim, dtype=self.dtype)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on (a retried step)."""
        self.length = min(self.length, max(0, length))


@dataclass
class Rows:
    """The rows of one step: per sequence, its cache, first new position and row count;
    ``batched``: a batched decode step (every row's bits must not depend on the others)."""

    caches: list[KVCache]
    starts: list[int]
    counts: list[int]
    batched: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + c) for s, c in zip(self.starts, self.counts, strict=True)])


class LayerWeights:
    """One decoder layer's tensors, by role, from its state dict (keys after the layer prefix)."""

    def __init__(self, adapter: DecoderAdapter, state: dict[str, Any], dtype: torch.dtype) -> None:
        family = adapter.family
        self.dtype = dtype
        self._fused_built = False
        self._fused: kernels.LayerSpec | None = None

        def weight(key: str) -> PackedWeight:
            item = state.get(key)
            if item is None:
                raise ModelError(f"layer tensor {key} is missing")
            return item if isinstance(item, PackedWeight) else PackedWeight.of(item)

        def vector(key: str) -> torch.Tensor | None:
            item = state.get(key)
            if isinstance(item, PackedWeight):
                return item.dense().view(-1).to(dtype)
            return item

        q_size, kv_size = adapter.heads * adapter.head_dim, adapter.kv_heads * adapter.head_dim
        if family.fused:
            qkv = weight("self_attn.qkv_proj.weight")
            self.q, self.k, self.v = (qkv.select(0, q_size), qkv.select(q_size, q_size + kv_size),
                                      qkv.select(q_size + kv_size, q_size + 2 * kv_size))
            self.q_bias = self.k_bias = self.v_bias = None
            gate_up = weight("mlp.gate_up_proj.weight")
            half = gate_up.out // 2
            self.gate, self.up = gate_up.select(0, half), gate_up.select(half, gate_up.out)
        else:
            self.q, self.k, self.v = (weight(f"self_attn.{p}_proj.weight") for p in "qkv")
            self.q_bias, self.k_bias, self.v_bias = (vector(f"self_attn.{p}_proj.bias") for p in "qkv")
            self.gate, self.up = weight("mlp.gate_proj.weight"), weight("mlp.up_proj.weight")
        self.o, self.o_bias = weight("self_attn.o_proj.weight"), vector("self_attn.o_proj.bias")
        self.down, self.down_bias = weight("mlp.down_proj.weight"), vector("mlp.down_proj.bias")
        self.gate_bias = vector("mlp.gate_proj.bias")
        self.up_bias = vector("mlp.up_proj.bias")

        def norm(key: str) -> torch.Tensor:
            w = vector(key)
            if w is None:
                raise ModelError(f"layer tensor {key} is missing")
            return prepare_norm(adapter, w)

        self.input_norm = norm("input_layernorm.weight")
        self.post_attention_norm = norm("post_attention_layernorm.weight")
        if family.sandwich:
            self.pre_mlp_norm = norm("pre_feedforward_layernorm.weight")
            self.post_mlp_norm = norm("post_feedforward_layernorm.weight")
        if family.qk_norm:
            self.q_norm = norm("self_attn.q_norm.weight")
            self.k_norm = norm("self_attn.k_norm.weight")

    def fused(self, adapter: DecoderAdapter, rotary: int) -> kernels.LayerSpec | None:
        """The layer as :func:`fused_layer` runs it in one kernel call (float32 models whose
        matrices are all kernel formats), or None. Built once and kept."""
        if self._fused_built:
            return self._fused
        self._fused_built = True
        matrices = [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]
        if self.dtype != torch.float32 or any(m.fmt in ("BF16", "F16") for m in matrices) or \
                adapter.family.activation not in ("silu", "gelu_pytorch_tanh") or adapter.head_dim > 1024:
            return None
        biases = [self.q_bias, self.k_bias, self.v_bias, self.o_bias, self.gate_bias, self.up_bias, self.down_bias]
        self._keep = [b.to(torch.float32).contiguous() if b is not None else None for b in biases]
        family = adapter.family
        norms = [self.input_norm, self.post_attention_norm, getattr(self, "pre_mlp_norm", None),
                 getattr(self, "post_mlp_norm", None), getattr(self, "q_norm", None), getattr(self, "k_norm", None)]
        self._keep_norms = [n.to(torch.float32).contiguous() if n is not None else None for n in norms]
        spec = kernels.LayerSpec(
            self.q.n, adapter.heads, adapter.kv_heads, adapter.head_dim, self.gate.out, rotary,
            adapter.eps, adapter.scaling, adapter.attn_softcap or 0.0,
            int(family.sandwich), int(family.qk_norm), 0 if family.activation == "silu" else 1,
            *(m.matrix(b) for m, b in zip(matrices, self._keep, strict=True)),
            *(0 if n is None else n.data_ptr() for n in self._keep_norms),
        )
        self._fused = spec
        return spec

    @property
    def nbytes(self) -> int:
        total = 0
        for value in vars(self).values():
            if isinstance(value, PackedWeight):
                total += value.nbytes
            elif isinstance(value, torch.Tensor):
                total += int(value.numel()) * value.element_size()
        return total


def prepare_norm(adapter: DecoderAdapter, weight: torch.Tensor) -> torch.Tensor:
    """A norm's weight as the forward pass uses it (Gemma's ``1 + w`` in float32, once)."""
    if adapter.family.norm == "gemma":
        return 1.0 + weight.float()
    return weight


def rms_norm(adapter: DecoderAdapter, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The family's RMS norm over the last dimension (transformers' operations, in order)."""
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + adapter.eps)
    if adapter.family.norm == "gemma":
        return (normed * weight).type_as(x)
    return weight * normed.to(x.dtype)


def project(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, dtype: torch.dtype,
            batched: bool = False) -> torch.Tensor:
    """``x @ W.T + b`` for ``x`` [rows, n], in ``dtype``.

    bfloat16 and float16 matrices use torch's product, as transformers does: the same
    bits as transformers' (which half-precision greedy decoding needs, see
    :func:`attention`). Its kernels give every row the same bits for any count of two or
    more rows (checked at shapes up to 2048 wide), so a batched step (``batched``) pads a
    lone row to two. Other formats use the engine's kernels up to :data:`KERNEL_ROWS`
    rows, and torch's product of the (dequantized) matrix beyond."""
    if weight.fmt in ("BF16", "F16"):
        if batched and x.shape[0] == 1:
            return torch.nn.functional.linear(torch.cat([x, x]), weight.data, bias)[:1]
        return torch.nn.functional.linear(x, weight.data, bias)
    if x.shape[0] <= KERNEL_ROWS:
        y = kernels.linear(x, weight)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(dtype)
    dense = weight.data if weight.fmt == "F32" else weight.dense()
    return torch.nn.functional.linear(x.to(dense.dtype), dense, bias).to(dtype)


def activation(adapter: DecoderAdapter, x: torch.Tensor) -> torch.Tensor:
    if adapter.family.activation == "silu":
        return torch.nn.functional.silu(x)
    if adapter.family.activation == "gelu_pytorch_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    raise ModelError(f"activation {adapter.family.activation} is not supported")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [rows, heads, dim] with ``cos``/``sin`` [rows, 1, rotary dim] (partial if shorter)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    head, rest = x[..., :rotary], x[..., rotary:]
    return torch.cat([(head * cos) + (rotate_half(head) * sin), rest], dim=-1)


def attention(adapter: DecoderAdapter, q: torch.Tensor, rows: Rows, offset: int, window: int | None) -> torch.Tensor:
    """Attention of ``q`` [R, heads, dim] on each row's sequence (keys and values of
    layer ``offset`` already written), [R, heads * dim] in the model's dtype, per sequence
    as transformers computes it. (float32 steps of up to :data:`KERNEL_ROWS` rows run in
    :func:`fused_layer` instead, all sequences in one kernel call.) In bfloat16 and
    float16, torch's kernels round the attention weights to the model's dtype inside, and
    exactly that keeps half-precision answers identical to transformers': where two
    logits tie in bfloat16, one rounding apart changes the token."""
    parts, row = [], 0
    for cache, start, count in zip(rows.caches, rows.starts, rows.counts, strict=True):
        parts.append(_torch_attention(adapter, q[row : row + count], cache, start, offset, window))
        row += count
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _torch_attention(adapter: DecoderAdapter, q: torch.Tensor, cache: KVCache, start: int, offset: int,
                     window: int | None) -> torch.Tensor:
    """One sequence's rows, as transformers computes them: SDPA (a mask only where one is
    needed), or eager where the family soft-caps."""
    count = int(q.shape[0])
    total = start + count
    keys = cache.k[offset, :, :total].unsqueeze(0)  # [1, kv_heads, total, dim]
    values = cache.v[offset, :, :total].unsqueeze(0)
    query = q.transpose(0, 1).unsqueeze(0)  # [1, heads, count, dim]
    q_pos = torch.arange(start, total).view(-1, 1)
    kv_pos = torch.arange(total).view(1, -1)
    allowed = kv_pos <= q_pos
    windowed = window is not None and total > window
    if window is not None and windowed:
        allowed &= kv_pos > q_pos - window
    groups = adapter.heads // adapter.kv_heads
    if adapter.attn_softcap:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, keys.transpose(2, 3)) * adapter.scaling
        scores = torch.tanh(scores / adapter.attn_softcap) * adapter.attn_softcap
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, values)
    else:
        # transformers' masks: none for one new token without a window, a causal flag for
        # a first chunk without one, an explicit mask otherwise.
        mask = None if (count == 1 and not windowed) or (start == 0 and not windowed) else allowed
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=mask is None and count > 1,
            scale=adapter.scaling, enable_gqa=groups > 1,
        )
    return out[0].transpose(0, 1).reshape(count, -1)


def write_cache(rows: Rows, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the new keys and values ([R, kv_heads, dim]) of layer ``offset`` at their positions."""
    row = 0
    for cache, start, n in zip(rows.caches, rows.starts, rows.counts, strict=True):
        cache.k[offset, :, start : start + n] = k[row : row + n].transpose(0, 1)
        cache.v[offset, :, start : start + n] = v[row : row + n].transpose(0, 1)
        row += n


def layer_forward(adapter: DecoderAdapter, w: LayerWeights, x: torch.Tensor, rows: Rows, offset: int,
                  window: int | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One decoder layer on ``x`` [R, hidden] (the model's dtype)."""
    family, dtype, count = adapter.family, x.dtype, x.shape[0]
    residual = x
    h = rms_norm(adapter, x, w.input_norm)
    b = rows.batched
    q = project(h, w.q, w.q_bias, dtype, b).view(count, adapter.heads, adapter.head_dim)
    k = project(h, w.k, w.k_bias, dtype, b).view(count, adapter.kv_heads, adapter.head_dim)
    v = project(h, w.v, w.v_bias, dtype, b).view(count, adapter.kv_heads, adapter.head_dim)
    if family.qk_norm:
        q, k = rms_norm(adapter, q, w.q_norm), rms_norm(adapter, k, w.k_norm)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    write_cache(rows, offset, k, v)
    a = project(attention(adapter, q, rows, offset, window), w.o, w.o_bias, dtype, b)
    if family.sandwich:
        a = rms_norm(adapter, a, w.post_attention_norm)
    x = residual + a
    residual = x
    h = rms_norm(adapter, x, w.pre_mlp_norm if family.sandwich else w.post_attention_norm)
    gate = project(h, w.gate, w.gate_bias, dtype, b)
    up = project(h, w.up, w.up_bias, dtype, b)
    m = project(activation(adapter, gate) * up, w.down, w.down_bias, dtype, b)
    if family.sandwich:
        m = rms_norm(adapter, m, w.post_mlp_norm)
    return residual + m


class FusedStep:
    """One step's rows for :func:`fused_layer`: positions, rotary tables and cache addresses."""

    def __init__(self, rows: Rows, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = _float_rows(cos, rows.total), _float_rows(sin, rows.total)
        k_base, v_base, stride, elems, pos = [], [], [], [], []
        for cache, start, count in zip(rows.caches, rows.starts, rows.counts, strict=True):
            for p in range(start, start + count):
                k_base.append(cache.k.data_ptr())
                v_base.append(cache.v.data_ptr())
                stride.append(cache.capacity)
                elems.append(cache.kv_heads * cache.capacity * cache.head_dim)
                pos.append(p)
        pointers = ctypes.c_void_p * rows.total
        self._k, self._v = pointers(*k_base), pointers(*v_base)
        self._ints = np.array([stride, elems, pos], dtype=np.int64)  # three rows of R, C order
        self.longest = max(pos) + 1
        base, row = self._ints.ctypes.data, rows.total * 8
        self.spec = kernels.StepSpec(rows.total, self.cos.data_ptr(), self.sin.data_ptr(),
                                     ctypes.cast(self._k, ctypes.c_void_p), ctypes.cast(self._v, ctypes.c_void_p),
                                     base, base + row, base + 2 * row)
        self.work: torch.Tensor | None = None
        self.work_at = 0  # its address
        self.work_longest = 0  # the longest sequence ``work`` has room for
        self.cache_at = [(c.k.data_ptr(), c.v.data_ptr(), c.capacity) for c in rows.caches]

    @classmethod
    def of(cls, rows: Rows, kind: str, cos: torch.Tensor, sin: torch.Tensor) -> FusedStep:
        """The step for ``rows``. A lone sequence's one new row keeps its step on its cache
        from one decode step to the next: only the position and the rotary rows change
        (while the cache has not moved), which saves a dozen ctypes and numpy objects per
        step on every stage."""
        if rows.total != 1:
            return cls(rows, cos, sin)
        cache = rows.caches[0]
        step = cache.fused.get(kind)
        if step is None or step.cache_at != [(cache.k.data_ptr(), cache.v.data_ptr(), cache.capacity)]:
            step = cache.fused[kind] = cls(rows, cos, sin)
            return step
        step.cos, step.sin = _float_rows(cos, 1), _float_rows(sin, 1)
        step.spec.cos, step.spec.sin = step.cos.data_ptr(), step.sin.data_ptr()
        step._ints[2, 0] = rows.starts[0]
        step.longest = rows.starts[0] + 1
        return step


def _float_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """[R, rotary dim] in float32, row after row: what the kernel reads (a float32
    contiguous [R, 1, dim] table is that already, as Shard's memo keeps them)."""
    if table.dtype == torch.float32 and table.is_contiguous():
        return table
    return table.reshape(rows, -1).to(torch.float32).contiguous()


def _work_for(lib: ctypes.CDLL, spec: kernels.LayerSpec, step: FusedStep) -> int:
    """The address of ``step``'s work buffer, made (or grown) for layers like ``spec``
    (every layer of a kind has the same shapes)."""
    if step.work is None or step.work_longest < step.longest:
        step.work_longest = step.longest + WORK_AHEAD  # a step kept from one position to the next grows
        step.work = torch.empty(int(lib.lime_layer_work(ctypes.byref(spec), step.spec.rows, step.work_longest)),
                                dtype=torch.float32)
        step.work_at = step.work.data_ptr()
    return step.work_at


def fused_layer(spec: kernels.LayerSpec, step: FusedStep, x: torch.Tensor, offset: int,
                window: int | None) -> torch.Tensor:
    """One decoder layer in one kernel call, on ``x`` [R, hidden] float32 (in place)."""
    lib = kernels.library()
    work = _work_for(lib, spec, step)
    x = x.contiguous()
    if lib.lime_layer(ctypes.byref(spec), ctypes.byref(step.spec), offset, window or 0, x.data_ptr(), work) != 0:
        raise ModelError("the layer kernel refused this layer")
    return x


class FusedLayers:
    """All layers of a shard in one kernel call (``lime_layers``), for a shard whose layers
    are all in memory and all run fused: after a layer's weights have streamed through the
    caches, each call from Python into a layer (its torch and ctypes calls) costs tens of
    microseconds, once per layer and step. The same kernel runs each layer as
    :func:`fused_layer` does, so the bits are the same."""

    def __init__(self, specs: list[kernels.LayerSpec], kinds: list[str], windows: list[int | None]) -> None:
        count = len(specs)
        self.specs = specs  # kept alive: the arrays hold their addresses
        self.kinds = kinds
        self.count = count
        self._layers = (ctypes.c_void_p * count)(*(ctypes.addressof(spec) for spec in specs))
        self._windows = (ctypes.c_int64 * count)(*(window or 0 for window in windows))
        self._steps = (ctypes.c_void_p * count)()
        self._works = (ctypes.c_void_p * count)()
        self._first = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}  # each kind's first layer
        self._bound: dict[str, tuple[int, int]] = {}  # kind -> (step, work) addresses in the arrays now
        self._lock = threading.Lock()  # the arrays are written for each call

    @classmethod
    def of(cls, specs: list[kernels.LayerSpec | None], kinds: list[str],
           windows: list[int | None]) -> FusedLayers | None:
        """The layers as one call; None when one of them does not run fused, or when the
        layers of a kind differ in shape (one work buffer per kind must fit them all)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for spec, kind in zip(specs, kinds, strict=True):
            if spec is None:
                return None
            shape = (spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.inter)
            if shapes.setdefault(kind, shape) != shape:
                return None
        return cls(specs, kinds, windows) if specs else None  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"FusedLayers({self.count} layers, kinds={sorted(self._first)})"

    def run(self, steps: dict[str, FusedStep], x: torch.Tensor) -> torch.Tensor:
        """Every layer on ``x`` [R, hidden] float32 (in place); ``steps`` by layer kind."""
        x = x.contiguous()
        self.run_at(steps, x.data_ptr())
        return x

    def run_at(self, steps: dict[str, FusedStep], x: int) -> None:
        """:meth:`run` on the rows at address ``x`` (C order float32 [R, hidden], in place)."""
        lib = kernels.library()
        with self._lock:
            for kind, first in self._first.items():
                step = steps[kind]
                bound = (ctypes.addressof(step.spec), _work_for(lib, self.specs[first], step))
                if self._bound.get(kind) != bound:
                    for i, layer_kind in enumerate(self.kinds):
                        if layer_kind == kind:
                            self._steps[i], self._works[i] = bound
                    self._bound[kind] = bound
            refused = lib.lime_layers(self.count, self._layers, self._steps, self._windows, x, self._works)
        if refused:
            raise ModelError(f"the layer kernel refused layer {-1 - refused} of the shard")
