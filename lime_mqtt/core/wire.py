"""The CBOR wire format between stages (docs/wire-format.md).

Pure functions, no I/O. Tensors travel as ``{"dtype", "shape", "data"}`` with ``data``
the raw little-endian bytes, so float32, float16 and bfloat16 round-trip exactly.
Received bytes are only ever parsed as CBOR: never pickled, never ``torch.load``-ed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy
import torch

from lime_mqtt.core.errors import WireError

WIRE_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

KINDS = ("step", "token", "end")
# A prompt cut into n chunks is sent as steps -(n-1) .. -1 (no token comes of them), then
# step 0 (the last chunk, whose token is the first of the answer).
MAX_CHUNKS = 2**20


def tensor_to_wire(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as a CBOR-ready map: dtype name, shape, raw little-endian bytes."""
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise WireError(f"dtype {tensor.dtype} cannot travel on the wire")
    flat = tensor.detach().to("cpu").contiguous()
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    if sys.byteorder != "little":  # pragma: no cover - every supported device is little-endian
        raise WireError("big-endian hosts are not supported")
    return {"dtype": name, "shape": list(flat.shape), "data": data}


def tensor_from_wire(obj: Any) -> torch.Tensor:
    """Inverse of :func:`tensor_to_wire`; checks that shape and byte count agree."""
    if not isinstance(obj, dict):
        raise WireError("tensor must be a map")
    dtype = _DTYPES.get(obj.get("dtype"))  # type: ignore[arg-type]
    shape = obj.get("shape")
    data = obj.get("data")
    if dtype is None:
        raise WireError(f"unknown tensor dtype {obj.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WireError(f"bad tensor shape {shape!r}")
    if not isinstance(data, bytes):
        raise WireError("tensor data must be a byte string")
    count = 1
    for dim in shape:
        count *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise WireError(f"tensor data has {len(data)} bytes, shape {shape} needs {count * itemsize}")
    # A fresh, allocator-aligned tensor (not a view of the message buffer): CPU kernels
    # run slower paths on misaligned inputs.
    out = torch.empty(shape, dtype=dtype)
    if count:
        out.view(-1).view(torch.uint8).numpy()[:] = numpy.frombuffer(data, dtype=numpy.uint8)
    return out


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
        if not isinstance(obj, dict):
            raise WireError("sampling must be a map")
        try:
            return cls(float(obj["t"]), int(obj["k"]), float(obj["p"]), int(obj["s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"bad sampling parameters: {exc}") from exc


@dataclass(frozen=True)
class Envelope:
    """One message between pipeline parts.

    ``kind``: ``step`` (tokens or hidden states moving forward through the stages),
    ``token`` (the last stage's sampled token, to the coordinator) or ``end`` (free a
    request's state). ``pos`` is the position of the first token of this step.
    """

    kind: str
    request_id: str
    step: int
    epoch: int
    pos: int = 0
    tokens: list[int] | None = None
    hidden: torch.Tensor | None = None
    sampling: Sampling | None = None
    token: int | None = None
    logits: torch.Tensor | None = None
    want_logits: bool = False
    reply: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": WIRE_VERSION,
            "kind": self.kind,
            "rid": self.request_id,
            "step": self.step,
            "epoch": self.epoch,
            "pos": self.pos,
        }
        if self.tokens is not None:
            body["tokens"] = list(self.tokens)
        if self.hidden is not None:
            body["hidden"] = tensor_to_wire(self.hidden)
        if self.sampling is not None:
            body["sampling"] = self.sampling.to_wire()
        if self.token is not None:
            body["token"] = self.token
        if self.logits is not None:
            body["logits"] = tensor_to_wire(self.logits)
        if self.want_logits:
            body["want_logits"] = True
        if self.reply is not None:
            body["reply"] = self.reply
        if self.meta:
            body["meta"] = self.meta
        return cbor2.dumps(body)

    @classmethod
    def decode(cls, payload: bytes) -> Envelope:
        try:
            body = cbor2.loads(payload)
        except Exception as exc:  # cbor2 raises several types for garbage input
            raise WireError(f"not CBOR: {exc}") from exc
        if not isinstance(body, dict):
            raise WireError("envelope must be a CBOR map")
        if body.get("v") != WIRE_VERSION:
            raise WireError(f"unsupported wire version {body.get('v')!r}")
        kind = body.get("kind")
        if kind not in KINDS:
            raise WireError(f"unknown envelope kind {kind!r}")
        rid, step, epoch, pos = body.get("rid"), body.get("step"), body.get("epoch"), body.get("pos", 0)
        if not isinstance(rid, str) or not rid:
            raise WireError("envelope needs a request id")
        if not isinstance(step, int) or isinstance(step, bool) or not -MAX_CHUNKS <= step < 2**31:
            raise WireError(f"envelope step must be an integer from {-MAX_CHUNKS} (a leading prefill chunk)")
        for name, value in (("epoch", epoch), ("pos", pos)):
            if not isinstance(value, int) or value < 0:
                raise WireError(f"envelope {name} must be a non-negative integer")
        tokens = body.get("tokens")
        if tokens is not None and (
            not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens)
        ):
            raise WireError("tokens must be a list of non-negative integers")
        token = body.get("token")
        if token is not None and (not isinstance(token, int) or token < 0):
            raise WireError("token must be a non-negative integer")
        reply = body.get("reply")
        if reply is not None and (not isinstance(reply, str) or not reply or "+" in reply or "#" in reply):
            raise WireError("reply must be a topic name")
        meta = body.get("meta", {})
        if not isinstance(meta, dict):
            raise WireError("meta must be a map")
        return cls(
            kind=kind,
            request_id=rid,
            step=int(step),  # type: ignore[arg-type]  # checked above
            epoch=int(epoch),  # type: ignore[arg-type]
            pos=int(pos),
            tokens=tokens,
            hidden=tensor_from_wire(body["hidden"]) if "hidden" in body else None,
            sampling=Sampling.from_wire(body["sampling"]) if "sampling" in body else None,
            token=token,
            logits=tensor_from_wire(body["logits"]) if "logits" in body else None,
            want_logits=bool(body.get("want_logits", False)),
            reply=reply,
            meta=meta,
        )
