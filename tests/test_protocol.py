"""Unit: request validation, streaming text with stop strings, sampling, topics, settings."""

from __future__ import annotations

import json

import pytest
import torch

from lime_mqtt.cli.settings import load_settings
from lime_mqtt.coordinator.textstream import TextStream
from lime_mqtt.core.errors import ConfigError, RequestError
from lime_mqtt.core.protocol import parse_request
from lime_mqtt.core.topics import Identity, Route, Topics
from lime_mqtt.core.wire import Sampling
from lime_mqtt.model.sampling import choose_token
from lime_mqtt.transport.base import BrokerAddress
from lime_mqtt.transport.memory import topic_matches


def test_request_defaults_and_stop_string() -> None:
    request = parse_request(json.dumps({"prompt": "hi", "stop": "\n"}).encode())
    assert (request.max_tokens, request.temperature, request.stop, request.stream) == (128, 0.0, ["\n"], True)


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"nope", "invalid_json"), (b"42", "invalid_json"), (b'{"prompt": ""}', "invalid_request"),
     (b'{"prompt": "a", "top_p": 0}', "invalid_request"), (b'{"prompt": "a", "id": "a/b"}', "invalid_request")],
)
def test_bad_requests_raise_with_codes(body: bytes, code: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(body)
    assert info.value.code == code


class CharTokenizer:
    """Token id = a character code; enough to test streaming logic."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    stream = TextStream(CharTokenizer(), stop=["END"])
    shown = [stream.add(ord(c)) for c in "abcEN"]
    assert "".join(shown) == "abc"  # "EN" might become "END"
    assert stream.add(ord("D")) == "" and stream.stopped
    assert stream.text == "abc"


def test_text_stream_releases_text_that_was_not_a_stop() -> None:
    stream = TextStream(CharTokenizer(), stop=["END"])
    out = "".join(stream.add(ord(c)) for c in "xENx") + stream.finish()
    assert out == "xENx" and not stream.stopped


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert choose_token(logits, Sampling(), step=0) == 1
    assert choose_token(logits, Sampling(temperature=1.0, top_k=1, seed=5), step=3) == 1
    hot = Sampling(temperature=5.0, seed=11)
    draws = [choose_token(logits, hot, step) for step in range(40)]
    assert draws == [choose_token(logits, hot, step) for step in range(40)]
    assert len(set(draws)) > 1
    # top_p small enough keeps only the best token
    assert all(choose_token(logits, Sampling(temperature=5.0, top_p=0.01, seed=s), 0) == 1 for s in range(10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_torch_argmax_ties_and_nan_included(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    cases = [torch.randn(49152, generator=generator) for _ in range(5)]
    tie = torch.zeros(100)
    tie[[7, 40, 90]] = 5.0
    nan = torch.tensor([1.0, float("nan"), 3.0, float("nan")])
    for logits in [*cases, tie, nan, torch.full((4,), float("-inf"))]:
        with torch.inference_mode():
            row = logits.to(dtype)
        assert choose_token(row, Sampling(), step=0) == int(torch.argmax(row))


def test_topic_layout_2_names_the_sender_of_every_message() -> None:
    topics = Topics("plant-a")
    coordinator, pi3, pi4 = Identity("coordinator", "main"), Identity("device", "pi-3"), Identity("device", "pi-4")
    assert topics.stage_in(pi3, "pi-4", 2) == "lime/v2/plant-a/device/pi-3/to/device/pi-4/stage/2"
    assert topics.parse(topics.stage_in(pi3, "pi-4", 2)) == Route(pi3, "stage", pi4, "2")
    assert topics.parse(topics.stage_in(coordinator, "pi-3", 0)) == Route(coordinator, "stage", pi3, "0")
    assert topics.parse(topics.result("pi-4", "main")) == Route(pi4, "result", coordinator)
    assert topics.parse(topics.answer("main", "hall3", "q-1")) == Route(
        coordinator, "answer", Identity("client", "hall3"), "q-1")
    assert topics.parse(topics.echo("pi-3")) == Route(pi3, "echo", pi3)
    assert topics.parse(topics.device_status("pi-4")) == Route(pi4, "status")
    assert topics.parse(topics.device_telemetry("pi-4")) == Route(pi4, "telemetry")
    assert topics.parse(topics.coordinator_status("c-1")) == Route(Identity("coordinator", "c-1"), "status")
    assert topics.parse(topics.control("main")) == Route(coordinator, "control")
    assert topics.parse(topics.plan("main")) == Route(Identity("planner", "main"), "plan")
    assert topics.parse(topics.requests("hall3")) == Route(Identity("client", "hall3"), "requests")
    for foreign in ("lime/v1/plant-a/plan", "lime/v2/plant-b/device/pi-4/status",  # old layout, other cluster
                    "lime/v2/plant-a/client/x/plan",  # a kind that is not the client's
                    "lime/v2/plant-a/robot/x/status",  # no such role
                    "lime/v2/plant-a/device/pi-4/to/device/pi-3/stage",  # a stage without its number
                    "lime/v2/plant-a/device/pi-4/to/coordinator/main/result/extra",
                    "lime/v2/plant-a/device/pi-4/to/device/pi-3/dance/1",
                    "lime/v2/plant-a/device/pi-4/status/x", "lime/v2/plant-a/device"):
        assert topics.parse(foreign) is None, foreign
    for filter_, topic in [(topics.stage_inbox("pi-4"), topics.stage_in(pi3, "pi-4", 2)),
                           (topics.results_inbox("main"), topics.result("pi-4", "main")),
                           (topics.answers_inbox("hall3"), topics.answer("main", "hall3", "q-1")),
                           (topics.all_requests, topics.requests("hall3")), (topics.all_plans, topics.plan("b")),
                           (topics.weights_inbox("pi-4", "t1"), topics.weights_reply(pi3, "pi-4", "t1"))]:
        assert topic_matches(filter_, topic), (filter_, topic)
    assert not topic_matches(topics.answers_inbox("hall3"), topics.answer("main", "hall4", "q-1"))
    assert not topic_matches(topics.results_inbox("main"), topics.direct(Identity("client", "x"), coordinator,
                                                                         "result"))
    with pytest.raises(ValueError):
        Topics("a/b")


def test_identities_are_role_slash_name() -> None:
    assert Identity.parse("device/pi-1") == Identity("device", "pi-1")
    assert Identity("client", "hall3").username == "client/hall3"
    for bad in ("pi-1", "device/", "/pi-1", "robot/x", "device/a/b", "device/a b", "device/#", "device/" + "x" * 65):
        with pytest.raises(ValueError):
            Identity.parse(bad)


def test_broker_urls() -> None:
    assert BrokerAddress.parse("mqtt://10.0.0.5:1884") == BrokerAddress("10.0.0.5", 1884, False)
    assert BrokerAddress.parse("mqtts://broker.local") == BrokerAddress("broker.local", 8883, True)
    with pytest.raises(ConfigError):
        BrokerAddress.parse("http://x")


def test_settings_precedence(tmp_path, monkeypatch) -> None:
    config = tmp_path / "lime.toml"
    config.write_text('cluster = "from-file"\nbroker = "mqtt://file:1"\nmodel = "tiny"\n')
    monkeypatch.setenv("LIME_BROKER", "mqtt://env:2")
    settings = load_settings(str(config), cluster=None, model="smollm2")
    assert (settings.cluster, settings.broker, settings.model) == ("from-file", "mqtt://env:2", "smollm2")


def test_text_stream_with_a_real_tokenizer_rebuilds_the_text(tiny_model) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "Ventil V-17 schließen; température 4,2 °C — 泵 🚒 ok.\n" * 20
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=[])
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert sum(1 for p in pieces if p) > len(ids) / 2  # it streams, not all at the end


def test_a_resume_carries_the_tokens_the_client_has() -> None:
    from lime_mqtt.core.protocol import resume_target

    resume = resume_target(b'{"resume": "q1", "after": 3, "request": {"prompt": "x"}, "token_ids": [5, 6, 7]}')
    assert resume is not None and resume.after == 3 and resume.token_ids == (5, 6, 7)
    assert resume_target(b'{"resume": "q1"}').token_ids == ()  # type: ignore[union-attr]
    for bad in (b'{"resume": "q1", "token_ids": [1.5]}', b'{"resume": "q1", "token_ids": [true]}',
                b'{"resume": "q1", "token_ids": "123"}', b'{"resume": "q1", "token_ids": [-1]}'):
        assert resume_target(bad) is None, bad


def test_the_answer_tracker_resumes_without_a_gap_or_a_repeat() -> None:
    from lime_mqtt.client import AnswerTracker

    tracker = AnswerTracker({"id": "q1", "prompt": "x"})
    assert tracker.take({"type": "chunk", "index": 0, "text": "a", "token_ids": [1]}, "east")
    assert tracker.take({"type": "chunk", "index": 1, "text": "b", "token_ids": [2, 3]}, "east")
    assert not tracker.take({"type": "chunk", "index": 1, "text": "b", "token_ids": [2, 3]}, "east")  # a repeat
    assert not tracker.take({"type": "chunk", "index": 2, "text": "c", "token_ids": [4]}, "west")  # not its server
    assert not tracker.lost({"west"}) and not tracker.lost(set())  # another coordinator went: nothing to do
    assert tracker.lost({"east"})
    assert tracker.resume() == {"resume": "q1", "after": 1, "request": {"id": "q1", "prompt": "x"},
                                "token_ids": [1, 2, 3]}
    assert tracker.take({"type": "chunk", "index": 2, "text": "c", "token_ids": [4]}, "west")  # the new server
    assert tracker.serving == "west"
