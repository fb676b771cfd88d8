"""Integration: bad requests get a JSON error and the coordinator keeps serving."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from lime_mqtt.coordinator.service import Coordinator
from lime_mqtt.core.topics import Topics
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import in_process_cluster, prompt_ids, reference_greedy, running, stage_topic

GOOD = {"prompt": "Summarise the shift report", "max_tokens": 8}


async def _send_raw(broker: str, cluster: str, payload: bytes) -> dict:
    """Publish raw bytes as client ``default``'s request and wait for its final or error answer."""
    async with connect(broker) as conn:
        await conn.subscribe(Topics(cluster).answers_inbox("default"))
        await conn.publish(Topics(cluster).requests("default"), payload, qos=1)
        async with asyncio.timeout(30):
            async for message in conn.messages():
                answer = json.loads(message.payload)
                if answer["type"] in ("final", "error"):
                    return answer
    raise AssertionError("no answer")


BAD_REQUESTS = {
    "not json": (b"{this is not json", "invalid_json"),
    "not an object": (b"[1, 2, 3]", "invalid_json"),
    "missing prompt": (json.dumps({"max_tokens": 4}).encode(), "invalid_request"),
    "both prompt and messages": (
        json.dumps({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}).encode(), "invalid_request"),
    "negative max_tokens": (json.dumps({"prompt": "a", "max_tokens": -3}).encode(), "invalid_request"),
    "bad temperature": (json.dumps({"prompt": "a", "temperature": "hot"}).encode(), "invalid_request"),
    "bad role": (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "invalid_request"),
    "prompt too long": (json.dumps({"prompt": "valve " * 2000}).encode(), "prompt_too_long"),
}


