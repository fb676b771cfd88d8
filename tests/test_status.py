"""`lime-mqtt status`: what an operator sees of a running cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lime_mqtt.broker import LocalBroker
from lime_mqtt.status import format_status, gather_status
from lime_mqtt.topics import Topics
from lime_mqtt.transport import MqttTransport
from tests.helpers import in_process_cluster


async def test_status_shows_the_plan_the_devices_and_their_telemetry(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10],
                                  device_options={"telemetry_s": 0.2}) as cluster:
        await cluster.final({"prompt": "Valve", "max_tokens": 5})
        async with MqttTransport(broker.url) as conn:  # garbage on a watched topic changes nothing
            await conn.publish(f"{Topics(cluster_name).root}/devices/dev9/telemetry", b"\xff not json")
        view = await gather_status(broker.url, cluster_name, wait_s=10)
    assert view.plan is not None and view.plan.epoch == cluster.plan.epoch
    assert set(view.devices) == {"dev0", "dev1"} and {s["state"] for s in view.devices.values()} == {"ready"}
    assert set(view.telemetry) >= {"dev0", "dev1"}
    assert all(view.telemetry[d]["steps_done"] >= 5 for d in ("dev0", "dev1"))
    assert len(view.coordinators) == 1
    text = format_status(view)
    assert f"plan {cluster.plan.epoch}: 2 stages" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("dev0", "dev1"))]
    assert [r[:2] for r in rows] == [["dev0", "ready"], ["dev1", "ready"]]


def test_status_of_an_empty_cluster_says_so(broker: LocalBroker, cluster_name: str) -> None:
    out = subprocess.run([sys.executable, "-m", "lime_mqtt.cli", "status", "--broker", broker.url, "--cluster",
                          cluster_name, "--wait", "0.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no plan" in out.stdout and "no devices have registered" in out.stdout
