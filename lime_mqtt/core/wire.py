"""The CBOR wire format between stages (docs/wire-format.md).

Pure functions, no I/O. Tensors travel as ``{"dtype", "shape", "data"}`` with ``data``
the raw little-endian bytes, so float32, float16 and bfloat16 round-trip exactly.
Received bytes are only ever parsed as CBOR: never pickled, never ``torch.load``-ed.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import cbor2
import numpy
import torch

from lime_mqtt.core.errors import MessageError, WireError
from lime_mqtt.core.topics import valid_name

# Version 2: a stage error is an envelope kind of its own ("error"), no longer a token
# with an error in a "meta" map. Version 3 (topic layout 2): a step's "reply" names the
# coordinator to answer (one topic level), no longer a topic. Version 4: a step may carry
# a "chain" (the last stage sends the next decode step to the first stage itself).
WIRE_VERSION = 4
MAX_ENVELOPE_BYTES = 256 * 1024 * 1024  # the MQTT maximum; the broker may set a lower one
MAX_STEP_TOKENS = 1 << 20
MAX_POSITION = 1 << 24
MAX_ID_LENGTH = 128
MAX_CHAIN_STOP = 16  # stop token ids a chain carries

_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# The dtypes numpy has, by name: their bytes go through numpy alone, with fewer calls into
# torch (each costs tens of microseconds right after a forward pass has cooled the caches).
_NUMPY = {"f32": numpy.float32, "f16": numpy.float16, "i64": numpy.int64, "i32": numpy.int32}
_NUMPY_NAMES = {numpy.dtype(kind): name for name, kind in _NUMPY.items()}
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4}
_FLOATS = ("f32", "f16", "bf16")

# A prompt cut into n chunks is sent as steps -(n-1) .. -1 (no token comes of them), then
# step 0 (the last chunk, whose token is the first of the answer).
MAX_CHUNKS = 2**20


def tensor_to_wire(tensor: torch.Tensor | numpy.ndarray) -> dict[str, Any]:
    """A tensor (or a numpy array of a numpy dtype) as a CBOR-ready map: dtype name, shape,
    raw little-endian bytes."""
    if isinstance(tensor, numpy.ndarray):
        name = _NUMPY_NAMES.get(tensor.dtype)
        if name is None:
            raise WireError(f"dtype {tensor.dtype} cannot travel on the wire")
        return {"dtype": name, "shape": list(tensor.shape), "data": tensor.tobytes()}  # C order
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise WireError(f"dtype {tensor.dtype} cannot travel on the wire")
    if sys.byteorder != "little":  # pragma: no cover - every supported device is little-endian
        raise WireError("big-endian hosts are not supported")
    if name in _NUMPY and tensor.device.type == "cpu" and not tensor.requires_grad:
        return {"dtype": name, "shape": list(tensor.shape), "data": tensor.numpy().tobytes()}  # C order
    flat = tensor.detach().to("cpu").contiguous()
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"dtype": name, "shape": list(flat.shape), "data": data}


def tensor_from_wire(obj: Any) -> torch.Tensor:
    """Inverse of :func:`tensor_to_wire`; checks that shape and byte count agree."""
    return _tensor(*_tensor_parts(obj))


def _tensor_parts(obj: Any) -> tuple[str, list[int], bytes]:
    """A wire tensor's dtype name, shape and bytes, checked against each other (no torch
    call: right after a forward pass each costs tens of microseconds)."""
    if not isinstance(obj, dict):
        raise WireError("tensor must be a map")
    name, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(name, str) or name not in _DTYPES:
        raise WireError(f"unknown tensor dtype {str(name)[:32]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise WireError("a tensor shape must be a list of at most 8 dimensions, each from 0 to 2**40")
    if not isinstance(data, bytes):
        raise WireError("tensor data must be a byte string")
    count = 1
    for dim in shape:
        count *= dim
    if len(data) != count * _ITEMSIZE[name]:
        raise WireError(f"tensor data has {len(data)} bytes, shape {shape} needs {count * _ITEMSIZE[name]}")
    return name, shape, data


def _tensor(name: str, shape: list[int], data: bytes) -> torch.Tensor:
    if name in _NUMPY:
        return torch.from_numpy(_array(name, shape, data))
    out = torch.empty(shape, dtype=_DTYPES[name])
    if data:
        out.view(-1).view(torch.uint8).numpy()[:] = numpy.frombuffer(data, dtype=numpy.uint8)
    return out


def _array(name: str, shape: list[int], data: bytes) -> numpy.ndarray:
    # A fresh, aligned copy (not a view of the message buffer): CPU kernels run slower
    # paths on misaligned inputs, and the engine works in place on what it is given.
    return numpy.frombuffer(data, dtype=_NUMPY[name]).reshape(shape).copy()


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters the last stage needs. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.temperature, "k": self.top_k, "p": self.top_p, "s": self.seed}

    @classmethod
    def from_wire(cls, obj: Any) -> Sampling:
        if not isinstance(obj, dict) or set(obj) != {"t", "k", "p", "s"}:
            raise WireError("sampling must be a map of t, k, p and s")
        t, k, p, seed = obj["t"], obj["k"], obj["p"], obj["s"]
        numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (t, p))
        integers = all(isinstance(x, int) and not isinstance(x, bool) for x in (k, seed))
        if not (numbers and integers and 0.0 <= t <= 10.0 and 0.0 < p <= 1.0 and k >= 0 and 0 <= seed < 2**64):
            raise WireError("bad sampling parameters: t in [0, 10], k >= 0, p in (0, 1], s in [0, 2**64)")
        return cls(float(t), k, float(p), seed)


@dataclass(frozen=True)
class Chain:
    """The last stage, having chosen the token of step ``n``, sends step ``n + 1`` (that token,
    at the next position) straight to the first stage itself, as well as the token to the
    coordinator, while ``n + 1 < until`` and the token is not one of ``stop``: a decode step
    then crosses one hop fewer, and the coordinator's own work on a token (streaming it,
    stop strings) runs beside the next step instead of before it."""

    until: int  # the number of steps the request may have: no step this or later is started
    stop: tuple[int, ...] = ()  # token ids that end the request (end of sequence)

    def to_wire(self) -> dict[str, Any]:
        return {"u": self.until, "s": list(self.stop)}

    @classmethod
    def from_wire(cls, obj: Any) -> Chain:
        if not isinstance(obj, dict) or set(obj) != {"u", "s"}:
            raise WireError("chain must be a map of u and s")
        until, stop = obj["u"], obj["s"]
        if not isinstance(until, int) or isinstance(until, bool) or not 0 <= until < 2**31:
            raise WireError("chain u must be an integer in [0, 2**31)")
        if not isinstance(stop, list) or len(stop) > MAX_CHAIN_STOP or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in stop
        ):
            raise WireError(f"chain s must be a list of at most {MAX_CHAIN_STOP} token ids")
        return cls(until, tuple(stop))

    def follows(self, step: int, token: int) -> bool:
        """Whether the last stage starts step ``step + 1`` after choosing ``token`` at ``step``."""
        return step >= 0 and step + 1 < self.until and token not in self.stop


@dataclass(frozen=True)
class Step:
    """Tokens (first stage) or hidden states (the others) moving forward through the stages.

    ``pos`` is the position of the step's first token; ``step`` numbers the request's
    outputs (0 gives the first token; negative: a leading chunk of a prefill, which gives
    none). The last stage needs ``sampling`` and ``reply``, the name of the coordinator
    to send the token to; with ``chain`` it also starts the next decode step (:class:`Chain`).
    """

    request_id: str
    step: int
    epoch: int
    pos: int = 0
    tokens: list[int] | None = None
    # [1, S, H]; decoded from the wire, a numpy array (float32, float16) or a tensor (bfloat16)
    hidden: torch.Tensor | numpy.ndarray | None = None
    sampling: Sampling | None = None
    want_logits: bool = False
    reply: str | None = None
    chain: Chain | None = None

    kind: ClassVar[str] = "step"

    @property
    def width(self) -> int:
        """How many positions this step carries."""
        if self.tokens is not None:
            return len(self.tokens)
        return int(self.hidden.shape[1]) if self.hidden is not None and len(self.hidden.shape) == 3 else 1

    def encode(self) -> bytes:
        body = _head(self, self.step, self.epoch, self.pos)
        if self.tokens is not None:
            body["tokens"] = list(self.tokens)
        if self.hidden is not None:
            body["hidden"] = tensor_to_wire(self.hidden)
        if self.sampling is not None:
            body["sampling"] = self.sampling.to_wire()
        if self.want_logits:
            body["want_logits"] = True
        if self.reply is not None:
            body["reply"] = self.reply
        if self.chain is not None:
            body["chain"] = self.chain.to_wire()
        return cbor2.dumps(body)


@dataclass(frozen=True)
class Token:
    """The last stage's answer to a step: the token chosen (``None`` for a leading chunk)."""

    request_id: str
    step: int
    epoch: int
    pos: int = 0
    token: int | None = None
    logits: torch.Tensor | None = None  # [V], when the step asked for them

    kind: ClassVar[str] = "token"

    def encode(self) -> bytes:
        body = _head(self, self.step, self.epoch, self.pos)
        if self.token is not None:
            body["token"] = self.token
        if self.logits is not None:
            body["logits"] = tensor_to_wire(self.logits)
        return cbor2.dumps(body)


