"""OpenAI's request and response shapes, and how they map onto lime-mqtt's (docs/http.md).

Pure functions: an OpenAI ``/v1/chat/completions`` or ``/v1/completions`` body becomes a
lime-mqtt request (core/protocol.py), and the cluster's chunks and final answer become
OpenAI's objects and stream events. What OpenAI has and lime-mqtt does not (``n`` > 1,
``logprobs``, ``echo``, tools) is refused with a 400, never ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lime_mqtt.core.protocol import MAX_STOP_STRINGS

Kind = Literal["chat", "completion"]


class ApiError(Exception):
    """An error as OpenAI clients expect it: an HTTP status and ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# lime-mqtt's error codes (docs/topics.md) as HTTP statuses and OpenAI error types.
LIME_ERRORS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "prompt_too_long": (400, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "overloaded": (503, "server_error"),
    "no_devices": (503, "server_error"),
    "timeout": (504, "server_error"),
    "deadline_exceeded": (504, "server_error"),
    "cancelled": (499, "invalid_request_error"),
}


def from_lime_error(error: dict[str, Any]) -> ApiError:
    """A lime-mqtt error message's ``error`` object as an :class:`ApiError`."""
    code = str(error.get("code") or "internal_error")
    status, type_ = LIME_ERRORS.get(code, (500, "server_error"))
    code = "context_length_exceeded" if code == "prompt_too_long" else code
    return ApiError(status, str(error.get("message") or code), type_, code)


class _Content(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Content]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _Common(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value


class ChatBody(_Common):
    messages: list[_Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None


class CompletionBody(_Common):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


@dataclass(frozen=True)
class Call:
    """One OpenAI call, ready to go to the cluster."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    request: dict[str, Any]  # the lime-mqtt request
    id: str
    created: int


def parse_call(kind: Kind, body: object) -> Call:
    """An OpenAI request body as a :class:`Call`; :class:`ApiError` (400) if it is not one."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        parsed: ChatBody | CompletionBody = ChatBody.model_validate(body) if kind == "chat" \
            else CompletionBody.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None
    request: dict[str, Any] = {"stream": True}
    if isinstance(parsed, ChatBody):
        if parsed.logprobs or parsed.tools:
            param = "logprobs" if parsed.logprobs else "tools"
            raise ApiError(400, "logprobs and tools are not supported", param=param)
        request["messages"] = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                               for m in parsed.messages]
        max_tokens = parsed.max_completion_tokens or parsed.max_tokens
    else:
        if parsed.logprobs or parsed.echo or parsed.suffix:
            raise ApiError(400, "logprobs, echo and suffix are not supported", param="logprobs")
        prompts = [parsed.prompt] if isinstance(parsed.prompt, str) else parsed.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError(400, "prompt: give one non-empty prompt", param="prompt")
        request["prompt"] = prompts[0]
        max_tokens = parsed.max_tokens
    for key, value in (("max_tokens", max_tokens), ("temperature", parsed.temperature), ("top_p", parsed.top_p),
                       ("seed", parsed.seed)):
        if value is not None:
            request[key] = value
    if parsed.stop:
        request["stop"] = [parsed.stop] if isinstance(parsed.stop, str) else parsed.stop
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    include_usage = bool((parsed.stream_options or {}).get("include_usage"))
    return Call(kind, parsed.model, parsed.stream, include_usage, request, f"{prefix}-{uuid.uuid4().hex}",
                int(time.time()))


def _choice(call: Call, text: str | None, finish_reason: str | None, *, delta: bool) -> dict[str, Any]:
    if call.kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if delta:
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text or "", "refusal": None},
            "logprobs": None, "finish_reason": finish_reason}


def _object(call: Call, chunk: bool) -> str:
    if call.kind == "completion":
        return "text_completion"
    return "chat.completion.chunk" if chunk else "chat.completion"


def completion(call: Call, final: dict[str, Any]) -> dict[str, Any]:
    """The whole answer (``stream`` false) from the cluster's final message."""
    return {"id": call.id, "object": _object(call, False), "created": call.created, "model": call.model,
            "choices": [_choice(call, final.get("text", ""), final.get("finish_reason"), delta=False)],
            "usage": final.get("usage"), "system_fingerprint": None}


def stream_event(call: Call, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    """One server-sent event's data while streaming."""
    event = {"id": call.id, "object": _object(call, True), "created": call.created, "model": call.model,
             "choices": [_choice(call, text, finish_reason, delta=True)], "system_fingerprint": None}
    if call.include_usage:
        event["usage"] = None
    return event


def first_event(call: Call) -> dict[str, Any] | None:
    """A chat stream opens with the assistant's role (as OpenAI's does)."""
    if call.kind != "chat":
        return None
    event = stream_event(call, None)
    event["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return event


def usage_event(call: Call, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The last event with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": call.id, "object": _object(call, True), "created": call.created, "model": call.model,
            "choices": [], "usage": usage, "system_fingerprint": None}
