"""The HTTP bridge (`lime-mqtt http`) with the official `openai` client, against a real
cluster: device agents, coordinator, planner and the bridge each their own OS process on a
real Mosquitto.

- Chat and completions, streaming and not, give the same text as an MQTT client gets.
- A client that drops its stream cancels the request: every device frees its KV cache.
- Errors come back as OpenAI error objects with fitting HTTP statuses.
- API keys map to client identities; a wrong key is refused.
- `/metrics` (Prometheus) agrees with the cluster's telemetry.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask_final
from lime_mqtt.core.messages import decode_coordinator_telemetry, decode_device_telemetry
from lime_mqtt.core.topics import Topics
from lime_mqtt.transport import transport_for
from lime_mqtt.transport.mosquitto import LocalBroker, free_port

pytestmark = [pytest.mark.e2e]

CLUSTER = "http-bridge"
DEVICES = ["web-0", "web-1"]
CHAT = [{"role": "user", "content": "Which valve feeds the cooling loop?"}]
PROMPT = "The pressure of the cooling loop"
# Devices report every 0.5 s; each layer is 3 ms slower, so a long answer takes seconds
# and a test can drop it midway.
FAST_TELEMETRY = ("--telemetry-interval", "0.5")
DEVICE_ARGS = (*FAST_TELEMETRY, "--emulate-layer-delay-ms", "3")


@pytest.fixture(scope="module")
def bridge(broker: LocalBroker, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("http")
    devices = [DeviceSpec(d, 100, 1, DEVICE_ARGS) for d in DEVICES]
    # A second identity for the keyed bridge: on this open broker its user name names the client.
    (folder / "line1.toml").write_text('username = "client/line1"\n')
    (folder / "keys.toml").write_text('[[key]]\nkey = "sk-line1-0123456789abcdef"\nconfig = "line1.toml"\n')
    with ProcessCluster(broker.url, CLUSTER, str(tiny_model), devices, folder / "logs",
                        coordinator_args=FAST_TELEMETRY, planner_args=("--strategy", "equal")) as procs:
        assert [s.device_id for s in procs.wait_ready().stages] == DEVICES
        url = procs.start_bridge(free_port())
        procs.processes["http-open"] = procs.processes.pop("http")
        keyed = procs.start_bridge(free_port(), "--api-keys", str(folder / "keys.toml"))
        yield {"url": url, "keyed": keyed, "procs": procs, "model": tiny_model.name}


def client(url: str, key: str = "not-checked") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def mqtt_final(broker: LocalBroker, request: dict[str, Any], client_name: str = "default") -> dict[str, Any]:
    return asyncio.run(ask_final(broker.url, CLUSTER, request, client=client_name))


def test_models_lists_what_the_coordinator_serves(bridge: dict[str, Any]) -> None:
    models = client(bridge["url"]).models.list()
    assert [m.id for m in models.data] == [bridge["model"]]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_gives_the_text_an_mqtt_client_gets(broker: LocalBroker, bridge: dict[str, Any], stream: bool) -> None:
    mqtt = mqtt_final(broker, {"messages": CHAT, "max_tokens": 20})
    assert mqtt["type"] == "final", mqtt
    api = client(bridge["url"])
    if not stream:
        reply = api.chat.completions.create(model=bridge["model"], messages=CHAT, max_tokens=20, temperature=0)  # type: ignore[arg-type]
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == mqtt["text"]
        assert reply.choices[0].finish_reason == mqtt["finish_reason"]
        assert reply.usage is not None
        assert reply.usage.model_dump(exclude_none=True) == mqtt["usage"]
        return
    events = list(api.chat.completions.create(model=bridge["model"], messages=CHAT, max_tokens=20, temperature=0,  # type: ignore[arg-type]
                                              stream=True, stream_options={"include_usage": True}))
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == mqtt["text"]
    finishes = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert finishes == [mqtt["finish_reason"]]
    assert events[-1].choices == [] and events[-1].usage is not None
    assert events[-1].usage.completion_tokens == mqtt["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_gives_the_text_an_mqtt_client_gets(broker: LocalBroker, bridge: dict[str, Any],
                                                       stream: bool) -> None:
    mqtt = mqtt_final(broker, {"prompt": PROMPT, "max_tokens": 16, "stop": ["\n\n"]})
    assert mqtt["type"] == "final", mqtt
    api = client(bridge["url"])
    if not stream:
        reply = api.completions.create(model=bridge["model"], prompt=PROMPT, max_tokens=16, stop="\n\n")
        assert reply.object == "text_completion"
        assert reply.choices[0].text == mqtt["text"]
        assert reply.choices[0].finish_reason == mqtt["finish_reason"]
        assert reply.usage is not None and reply.usage.total_tokens == mqtt["usage"]["total_tokens"]
        return
    events = list(api.completions.create(model=bridge["model"], prompt=PROMPT, max_tokens=16, stop="\n\n",
                                         stream=True))
    assert "".join(e.choices[0].text for e in events) == mqtt["text"]
    assert events[-1].choices[0].finish_reason == mqtt["finish_reason"]


async def _telemetry(broker: LocalBroker, wanted: set[str], timeout_s: float = 20.0) -> dict[str, Any]:
    """The next telemetry of each device in ``wanted`` and of the coordinator ("coordinator")."""
    topics, found = Topics(CLUSTER), {}
    async with transport_for(broker.url).connection() as conn:
        await conn.subscribe(topics.all_device_telemetry, topics.all_coordinator_telemetry)
        async with asyncio.timeout(timeout_s):
            async for message in conn.messages():
                _note_telemetry(found, topics, message)
                if wanted <= set(found):
                    return found
    raise AssertionError("unreachable")


def _note_telemetry(found: dict[str, Any], topics: Topics, message: Any) -> None:
    """Keep a telemetry report in ``found``: by device name, or as "coordinator"."""
    route = topics.parse(message.topic)
    assert route is not None
    if route.sender.role == "device":
        found[route.sender.name] = decode_device_telemetry(message.payload, route.sender.name)
    else:
        found["coordinator"] = decode_coordinator_telemetry(message.payload, route.sender.name)


def test_a_dropped_stream_frees_the_kv_cache_on_every_device(broker: LocalBroker, bridge: dict[str, Any]) -> None:
    before = asyncio.run(_telemetry(broker, {"coordinator"}))["coordinator"]
    stream = client(bridge["url"]).chat.completions.create(
        model=bridge["model"], messages=CHAT, max_tokens=1500, temperature=0, stream=True)  # type: ignore[arg-type]
    pieces = 0
    for event in stream:
        pieces += bool(event.choices and event.choices[0].delta.content)
        if pieces == 3:
            break
    # Mid-answer: both devices hold the request's cache.
    during = asyncio.run(_telemetry(broker, set(DEVICES)))
    assert all(during[d].kv_sequences == 1 for d in DEVICES), during
    stream.close()  # the client goes away

    async def freed() -> dict[str, Any]:
        while True:
            now = await _telemetry(broker, {*DEVICES, "coordinator"})
            if all(now[d].kv_sequences == 0 for d in DEVICES) and \
                    now["coordinator"].errors.get("cancelled", 0) > before.errors.get("cancelled", 0):
                return now

    after = asyncio.run(asyncio.wait_for(freed(), 30))
    assert after["coordinator"].running == 0
    # It stopped far short of 1500 tokens: the devices ran no more steps of it.
    steps = {d: after[d].steps_done for d in DEVICES}
    assert asyncio.run(_telemetry(broker, set(DEVICES)))[DEVICES[0]].steps_done == steps[DEVICES[0]]
    assert steps[DEVICES[0]] - during[DEVICES[0]].steps_done < 1000


def test_errors_are_openai_error_objects(bridge: dict[str, Any]) -> None:
    api = client(bridge["url"])
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=bridge["model"], messages=CHAT, max_tokens=0)  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and "max_tokens" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="gpt-4o", prompt=PROMPT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        api.completions.create(model=bridge["model"], prompt="valve " * 5000, max_tokens=4)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=bridge["model"], messages=CHAT, n=2)  # type: ignore[arg-type]
    request = urllib.request.Request(f"{bridge['url']}/v1/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=10)
    assert raw.value.code == 400 and json.loads(raw.value.read())["error"]["type"] == "invalid_request_error"


def test_api_keys_map_to_client_identities(broker: LocalBroker, bridge: dict[str, Any]) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(bridge["keyed"], "sk-wrong-0123456789abcdef").models.list()
    reply = client(bridge["keyed"], "sk-line1-0123456789abcdef").completions.create(
        model=bridge["model"], prompt=PROMPT, max_tokens=8)
    assert reply.choices[0].text == mqtt_final(broker, {"prompt": PROMPT, "max_tokens": 8}, "line1")["text"]


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_agree_with_the_cluster_telemetry(broker: LocalBroker, bridge: dict[str, Any]) -> None:
    client(bridge["url"]).completions.create(model=bridge["model"], prompt=PROMPT, max_tokens=8)
    # Quiet now: the next reports are final until another request comes.
    telemetry = asyncio.run(_telemetry(broker, {*DEVICES, "coordinator"}))
    coordinator = telemetry["coordinator"]

    def agrees() -> bool:
        m = _scrape(bridge["url"])
        name = (("coordinator", coordinator.name),)
        return all([
            m[("lime_requests_total", name)] == coordinator.served,
            m[("lime_requests_answered_total", name)] == coordinator.answered,
            m[("lime_time_to_first_token_seconds_count", name)] == coordinator.ttft_ms.count,
            m[("lime_time_to_first_token_seconds_sum", name)] == pytest.approx(coordinator.ttft_ms.sum / 1000),
            m[("lime_completion_tokens_total", name)] == coordinator.completion_tokens,
            *(m[("lime_request_errors_total", (("code", code), *name))] == count
              for code, count in coordinator.errors.items()),
            *(m[("lime_device_steps_total", (("device", d),))] == telemetry[d].steps_done for d in DEVICES),
            *(m[("lime_device_kv_tokens", (("device", d),))] == telemetry[d].kv_tokens for d in DEVICES),
            *(m[("lime_device_up", (("device", d),))] == 1 for d in DEVICES),
        ])

    # The bridge gets the same reports a moment later: a scrape agrees within a few.
    deadline = time.monotonic() + 10
    while not agrees():
        assert time.monotonic() < deadline, _scrape(bridge["url"])
        time.sleep(0.1)
    assert coordinator.answered >= 1 and coordinator.ttft_ms.count == coordinator.answered
    assert all(telemetry[d].steps_done > 0 for d in DEVICES)


def test_the_grafana_example_uses_only_metrics_the_bridge_serves(bridge: dict[str, Any]) -> None:
    import re

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "docs" / "examples"
                            / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"lime_[a-z_]+", target["expr"])}
    with urllib.request.urlopen(f"{bridge['url']}/metrics", timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    served = {f.name + suffix for f in families for suffix in suffixes.get(f.type, ("",))}
    assert used and used <= served, used - served


def test_a_caller_that_hangs_up_on_a_whole_answer_cancels_it(broker: LocalBroker, bridge: dict[str, Any]) -> None:
    import http.client
    from urllib.parse import urlsplit

    async def hang_up_midway() -> None:
        topics = Topics(CLUSTER)
        latest: dict[str, Any] = {}

        async def until(condition: Any, what: str, timeout_s: float = 30) -> None:
            try:
                async with asyncio.timeout(timeout_s):
                    while not ({*DEVICES, "coordinator"} <= set(latest) and condition(latest)):
                        _note_telemetry(latest, topics, await anext(messages))
            except TimeoutError:
                raise AssertionError(f"not {what} in {timeout_s} s; last telemetry: {latest}\n"
                                     f"{bridge['procs'].log_tail()}") from None

        async with transport_for(broker.url).connection() as conn:  # one subscription: every report seen
            await conn.subscribe(topics.all_device_telemetry, topics.all_coordinator_telemetry)
            messages = aiter(conn.messages())
            await until(lambda t: t["coordinator"].running == 0, "idle before the request")
            before = latest["coordinator"].errors.get("cancelled", 0)
            address = urlsplit(bridge["url"])
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            body = {"model": bridge["model"], "messages": CHAT, "max_tokens": 1500, "stream": False}
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            # Hang up at the first report of the answer on every device: it takes seconds more
            # (about 480 tokens), so the cancel, not the answer's end, is what frees it.
            await until(lambda t: all(t[d].kv_sequences == 1 for d in DEVICES), "answering on every device")
            connection.close()
            await until(lambda t: all(t[d].kv_sequences == 0 for d in DEVICES)
                        and t["coordinator"].errors.get("cancelled", 0) == before + 1, "cancelled and freed")
            assert latest["coordinator"].running == 0

    asyncio.run(hang_up_midway())