@dataclass(frozen=True)
class End:
    """Free a request's state (its KV cache) on every device (the control topic)."""

    request_id: str
    epoch: int

    kind: ClassVar[str] = "end"

    def encode(self) -> bytes:
        return cbor2.dumps(_head(self, 0, self.epoch, 0))


@dataclass(frozen=True)
class StageError:
    """A step a device could not run (a token id past the vocabulary, say), to the reply topic."""

    request_id: str
    step: int
    epoch: int
    device_id: str
    message: str

    kind: ClassVar[str] = "error"

    def encode(self) -> bytes:
        body = _head(self, self.step, self.epoch, 0)
        body["device_id"] = self.device_id
        body["message"] = (self.message or "error")[:4096]  # what the decoder accepts
        return cbor2.dumps(body)


Envelope = Step | Token | End | StageError
KINDS = ("step", "token", "end", "error")


def cbor_map(payload: bytes, max_bytes: int, what: str, error: type[MessageError]) -> dict[Any, Any]:
    """``payload`` as a CBOR map of at most ``max_bytes``, or ``error`` saying why not."""
    if len(payload) > max_bytes:
        raise error(f"{what} of {len(payload)} bytes is larger than the {max_bytes} allowed")
    stream = io.BytesIO(payload)
    try:
        body = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises several types for garbage input (and deep nesting)
        raise error(f"{what} that is not CBOR: {type(exc).__name__}") from None
    if stream.tell() != len(payload):
        raise error(f"{what} has {len(payload) - stream.tell()} bytes after its CBOR item")
    if not isinstance(body, dict):
        raise error(f"{what} must be a CBOR map")
    return body


