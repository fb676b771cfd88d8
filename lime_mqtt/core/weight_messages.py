"""Messages of weights through the broker (docs/wire-format.md#weights-through-the-broker).

Requests are JSON on ``device/{id}/weights``; replies are CBOR maps on
``{source}/to/device/{id}/weights/{tag}``: a manifest (the model's config and each
tensor's dtype, shape, size, file offset and sha256), a chunk of one tensor's bytes, or
an error. Each has one strict decoder that
raises :class:`~lime_mqtt.core.errors.BadWeightMessage` for anything malformed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lime_mqtt.core.errors import BadWeightMessage
from lime_mqtt.core.messages import V1, problems
from lime_mqtt.core.wire import cbor_map

WEIGHTS_VERSION = 1
CHUNK_BYTES = 1 << 20  # the tensor bytes in one chunk message
MAX_CHUNK_BYTES = 4 * CHUNK_BYTES  # the most a fetcher accepts in one
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024  # a manifest of a large model, or one chunk with its envelope
# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}

_CLIENT = re.compile(r"[^/+#\s\x00]{1,128}")


class _TensorEntry(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    dtype: str
    shape: list[int] = Field(max_length=8)
    nbytes: int = Field(ge=0)
    offset: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _size_matches_shape(self) -> _TensorEntry:
        itemsize = SAFETENSORS_DTYPE_BYTES.get(self.dtype)
        if itemsize is None:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if any(dim < 0 for dim in self.shape) or math.prod(self.shape) * itemsize != self.nbytes:
            raise ValueError(f"nbytes {self.nbytes} does not match shape {self.shape} of {self.dtype}")
        return self


class _Manifest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    v: V1
    model: str = Field(min_length=1, max_length=256)
    config: dict[str, Any]
    tensors: dict[str, _TensorEntry] = Field(max_length=1 << 20)

    @model_validator(mode="after")
    def _names_not_empty(self) -> _Manifest:
        if any(not name or len(name) > 1024 for name in self.tensors):
            raise ValueError("a tensor name is empty or longer than 1024 characters")
        return self


def check_manifest(obj: Any) -> dict[str, Any]:
    """``obj`` if it is a well-formed manifest, else :class:`BadWeightMessage`."""
    try:
        _Manifest.model_validate(obj)
    except ValidationError as exc:
        raise BadWeightMessage(f"malformed manifest: {problems(exc)}") from None
    manifest: dict[str, Any] = obj
    return manifest


class WeightRequest(BaseModel):
    """A JSON request on ``device/{id}/weights``; the source answers on
    ``{source}/to/device/{id}/weights/{reply}``."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    v: V1
    op: Literal["manifest", "tensor"]
    model: str = Field(min_length=1, max_length=256)
    reply: str = Field(min_length=1, max_length=128, pattern=r"^[^/+#\s]+$")  # the fetch's tag
    id: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, min_length=1, max_length=1024)
    offset: int = Field(0, ge=0)
    length: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _tensor_has_name(self) -> WeightRequest:
        if self.op == "tensor" and self.name is None:
            raise ValueError("a tensor request needs 'name'")
        return self


def decode_weights_request(payload: bytes) -> WeightRequest:
    """A request as received: at most ``MAX_REQUEST_BYTES`` of JSON, every field checked."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise BadWeightMessage(f"a weights request of {len(payload)} bytes is larger than {MAX_REQUEST_BYTES}")
    try:
        return WeightRequest.model_validate_json(payload)
    except ValidationError as exc:
        raise BadWeightMessage(f"bad weights request: {problems(exc)}") from None


def valid_client(client: str) -> bool:
    """A fetching client's name: one topic level, no wildcards or spaces, at most 128 characters."""
    return isinstance(client, str) and _CLIENT.fullmatch(client) is not None


@dataclass(frozen=True)
class ManifestReply:
    id: str
    manifest: dict[str, Any]  # checked by check_manifest

    kind = "manifest"


@dataclass(frozen=True)
class ChunkReply:
    id: str
    name: str
    offset: int
    total: int
    data: bytes

    kind = "chunk"


@dataclass(frozen=True)
class ErrorReply:
    id: str
    message: str

    kind = "error"


WeightReply = ManifestReply | ChunkReply | ErrorReply


def encode_reply(request_id: str, kind: str, **fields: Any) -> bytes:
    return cbor2.dumps({"v": WEIGHTS_VERSION, "id": request_id, "kind": kind, **fields})


def _field(body: dict[Any, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadWeightMessage(f"a weights reply's {name!r} is missing or of the wrong type")
    return value


def decode_weight_reply(payload: bytes) -> WeightReply:
    """A reply from a weight source, every field checked."""
    try:
        return _decode_weight_reply(payload)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a library's limit (a 5000-digit int)
        raise BadWeightMessage(f"a malformed weights reply: {type(exc).__name__}") from None


def _decode_weight_reply(payload: bytes) -> WeightReply:
    body = cbor_map(payload, MAX_REPLY_BYTES, "a weights reply", BadWeightMessage)
    if type(body.get("v")) is not int or body["v"] != WEIGHTS_VERSION:
        raise BadWeightMessage(f"a weights reply that is not a version {WEIGHTS_VERSION} map")
    request_id = _field(body, "id", str)
    kind = body.get("kind")
    if kind == "manifest":
        return ManifestReply(request_id, check_manifest(body.get("manifest")))
    if kind == "error":
        return ErrorReply(request_id, str(_field(body, "message", str))[:4096])
    if kind == "chunk":
        offset, total = _field(body, "offset", int), _field(body, "total", int)
        data = _field(body, "data", bytes)
        if offset < 0 or total < 0 or offset + len(data) > total or len(data) > MAX_CHUNK_BYTES:
            raise BadWeightMessage(f"a chunk of {len(data)} bytes at {offset} does not fit a tensor of {total}")
        return ChunkReply(request_id, _field(body, "name", str), offset, total, data)
    raise BadWeightMessage(f"a weights reply of unknown kind {kind!r}")
