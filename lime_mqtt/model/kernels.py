"""The engine's own matrix kernels (``kernels.c``), built with this machine's C compiler.

``make setup`` builds them (``python -m lime_mqtt.model.kernels``); a process that finds
them missing builds them on first use, in about two seconds, into
``~/.cache/lime-mqtt/kernels`` (``LIME_MQTT_KERNELS``), keyed by the source's hash and
the compiler flags. Nothing is downloaded. They are loaded with
:mod:`ctypes`, and called on the memory of torch tensors without a copy.

Two things they do that torch's kernels do not:

- **Batch-invariant products.** Each output is summed in one fixed order whatever the
  number of rows, so a sequence's decode step gives the same bits alone or in any batch,
  and the weights are read once per call for all rows.
- **Quantized weights as they are.** A GGUF matrix stays in its blocks (Q8_0, Q4_0,
  Q4_1, Q4_K, Q6_K) and is dequantized in registers when used, to exactly the float32
  values gguf-py's ``dequantize`` gives; bfloat16 and float16 rows likewise.

How a one-row product (a decode step) reads its weights, one row at a time or six rows
side by side, is faster one way on some machines and the other way on others; both give
the same bits. On loading, :func:`choose_narrow_rows` times both on 64 MB of weights read
from memory (about 0.3 s) and keeps the faster; ``LIME_MQTT_NARROW_ROWS`` (``0``: six rows, ``2``: one row
for up to two rows of x) sets it instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lime_mqtt.core.errors import ModelError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11", "-pthread")

# GGML's type numbers, and (values, bytes) per block of each format.
FORMATS: dict[str, int] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14, "BF16": 30}
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
    "Q4_K": (256, 144), "Q6_K": (256, 210),
}
_TORCH_FORMATS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_LANES = 16  # padding of a row in kernels.c
_TILE = 6  # TILE_O in kernels.c

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def _library_path() -> Path:
    """``LIME_MQTT_KERNELS`` or ``~/.cache/lime-mqtt/kernels`` (code, not model data: shared
    by every model cache)."""
    root = os.environ.get("LIME_MQTT_KERNELS") or Path.home() / ".cache" / "lime-mqtt" / "kernels"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return Path(root) / f"lime_kernels-{digest}.so"


def build(force: bool = False) -> Path:
    """Compile ``kernels.c`` for this machine unless it is built already; returns the library."""
    path = _library_path()
    if path.is_file() and not force:
        return path
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ModelError("the engine's kernels need a C compiler (apt-get install gcc), and none was found")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=path.parent)
    os.close(fd)
    command = [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"]
    log.info("building the engine's kernels: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.unlink(tmp)
        raise ModelError(f"building {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr.strip()}")
    os.replace(tmp, path)  # atomic: a process racing this one loads either file whole
    return path


_threads = 0  # the thread count the kernels were last set to


def library() -> ctypes.CDLL:
    """The loaded kernels (built first if needed), using as many threads as torch does
    (``torch.set_num_threads``: a device's ``--threads``) for products of 2**18
    weights or more."""
    global _threads
    lib = _load()
    threads = torch.get_num_threads()
    if threads != _threads:
        _threads = lib.lime_set_threads(threads)
    return lib


def _load() -> ctypes.CDLL:
    global _library
    with _lock:
        if _library is None:
            lib = ctypes.CDLL(str(build()))
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.lime_linear.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr]
            lib.lime_linear.restype = ctypes.c_int
            lib.lime_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
            lib.lime_rows.restype = ctypes.c_int
            lib.lime_set_threads.argtypes = [ctypes.c_int]
            lib.lime_set_threads.restype = ctypes.c_int
            lib.lime_layer.argtypes = [ptr, ptr, i64, i64, ptr, ptr]
            lib.lime_layer.restype = ctypes.c_int
            lib.lime_layers.argtypes = [i64, ptr, ptr, ptr, ptr, ptr]
            lib.lime_layers.restype = ctypes.c_int
            lib.lime_rms_norm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
            lib.lime_rms_norm.restype = ctypes.c_int
            lib.lime_layer_work.argtypes = [ptr, i64, i64]
            lib.lime_layer_work.restype = i64
            lib.lime_set_narrow_rows.argtypes = [ctypes.c_int]
            lib.lime_set_narrow_rows.restype = ctypes.c_int
            lib.lime_flush.argtypes = [ptr, i64]
            lib.lime_flush.restype = ctypes.c_int
            choose_narrow_rows(lib)
            _library = lib
        return _library


NARROW_CHOICES = (0, 2)  # rows of x read one weight row at a time: never, or up to two
_PROBE_MATRICES, _PROBE_SIZE, _PROBE_ROUNDS = 16, 1024, 3


def choose_narrow_rows(lib: ctypes.CDLL) -> int:
    """Set how one- and two-row products read their weights (see the module's text):
    ``LIME_MQTT_NARROW_ROWS`` if set, else the faster of :data:`NARROW_CHOICES` on one-row
    products over 16 float32 matrices of 1024 x 1024, each sweep read from memory (the
    caches are emptied of them first: 64 MB fits some machines' last-level cache, and a
    decode step's weights come from memory), rounds interleaved, best of three. Returns
    the value set."""
    forced = os.environ.get("LIME_MQTT_NARROW_ROWS")
    if forced is not None:
        try:
            rows = int(forced)
        except ValueError:
            raise ModelError(f"LIME_MQTT_NARROW_ROWS={forced!r} is not a whole number") from None
        if rows < 0:
            raise ModelError(f"LIME_MQTT_NARROW_ROWS={forced!r} is negative")
        return int(lib.lime_set_narrow_rows(rows))
    global _threads
    n = _PROBE_SIZE
    weights = [torch.full((n, n), 0.5, dtype=torch.float32) for _ in range(_PROBE_MATRICES)]
    x = torch.ones(n, dtype=torch.float32)
    y, xpad, scratch = torch.empty(n), torch.empty(n), torch.empty(_TILE * n)
    lib.lime_set_threads(1)  # the probe times one thread's stream;
    _threads = 0  # and library() sets the real count again on its next call

    def sweep() -> float:
        for w in weights:  # from memory, as a decode step reads its weights: 64 MB may fit a cache
            lib.lime_flush(w.data_ptr(), w.numel() * 4)
        start = time.perf_counter()
        for w in weights:
            lib.lime_linear(FORMATS["F32"], w.data_ptr(), n * 4, n, n, x.data_ptr(), 1, y.data_ptr(),
                            xpad.data_ptr(), scratch.data_ptr())
        return time.perf_counter() - start

    best = {rows: float("inf") for rows in NARROW_CHOICES}
    for _ in range(_PROBE_ROUNDS + 1):  # the first round also warms up
        for rows in NARROW_CHOICES:
            lib.lime_set_narrow_rows(rows)
            best[rows] = min(best[rows], sweep())
    chosen = min(best, key=lambda rows: best[rows])
    log.info("one-row products: %s (%.1f ms against %.1f ms for 64 MB)",
             "one weight row at a time" if chosen else "six weight rows side by side", best[chosen] * 1e3,
             max(best.values()) * 1e3)
    return int(lib.lime_set_narrow_rows(chosen))


def set_narrow_rows(rows: int) -> int:
    """Set the rows of x up to which products read one weight row at a time (for tests and
    benchmarks; the bits are the same either way); returns the value before."""
    lib = _load()
    before = int(lib.lime_set_narrow_rows(-1))
    lib.lime_set_narrow_rows(rows)
    return before


class Matrix(ctypes.Structure):
    """``lime_matrix`` in kernels.c."""

    _fields_ = [("fmt", ctypes.c_int32), ("stride", ctypes.c_int64), ("data", ctypes.c_void_p),
                ("out", ctypes.c_int64), ("n", ctypes.c_int64), ("bias", ctypes.c_void_p)]


class LayerSpec(ctypes.Structure):
    """``lime_layer_t`` in kernels.c: one decoder layer's numbers, matrices and norms."""

    _fields_ = [
        ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64), ("rot", ctypes.c_int64),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
        ("sandwich", ctypes.c_int32), ("qk_norm", ctypes.c_int32), ("act", ctypes.c_int32),
        *((name, Matrix) for name in ("q", "k", "v", "o", "gate", "up", "down")),
        *((name, ctypes.c_void_p) for name in ("in_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm",
                                                "q_norm", "k_norm")),
    ]


class StepSpec(ctypes.Structure):
    """``lime_step_t`` in kernels.c: the rows of one step and where their caches are."""

    _fields_ = [("rows", ctypes.c_int64), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("kbase", ctypes.c_void_p), ("vbase", ctypes.c_void_p), ("stride", ctypes.c_void_p),
                ("layer_elems", ctypes.c_void_p), ("pos", ctypes.c_void_p)]


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix [out, n] in its own format: float rows, or GGUF blocks (uint8 rows)."""

    data: torch.Tensor  # [out, n] float, or [out, row bytes] uint8 for block formats
    fmt: str
    out: int
    n: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> PackedWeight:
        """A float matrix as it is (float32, bfloat16 or float16; no copy when contiguous)."""
        fmt = _TORCH_FORMATS.get(tensor.dtype)
        if fmt is None or tensor.dim() != 2:
            raise ModelError(f"no kernel for a {tensor.dtype} tensor of shape {tuple(tensor.shape)}")
        return cls(tensor.contiguous(), fmt, int(tensor.shape[0]), int(tensor.shape[1]))

    @classmethod
    def blocks(cls, raw: torch.Tensor, fmt: str, out: int, n: int) -> PackedWeight:
        """GGUF blocks of a matrix [out, n] (``raw``: its bytes, row after row)."""
        if fmt not in BLOCKS:
            raise ModelError(f"GGUF type {fmt} is not supported (supported: {', '.join(sorted(BLOCKS))})")
        values, size = BLOCKS[fmt]
        if n % values:
            raise ModelError(f"a {fmt} row of {n} values is not a whole number of {values}-value blocks")
        row = n // values * size
        if raw.dtype != torch.uint8 or raw.numel() != out * row:
            raise ModelError(f"{fmt} matrix [{out}, {n}] needs {out * row} bytes, got {raw.numel()}")
        return cls(raw.contiguous().view(out, row), fmt, out, n)

    @property
    def nbytes(self) -> int:
        return int(self.data.numel() * self.data.element_size())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a float matrix computes in; block formats give float32."""
        return self.data.dtype if self.fmt in ("F32", "F16", "BF16") else torch.float32

    def dense(self) -> torch.Tensor:
        """The whole matrix as float32 (the dequantized weights)."""
        return rows(self, torch.arange(self.out))

    def select(self, start: int, stop: int) -> PackedWeight:
        """Output rows ``[start, stop)`` (a view)."""
        return PackedWeight(self.data[start:stop], self.fmt, stop - start, self.n)

    def matrix(self, bias: torch.Tensor | None) -> Matrix:
        """This matrix (and a float32 ``bias``) as kernels.c reads it; keep both alive."""
        return Matrix(FORMATS[self.fmt], self.data.stride(0) * self.data.element_size(), self.data.data_ptr(),
                      self.out, self.n, 0 if bias is None else bias.data_ptr())


def linear(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x @ W.T`` for ``x`` [rows, n] (any float dtype; computed in float32), float32 out.

    Batch-invariant: row ``r``'s result does not depend on the other rows."""
    if x.dim() != 2 or x.shape[1] != weight.n:
        raise ModelError(f"input {tuple(x.shape)} does not fit a weight of width {weight.n}")
    x = x.to(torch.float32).contiguous()
    count = int(x.shape[0])
    padded = (weight.n + _LANES - 1) // _LANES * _LANES
    y = torch.empty(count, weight.out, dtype=torch.float32)
    xpad = torch.empty(count * padded, dtype=torch.float32)
    scratch = torch.empty(_TILE * padded, dtype=torch.float32)
    status = library().lime_linear(
        FORMATS[weight.fmt], weight.data.data_ptr(), weight.data.stride(0) * weight.data.element_size(),
        weight.out, weight.n, x.data_ptr(), count, y.data_ptr(), xpad.data_ptr(), scratch.data_ptr(),
    )
    if status != 0:
        raise ModelError(f"the {weight.fmt} kernel refused a [{weight.out}, {weight.n}] matrix")
    return y


def rms_norm_at(x: int, rows: int, n: int, weight: torch.Tensor, eps: float, y: int) -> None:
    """The RMS norm of ``rows`` float32 rows of ``n`` at address ``x`` into ``y`` (``x``
    itself allowed), times ``weight`` (float32 [n], contiguous): the arithmetic of the
    layers' norms in the kernels."""
    library().lime_rms_norm(x, rows, n, weight.data_ptr(), eps, y)


def rows(weight: PackedWeight, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of the matrix as float32 [len(index), n] (an embedding lookup)."""
    index = index.to(torch.int64).contiguous().view(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= weight.out):
        raise ModelError(f"row index out of range for a matrix of {weight.out} rows")
    out = torch.empty(index.numel(), weight.n, dtype=torch.float32)
    status = library().lime_rows(
        FORMATS[weight.fmt], weight.data.data_ptr(), weight.data.stride(0) * weight.data.element_size(),
        weight.n, index.data_ptr(), index.numel(), out.data_ptr(),
    )
    if status != 0:
        raise ModelError(f"the {weight.fmt} kernel refused a [{weight.out}, {weight.n}] matrix")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lime_mqtt.model.kernels [--force]``: build the kernels (the install step)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build(force="--force" in args)
    _load()
    log.info("kernels ready: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