def _head(envelope: Envelope, step: int, epoch: int, pos: int) -> dict[str, Any]:
    return {"v": WIRE_VERSION, "kind": envelope.kind, "rid": envelope.request_id, "step": step, "epoch": epoch,
            "pos": pos}


def _int(body: dict[Any, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise WireError(f"envelope {name} must be an integer in [{low}, {high})")
    return value


def _text(body: dict[Any, Any], name: str, max_length: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise WireError(f"envelope {name} must be a non-empty string of at most {max_length} characters")
    return value


def _hidden(obj: Any, hidden_size: int | None) -> torch.Tensor | numpy.ndarray:
    """Hidden states ``[1, S, H]`` of a float dtype, with ``H`` the plan's hidden size when
    known: a numpy array where numpy has the dtype (the engine takes them as they are, with
    no call into torch on a decode step's path, each of which costs tens of microseconds
    right after a forward pass has cooled the caches), else a tensor (bfloat16)."""
    name, shape, data = _tensor_parts(obj)
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 1:
        raise WireError(f"hidden states must have shape [1, S, H], not {shape}")
    if name not in _FLOATS:
        raise WireError(f"hidden states must be floating point, not {_DTYPES[name]}")
    if hidden_size is not None and shape[2] != hidden_size:
        raise WireError(f"hidden states are {shape[2]} wide, the model's hidden size is {hidden_size}")
    return _array(name, shape, data) if name in _NUMPY else _tensor(name, shape, data)


def decode_envelope(payload: bytes, *, hidden_size: int | None = None,
                    max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """One envelope, every field checked (:class:`WireError` otherwise): its size, the CBOR
    map, the version, the kind, ids and integer ranges, token ids, tensors (dtype, shape
    against the byte count, and the hidden size of the model when given), the reply topic."""
    try:
        return _decode_envelope(payload, hidden_size, max_bytes)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a library's limit (a 5000-digit int)
        raise WireError(f"a malformed envelope: {type(exc).__name__}") from None


def _decode_envelope(payload: bytes, hidden_size: int | None, max_bytes: int) -> Envelope:
    body = cbor_map(payload, max_bytes, "an envelope", WireError)
    version = body.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {str(version)[:16]!r} (this is version {WIRE_VERSION})")
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise WireError(f"unknown envelope kind {str(kind)[:16]!r}")
    rid = body.get("rid")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_LENGTH:
        raise WireError("envelope needs a request id")
    step = _int(body, "step", -MAX_CHUNKS, 2**31)
    epoch = _int(body, "epoch", 0, 2**63)
    pos = _int(body, "pos", 0, MAX_POSITION, default=0)
    if kind == "end":
        return End(rid, epoch)
    if kind == "error":
        return StageError(rid, step, epoch, _text(body, "device_id", 64), _text(body, "message", 4096))
    if kind == "token":
        token = body.get("token")
        if token is not None and (not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < 2**31):
            raise WireError("token must be a non-negative integer")
        logits = tensor_from_wire(body["logits"]) if "logits" in body else None
        if logits is not None and (logits.dim() != 1 or not logits.dtype.is_floating_point):
            raise WireError(f"logits must be one row of floats, not {list(logits.shape)} of {logits.dtype}")
        return Token(rid, step, epoch, pos, token, logits)
    tokens = body.get("tokens")
    if tokens is not None and (
        not isinstance(tokens, list) or not tokens or len(tokens) > MAX_STEP_TOKENS
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in tokens)
    ):
        raise WireError(f"tokens must be a list of 1 to {MAX_STEP_TOKENS} non-negative integers")
    hidden = _hidden(body["hidden"], hidden_size) if "hidden" in body else None
    if tokens is not None and hidden is not None:
        raise WireError("a step carries tokens or hidden states, not both")
    width = len(tokens) if tokens is not None else hidden.shape[1] if hidden is not None else 0
    if pos + width > MAX_POSITION:
        raise WireError(f"positions {pos} .. {pos + width} pass the limit of {MAX_POSITION}")
    reply = body.get("reply")
    if reply is not None and not (isinstance(reply, str) and valid_name(reply)):
        raise WireError("reply must be a coordinator's name (one topic level)")
    want_logits = body.get("want_logits", False)
    if not isinstance(want_logits, bool):
        raise WireError("want_logits must be true or false")
    sampling = Sampling.from_wire(body["sampling"]) if "sampling" in body else None
    chain = Chain.from_wire(body["chain"]) if "chain" in body else None
    return Step(rid, step, epoch, pos, tokens, hidden, sampling, want_logits, reply, chain)
