"""The Node-RED flow of docs/integration.md (docs/examples/node-red-flow.json) in a real
Node-RED (from the npm registry; `make setup-test` installs it), against a real cluster:
a question published on the flow's input topic comes out on its output topic with the
answer, the same text an MQTT client gets for the same request."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask_final
from lime_mqtt.transport import transport_for
from lime_mqtt.transport.mosquitto import LocalBroker, free_port

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "docs" / "examples" / "node-red-flow.json"
NODE_RED = Path(os.environ.get("LIME_NODE_RED", ROOT / ".venv" / "node-red" / "node_modules" / ".bin" / "node-red"))
CLUSTER = "node-red"
QUESTION = "Is the cooling pump running?"


def flow_for(broker: LocalBroker) -> list[dict]:
    """The documented flow, pointed at this test's broker and cluster (what a user edits)."""
    text = FLOW.read_text().replace("lime/v2/default/", f"lime/v2/{CLUSTER}/")
    flow = json.loads(text)
    for node in flow:
        if node["type"] == "mqtt-broker":
            node["broker"], node["port"] = "127.0.0.1", str(broker.port)
    return flow


def test_a_question_into_the_flow_comes_out_with_the_answer(broker: LocalBroker, tiny_model: Path,
                                                            tmp_path: Path) -> None:
    if not NODE_RED.exists():
        pytest.fail(f"Node-RED is missing at {NODE_RED}: `make setup-test` installs it from npm")
    (tmp_path / "flows.json").write_text(json.dumps(flow_for(broker)))
    log = (tmp_path / "node-red.log").open("wb")
    with ProcessCluster(broker.url, CLUSTER, str(tiny_model), [DeviceSpec("nr-0", 100, 1)], tmp_path / "logs") as procs:
        procs.wait_ready()
        node_red = subprocess.Popen([str(NODE_RED), "--userDir", str(tmp_path), "--port", str(free_port()),
                                     str(tmp_path / "flows.json")], stdout=log, stderr=subprocess.STDOUT)
        try:
            # Both MQTT nodes subscribe as soon as the flow's broker connection is up.
            deadline = time.monotonic() + 60
            while b"Connected to broker" not in (tmp_path / "node-red.log").read_bytes():
                assert node_red.poll() is None, (tmp_path / "node-red.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "node-red.log").read_text()
                time.sleep(0.1)
            answer = asyncio.run(_ask_through_the_flow(broker))
        finally:
            node_red.terminate()
            node_red.wait(timeout=10)
        expected = asyncio.run(ask_final(broker.url, CLUSTER, {"messages": [{"role": "user", "content": QUESTION}],
                                                               "max_tokens": 64}, client="nodered"))
    assert expected["type"] == "final", expected
    assert answer["question"] == QUESTION
    assert answer["text"] == expected["text"]
    assert answer["finish_reason"] == expected["finish_reason"]


async def _ask_through_the_flow(broker: LocalBroker) -> dict:
    async with transport_for(broker.url).connection() as conn:
        await conn.subscribe("plant/answers")
        await conn.publish("plant/questions", QUESTION.encode(), qos=1)
        async with asyncio.timeout(60):
            async for message in conn.messages():
                return json.loads(message.payload)
    raise AssertionError("no answer")
