"""Measured capabilities: real numbers, cached per device and model, reported in the status."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from lime_mqtt.core.messages import decode_device_status
from lime_mqtt.core.topics import Topics
from lime_mqtt.device.agent import DeviceAgent
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.model.measure import cache_file, measure_capabilities
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import running


def test_measurements_are_positive_and_cached(tiny_model: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint(tiny_model)
    first = measure_capabilities(checkpoint, "m1", tmp_path)
    assert first.layer_decode_ms > 0 and first.layer_prefill_ms_per_token > 0 and first.disk_mb_s > 0
    assert cache_file(tmp_path, "m1", checkpoint).is_file()
    started = time.perf_counter()
    again = measure_capabilities(checkpoint, "m1", tmp_path)
    assert again == first  # read back, not measured again
    assert time.perf_counter() - started < 0.5
    cache_file(tmp_path, "m1", checkpoint).write_text("{broken")
    assert measure_capabilities(checkpoint, "m1", tmp_path).layer_decode_ms > 0  # a damaged cache is redone


async def test_device_reports_its_capabilities(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    agent = DeviceAgent(broker.transport(), cluster_name, "meter", 10, tiny_model)
    async with running({"meter": agent}), connect(broker.url) as conn:
        await conn.subscribe(Topics(cluster_name).device_status("meter"))
        async with asyncio.timeout(30):
            async for message in conn.messages():
                status = decode_device_status(message.payload, "meter")
                if status.state == "idle":
                    break
    caps = status.capabilities
    for key in ("layer_decode_ms", "layer_prefill_ms_per_token", "disk_mb_s", "link_rtt_ms", "link_mb_s"):
        assert caps[key] > 0, (key, json.dumps(caps))
    assert caps["link_rtt_ms"] < 1000


def test_an_emulated_slow_device_is_seen_by_its_measurement(tiny_model: Path, tmp_path: Path) -> None:
    """The benchmark's slow device: its delay shows up in the measured layer time, which
    is all the planner sees (DeviceProfile.from_status reads the measured numbers)."""
    from lime_mqtt.planning.cost import DeviceProfile

    checkpoint = Checkpoint(tiny_model)
    normal = measure_capabilities(checkpoint, "m2", tmp_path)
    slow = measure_capabilities(checkpoint, "m2", tmp_path, layer_delay_ms=5.0)
    assert slow.layer_decode_ms >= normal.layer_decode_ms + 4.5
    assert slow.layer_prefill_ms_per_token > normal.layer_prefill_ms_per_token
    assert normal.matvec_gb_s > 0
    profile = DeviceProfile.from_status("m2", {"memory_mb": 10, "capabilities": slow.to_json()})
    assert profile.layer_decode_ms == round(slow.layer_decode_ms, 4)
