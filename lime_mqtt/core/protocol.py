"""The JSON contract with clients (docs/topics.md): requests in, chunks and answers out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lime_mqtt.core.errors import RequestError
from lime_mqtt.core.messages import V1

MAX_STOP_STRINGS = 8
REQUEST_VERSION: Literal[1] = 1
# The largest request message: a long chat fits many times over; a broker's own limit may be lower.
MAX_REQUEST_BYTES = 1024 * 1024
MAX_PROMPT_CHARS = 512 * 1024
MAX_RESUMED_TOKENS = 1 << 20  # the tokens of an answer a resume may carry


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class Request(BaseModel):
    """What a factory system sends on the request topic."""

    model_config = ConfigDict(extra="ignore", strict=True)

    v: V1 = REQUEST_VERSION  # optional for clients; another version (or 1.0, or true) is refused
    id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^/+#\s]+$")
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(None, max_length=4096)
    max_tokens: int = Field(128, ge=1, le=1 << 20)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1 << 24)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list)
    stream: bool = True
    return_logits: bool = False
    deadline_s: float | None = Field(None, gt=0.0, le=86400.0)  # a whole answer within this, or a timeout error

    @model_validator(mode="before")
    @classmethod
    def _stop_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("reply_to" in data or "client" in data):
            raise ValueError("'reply_to' and 'client' are gone in topic layout 2: a client is the name its "
                             "request topic carries, and answers go to coordinator/+/to/client/{name}/answer/{id}")
        if isinstance(data, dict) and isinstance(data.get("stop"), str):
            data = {**data, "stop": [data["stop"]]}
        return data

    @model_validator(mode="after")
    def _one_input(self) -> Request:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt:
            raise ValueError("'prompt' is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ValueError(f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings")
        return self


@dataclass(frozen=True)
class Limits:
    """What a coordinator accepts from clients (``lime-mqtt coordinator --max-...``).

    ``max_request_bytes``: the largest request message (``request_too_large``);
    ``max_prompt_tokens``: the longest prompt after tokenizing (``prompt_too_long``; None:
    the model's context); ``client_rate`` and ``client_burst``: messages per second one
    client may send on its request topic, sustained and at once (``rate_limited``).
    """

    max_request_bytes: int = MAX_REQUEST_BYTES
    max_prompt_tokens: int | None = None
    client_rate: float = 32.0
    client_burst: int = 256

    def __post_init__(self) -> None:
        if self.max_request_bytes < 64 or (self.max_prompt_tokens is not None and self.max_prompt_tokens < 1):
            raise ValueError("max_request_bytes must be at least 64 and max_prompt_tokens at least 1")
        if self.client_rate <= 0 or self.client_burst < 1:
            raise ValueError("client_rate must be positive and client_burst at least 1")


def cancel_target(payload: bytes) -> str | None:
    """The id in a cancel message ``{"cancel": "<id>"}``, or ``None`` for anything else."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON (or too deep, or too long a number)
        return None
    if isinstance(data, dict) and set(data) <= {"cancel", "v"} and isinstance(data.get("cancel"), str):
        return str(data["cancel"]) or None
    return None


@dataclass(frozen=True)
class Resume:
    """``{"resume": "<id>", "after": n, "request": {...}, "token_ids": [...]}``: a client that
    lost its connection, or whose coordinator went away, asks for the messages of request
    ``id`` after chunk ``n`` again (-1: all of them). ``request``, if given, is served by a
    coordinator that never received it; with ``token_ids`` (the tokens of the chunks
    received) it continues the answer after them: their history is replayed, and chunks
    go on from ``n + 1``, with no gap and no repeat."""

    request_id: str
    after: int
    request: dict[str, Any] | None
    token_ids: tuple[int, ...] = ()


def resume_target(payload: bytes) -> Resume | None:
    """A resume message, or ``None`` for anything else."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON (or too deep, or too long a number)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("resume"), str) or not data["resume"]:
        return None
    after = data.get("after", -1)
    request = data.get("request")
    tokens = data.get("token_ids", [])
    if not isinstance(after, int) or isinstance(after, bool) or (request is not None and not isinstance(request, dict)):
        return None
    if not isinstance(tokens, list) or len(tokens) > MAX_RESUMED_TOKENS or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in tokens):
        return None
    return Resume(data["resume"], after, request, tuple(tokens))


def parse_request(payload: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    """Parse and validate a request, or raise :class:`RequestError` with a client-facing code."""
    if len(payload) > max_bytes:
        raise RequestError("request_too_large",
                           f"the request has {len(payload)} bytes; at most {max_bytes} are accepted")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # not JSON, too deep, or a number past the digit limit
        raise RequestError("invalid_json", f"request is not valid JSON: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(data, dict):
        raise RequestError("invalid_json", "request must be a JSON object")
    request_id = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        return Request.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
        )
        raise RequestError("invalid_request", problems, request_id) from exc


def queued_message(request_id: str, position: int, kv_tokens: int, kv_capacity: int) -> dict[str, Any]:
    """The request waits for KV-cache room; ``position`` 1 is next in line."""
    return {"type": "queued", "id": request_id, "position": position, "kv_tokens": kv_tokens,
            "kv_capacity": kv_capacity}


def chunk_message(request_id: str, index: int, text: str, token_ids: list[int]) -> dict[str, Any]:
    return {"type": "chunk", "id": request_id, "index": index, "text": text, "token_ids": token_ids}


def final_message(
    request_id: str,
    text: str,
    token_ids: list[int],
    finish_reason: str,
    prompt_tokens: int,
    timings: dict[str, float],
    logits: list[list[float]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "final",
        "id": request_id,
        "text": text,
        "token_ids": token_ids,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(token_ids),
            "total_tokens": prompt_tokens + len(token_ids),
        },
        "timings": timings,
    }
    if logits is not None:
        message["logits"] = logits
    return message


def error_message(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "id": request_id, "error": {"code": code, "message": message}}


def dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
