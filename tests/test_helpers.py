"""The test helpers themselves: a service that crashes is the test's failure, not a timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lime_mqtt.core.errors import LimeError
from lime_mqtt.transport.memory import MemoryBroker
from tests.helpers import in_process_cluster, running


class _Crashing:
    def __init__(self, started: asyncio.Event) -> None:
        self.started = started

    async def run(self) -> None:
        self.started.set()
        raise LimeError("the service broke")


async def test_a_crashing_service_fails_the_body_with_its_own_error() -> None:
    started = asyncio.Event()
    waited = False
    with pytest.raises(ExceptionGroup) as caught:
        async with running({"crasher": _Crashing(started)}):
            await started.wait()
            await asyncio.sleep(30)  # what a test would wait for; the crash must cut it short
            waited = True
    assert not waited
    assert [str(e) for e in caught.value.exceptions] == ["the service broke"]


async def test_an_agent_that_crashes_fails_the_cluster_helper_at_once(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device agent whose run() fails (here: its self-measurement) fails the cluster helper
    with that error at once, instead of its 60 s wait for a ready plan running out."""
    from lime_mqtt.device.agent import DeviceAgent

    async def broken_measure(self: DeviceAgent) -> None:
        raise RuntimeError(f"{self.device_id}: the disk is gone")

    monkeypatch.setattr(DeviceAgent, "_measure", broken_measure)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ExceptionGroup) as caught:
        async with in_process_cluster(MemoryBroker(), "c", tiny_model, [10]):
            raise AssertionError("the cluster cannot be ready")
    assert loop.time() - started < 20
    assert [str(e) for e in caught.value.exceptions] == ["dev0: the disk is gone"]