async def test_bad_requests_get_errors_and_the_next_good_one_is_answered(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        for name, (payload, code) in BAD_REQUESTS.items():
            answer = await _send_raw(broker.url, cluster_name, payload)
            assert answer["type"] == "error", name
            assert answer["error"]["code"] == code, (name, answer)
            assert answer["error"]["message"], name
            good = await cluster.final(GOOD)
            assert good["type"] == "final", (name, good)
        ids = prompt_ids(tiny_model, GOOD["prompt"])
        assert good["token_ids"] == reference_greedy(tiny_model, ids, 8)


async def test_no_plan_yet_is_an_error(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    coordinator = Coordinator(broker.transport(), cluster_name, tiny_model)
    async with running({"coordinator": coordinator}):
        await asyncio.wait_for(coordinator.serving.wait(), 30)
        answer = await _send_raw(broker.url, cluster_name, json.dumps({**GOOD, "id": "r1"}).encode())
    assert answer == {"type": "error", "id": "r1", "error": answer["error"]}
    assert answer["error"]["code"] == "no_plan"


async def test_plain_mosquitto_clients_can_ask(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    """MQTT 3.1.1: mosquitto_pub asks as client hall3, mosquitto_sub reads the stream and the
    answer on hall3's answer topics."""
    topics = Topics(cluster_name)
    request = {"prompt": "Close valve V-17", "max_tokens": 12, "id": "q-1"}
    host, port = "127.0.0.1", str(broker.port)
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        expected = await cluster.final(request)
        sub = await asyncio.create_subprocess_exec(
            "mosquitto_sub", "-h", host, "-p", port, "-V", "mqttv311", "-q", "1", "-t", topics.answers_inbox("hall3"),
            "-W", "60",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            # Publish only once the subscription exists: a retained-free topic has no history.
            await _wait_for_subscription(sub, broker.url, topics.answer("probe", "hall3", "probe"))
            pub = await asyncio.create_subprocess_exec(
                "mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv311", "-q", "1",
                "-t", topics.requests("hall3"), "-m", json.dumps(request),
            )
            assert await asyncio.wait_for(pub.wait(), 30) == 0
            lines = []
            async with asyncio.timeout(60):
                while True:
                    assert sub.stdout is not None
                    line = await sub.stdout.readline()
                    assert line, "mosquitto_sub ended before the final message"
                    message = json.loads(line)
                    if message.get("type") != "probe":
                        lines.append(message)
                    if lines[-1]["type"] in ("final", "error"):
                        break
        finally:
            sub.terminate()
            await sub.wait()
    final = lines[-1]
    assert final["type"] == "final", final
    assert final["id"] == "q-1"
    assert final["text"] == expected["text"]
    assert "".join(m["text"] for m in lines if m["type"] == "chunk") == final["text"]


async def _wait_for_subscription(sub: asyncio.subprocess.Process, broker: str, topic: str) -> None:
    """mosquitto_sub says nothing when it has subscribed: publish probes until one comes out."""
    assert sub.stdout is not None
    async with connect(broker) as conn, asyncio.timeout(30):
        while True:
            await conn.publish(topic, json.dumps({"type": "probe"}).encode(), qos=1)
            try:
                async with asyncio.timeout(0.5):
                    line = await sub.stdout.readline()
            except TimeoutError:
                continue
            if json.loads(line).get("type") == "probe":
                return


async def test_malformed_messages_crash_no_component(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    """Garbage on the stage, control, results, plan and status topics is dropped; serving goes on."""
    topics = Topics(cluster_name)
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        before = await cluster.final(GOOD)
        garbage = [b"", b"\x00\xff\x13", b'{"v": 1}', json.dumps({"stages": "many"}).encode()]
        async with connect(broker.url) as conn:
            for payload in garbage:
                for topic in (stage_topic(topics, cluster.plan, 0), stage_topic(topics, cluster.plan, 1),
                              topics.control("test"), topics.plan(), topics.result("dev1", cluster.coordinator.name),
                              topics.device_status("ghost")):
                    await conn.publish(topic, payload, qos=1)
            # A status without a state, on a real device's topic, is ignored too.
            await conn.publish(topics.device_status("dev0"), b'{"v": 1}', qos=1)
        after = await cluster.final(GOOD)
    assert after["type"] == "final", after
    assert after["token_ids"] == before["token_ids"]


async def test_asking_a_cluster_without_coordinator_fails_fast(broker: LocalBroker, cluster_name: str) -> None:
    from lime_mqtt.client import ask_final
    from lime_mqtt.core.errors import LimeError

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LimeError, match="no coordinator"):
        await ask_final(broker.url, cluster_name, GOOD, wait_for_coordinator_s=1.0)
    assert loop.time() - started < 10


async def test_cli_ask_streams_the_same_answer(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    import sys

    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        expected = await cluster.final(GOOD)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lime_mqtt.cli", "ask", GOOD["prompt"], "--max-tokens", str(GOOD["max_tokens"]),
            "--json", "--broker", broker.url, "--cluster", cluster_name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines[-1]["type"] == "final"
    assert lines[-1]["token_ids"] == expected["token_ids"]
    assert "".join(m["text"] for m in lines if m["type"] == "chunk") == expected["text"]


async def test_cli_plan_explain_prints_the_plan_with_its_predictions(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    import sys

    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10],
                                  planner_options={"strategy": "optimal"}) as cluster:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lime_mqtt.cli", "plan", "--explain", "--broker", broker.url, "--cluster",
            cluster_name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    plan = cluster.plan
    assert plan.predicted_ms_per_token is not None
    assert f"predicted {plan.predicted_ms_per_token:.1f} ms per token" in text
    for stage in plan.stages:
        assert re.search(rf"\b{stage.device_id}\s+\[{stage.start}, {stage.stop}\)", text), text
    for device_id in plan.left_out:  # the tiny model fits one device: the other is left out, with the reason
        assert f"left out {device_id}: " in text
    assert "stall ms" in text and "KV tokens" in text


async def test_a_cluster_too_small_says_why_there_is_no_plan(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    """The planner publishes its reason (retained), and a request's no_plan error carries it."""
    from lime_mqtt.device.agent import DeviceAgent
    from lime_mqtt.planner.service import PlannerService

    topics = Topics(cluster_name)
    planner = PlannerService(broker.transport(), cluster_name, tiny_model, quorum=1, settle_s=0.1, context_tokens=64)
    coordinator = Coordinator(broker.transport(), cluster_name, tiny_model)
    device = DeviceAgent(broker.transport(), cluster_name, "too-small", 1, tiny_model, measure=False)
    async with running({"planner": planner, "coordinator": coordinator, "device": device}):
        async with connect(broker.url) as conn:
            await conn.subscribe(topics.planner_status())
            async with asyncio.timeout(30):
                async for message in conn.messages():
                    status = json.loads(message.payload)
                    if status["state"] == "error":
                        break
        assert "MiB missing" in status["message"] and status["devices"] == ["too-small"]
        await asyncio.wait_for(coordinator.serving.wait(), 30)
        answer = await _send_raw(broker.url, cluster_name, json.dumps(GOOD).encode())
    assert answer["error"]["code"] == "no_plan"
    assert "MiB missing" in answer["error"]["message"]
