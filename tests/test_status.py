"""What an operator sees: `lime-mqtt status` of a running cluster, and the broker's warning
about a data folder Mosquitto cannot use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lime_mqtt.cli.status import format_status, gather_status, status_json
from lime_mqtt.core.topics import Topics
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import in_process_cluster


async def test_status_shows_the_plan_the_devices_and_their_telemetry(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10],
                                  device_options={"telemetry_s": 0.2}) as cluster:
        await cluster.final({"prompt": "Valve", "max_tokens": 5})
        async with connect(broker.url) as conn:  # garbage on a watched topic changes nothing
            await conn.publish(Topics(cluster_name).device_telemetry("dev9"), b"\xff not json")
        view = await gather_status(broker.url, cluster_name, wait_s=10)
    assert view.plan is not None and view.plan.epoch == cluster.plan.epoch
    assert set(view.devices) == {"dev0", "dev1"} and {s.state for s in view.devices.values()} == {"ready"}
    assert set(view.telemetry) >= {"dev0", "dev1"}
    assert all(view.telemetry[d].steps_done >= 5 for d in ("dev0", "dev1"))
    assert len(view.coordinators) == 1
    text = format_status(view)
    assert f"plan {cluster.plan.epoch}: 2 stages" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("dev0", "dev1"))]
    assert [r[:2] for r in rows] == [["dev0", "ready"], ["dev1", "ready"]]
    assert [r[6] for r in rows] == ["10", "10"]  # the budget in whole MB ("[0, 3)" splits in two)
    data = json.loads(json.dumps(status_json(view)))  # what `lime-mqtt status --json` prints
    assert data["plan"]["epoch"] == cluster.plan.epoch and data["coordinators"] == view.serving_coordinators()
    assert {d: s["state"] for d, s in data["devices"].items()} == {"dev0": "ready", "dev1": "ready"}
    assert data["telemetry"]["dev0"]["steps_done"] >= 5


def test_status_of_an_empty_cluster_says_so(broker: LocalBroker, cluster_name: str) -> None:
    out = subprocess.run([sys.executable, "-m", "lime_mqtt.cli", "status", "--broker", broker.url, "--cluster",
                          cluster_name, "--wait", "0.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no plan" in out.stdout and "no devices have registered" in out.stdout


def test_a_broker_folder_mosquitto_cannot_reach_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Run as root, Mosquitto becomes the user 'mosquitto': a data folder under a private
    folder (like pytest's own) cannot take its persistence file, and the broker says so;
    a folder of its own in /tmp (what LocalBroker makes by default) is fine."""
    import os
    import shutil
    import tempfile

    from lime_mqtt.transport.mosquitto import write_config

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with caplog.at_level("WARNING"):
        write_config(private / "broker", 1883)
    assert ("cannot reach" in caplog.text) == (os.geteuid() == 0), caplog.text
    caplog.clear()
    own = Path(tempfile.mkdtemp(prefix="lime-broker-test-"))
    try:
        with caplog.at_level("WARNING"):
            write_config(own, 1883)
    finally:
        shutil.rmtree(own)
    assert "cannot reach" not in caplog.text


def test_status_watch_redraws_as_the_cluster_changes(broker: LocalBroker, cluster_name: str, tiny_model: Path,
                                                     tmp_path: Path) -> None:
    """`lime-mqtt status --watch`, piped: a frame per change, showing the devices ready on the
    plan, then the request that was served, then the device that was stopped as offline."""
    import asyncio
    import signal
    import threading
    import time

    from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
    from lime_mqtt.client import ask_final

    devices = [DeviceSpec(d, 100, 1, ("--telemetry-interval", "0.5")) for d in ("w0", "w1")]
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path / "logs",
                        planner_args=("--strategy", "equal", "--heartbeat-timeout", "3"),
                        coordinator_args=("--telemetry-interval", "0.5")) as procs:
        plan = procs.wait_ready()
        watch = subprocess.Popen([sys.executable, "-m", "lime_mqtt.cli", "status", "--watch", "--interval", "0.2",
                                  "--broker", broker.url, "--cluster", cluster_name],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        frames: list[list[str]] = []

        def read() -> None:
            assert watch.stdout is not None
            for line in watch.stdout:
                if line.startswith("--- "):
                    frames.append([])
                elif frames:
                    frames[-1].append(line.rstrip("\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def frame_where(condition: object, timeout_s: float = 20.0) -> list[str]:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for frame in frames[:-1]:  # the last one may still be arriving
                    if condition(frame):  # type: ignore[operator]
                        return frame
                time.sleep(0.05)
            raise AssertionError(f"no such frame in {len(frames)}: {frames[-3:]}")

        def state(frame: list[str], device: str) -> str | None:
            rows = [line.split() for line in frame if line.startswith(device + " ")]
            return rows[0][1] if rows else None

        try:
            ready = frame_where(lambda f: state(f, "w0") == "ready" and state(f, "w1") == "ready")
            assert f"plan {plan.epoch}: 2 stages of {tiny_model.name}" in "\n".join(ready)
            final = asyncio.run(ask_final(broker.url, cluster_name, {"prompt": "Valve", "max_tokens": 4}))
            assert final["type"] == "final"
            frame_where(lambda f: any("1 served" in line and "0 in flight" in line for line in f))
            procs.kill("w1", signal.SIGKILL)
            gone = frame_where(lambda f: state(f, "w1") == "offline")
            assert state(gone, "w0") != "offline"
        finally:
            watch.send_signal(signal.SIGTERM)
            code = watch.wait(timeout=10)
        assert code == 0
