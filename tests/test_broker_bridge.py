"""Past one broker: two Mosquitto brokers joined by a Mosquitto bridge, as two sites of a
plant would be, with a device on each and the client on the far one. The answer crosses
the bridge at every step and is token-identical to transformers'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster, wait_for_ready_plan
from lime_mqtt.client import ask
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import prompt_ids, reference_greedy

pytestmark = [pytest.mark.e2e]

CLUSTER = "two-sites"
PROMPT = "Close valve V-17 before starting the maintenance"


def bridge_config(cluster: str, remote_port: int) -> str:
    """Site B's side of the bridge (docs/operations.md#past-one-broker): the cluster's topics
    both ways, MQTT 5, as Mosquitto's own bridge does it."""
    return "\n".join([
        "connection site-a",
        f"address 127.0.0.1:{remote_port}",
        f"topic lime/v2/{cluster}/# both 1",
        "bridge_protocol_version mqttv50",
        "cleansession true",
        "try_private true",
        "notifications false",
        "start_type automatic",
        "restart_timeout 1 5",
    ]) + "\n"


def test_a_request_crosses_a_mosquitto_bridge_with_devices_on_both_brokers(tiny_model: Path, tmp_path: Path) -> None:
    with LocalBroker() as site_a, LocalBroker(extra_config=bridge_config(CLUSTER, site_a.port)) as site_b:
        # Site A: planner, coordinator and one device; site B: the other device and the client.
        with ProcessCluster(site_a.url, CLUSTER, str(tiny_model), [DeviceSpec("a-0", 100, 1)], tmp_path / "a",
                            planner_args=("--strategy", "equal", "--quorum", "2")) as procs_a, \
             ProcessCluster(site_b.url, CLUSTER, str(tiny_model), [DeviceSpec("b-0", 100, 1)], tmp_path / "b",
                            planner=False, coordinator=False) as procs_b:
            plan = asyncio.run(wait_for_ready_plan(site_b.url, CLUSTER, timeout_s=90, quorum=2))
            messages = asyncio.run(_ask(site_b.url))
            logs = procs_a.log_tail() + procs_b.log_tail()
    assert sorted(s.device_id for s in plan.stages) == ["a-0", "b-0"], plan
    final = messages[-1]
    assert final["type"] == "final", (final, logs)
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 20)
    assert "".join(m["text"] for m in messages if m["type"] == "chunk") == final["text"]


async def _ask(broker: str) -> list[dict]:
    return [m async for m in ask(broker, CLUSTER, {"prompt": PROMPT, "max_tokens": 20}, timeout_s=60)]
