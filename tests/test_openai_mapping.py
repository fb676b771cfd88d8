"""The bridge's mapping between OpenAI's shapes and lime-mqtt's (pure functions)."""

from __future__ import annotations

import pytest

from lime_mqtt.core.protocol import parse_request
from lime_mqtt.http.openai_api import ApiError, completion, first_event, from_lime_error, parse_call, stream_event


def test_a_chat_call_becomes_a_valid_lime_request() -> None:
    call = parse_call("chat", {
        "model": "m", "max_completion_tokens": 9, "max_tokens": 99, "temperature": 0.7, "top_p": 0.9, "seed": 3,
        "stop": "END", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Pump "},
                                                  {"type": "text", "text": "status?"}]}],
    })
    assert call.request == {"stream": True, "max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "seed": 3,
                            "stop": ["END"], "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Pump status?"}]}
    assert call.stream and call.include_usage and call.id.startswith("chatcmpl-")
    parse_request(__import__("json").dumps(call.request).encode())  # the coordinator takes it as it is


def test_defaults_are_left_to_the_cluster() -> None:
    call = parse_call("completion", {"model": "m", "prompt": ["Valve"]})
    assert call.request == {"stream": True, "prompt": "Valve"} and not call.stream  # greedy, 128 tokens


@pytest.mark.parametrize("kind, body, param", [
    ("chat", {"model": "m", "messages": []}, "messages"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ("chat", {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("completion", {"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ("completion", {"model": "m", "prompt": "a", "echo": True}, "logprobs"),
    ("completion", {"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("completion", {"prompt": "a"}, "model"),
    ("completion", [1, 2], None),
])
def test_what_lime_cannot_do_is_a_400_not_ignored(kind: str, body: object, param: str | None) -> None:
    with pytest.raises(ApiError) as error:
        parse_call(kind, body)  # type: ignore[arg-type]
    assert error.value.status == 400 and error.value.param == param
    assert error.value.body()["error"]["type"] == "invalid_request_error"


def test_lime_errors_get_fitting_statuses() -> None:
    assert from_lime_error({"code": "prompt_too_long", "message": "m"}).status == 400
    assert from_lime_error({"code": "prompt_too_long"}).code == "context_length_exceeded"
    assert from_lime_error({"code": "rate_limited"}).status == 429
    assert from_lime_error({"code": "overloaded"}).status == 503
    assert from_lime_error({"code": "deadline_exceeded"}).status == 504
    assert from_lime_error({"code": "stage_error"}).status == 500
    assert from_lime_error({}).code == "internal_error"


def test_answers_in_openai_shapes() -> None:
    chat = parse_call("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    final = {"text": "Open.", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                                  "total_tokens": 5}}
    whole = completion(chat, final)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == "Open."
    assert whole["usage"]["total_tokens"] == 5 and whole["id"] == chat.id
    opening = first_event(chat)
    assert opening is not None and opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream_event(chat, "Op")["choices"][0]["delta"] == {"content": "Op"}
    text = parse_call("completion", {"model": "m", "prompt": "x"})
    assert first_event(text) is None and stream_event(text, "Op", "stop")["choices"][0] == {
        "index": 0, "text": "Op", "logprobs": None, "finish_reason": "stop"}
