"""The test helpers themselves: a service that crashes is the test's failure, not a timeout."""

from __future__ import annotations

import asyncio
import inspect
import re
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


class _Stubborn:
    """A service whose clean-up never ends: it swallows its cancellation and waits."""

    def __init__(self, started: asyncio.Event) -> None:
        self.started = started

    async def run(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # a close that never ends


async def test_a_service_that_does_not_stop_fails_the_test_with_where_it_waits() -> None:
    started = asyncio.Event()
    with pytest.raises(ExceptionGroup) as caught:
        async with running({"stubborn": _Stubborn(started)}, stop_s=0.2):
            await started.wait()
    [error] = caught.value.exceptions
    assert isinstance(error, RuntimeError)
    message = str(error)
    assert message.startswith("stubborn did not stop within 0 s of being cancelled")
    # The task's own line: where run() is stuck, down to the awaited future.
    [line] = [line for line in message.splitlines() if line.startswith("stubborn-run:")]
    # stuck in the except clause's wait, not in the first one
    stuck_at = _Stubborn.run.__code__.co_firstlineno + next(
        i for i, text in enumerate(inspect.getsourcelines(_Stubborn.run)[0]) if "never ends" in text)
    expected = rf"stubborn-run: test_helpers.py:{stuck_at} _Stubborn.run -> locks.py:\d+ Event.wait -> a future"
    assert re.fullmatch(expected, line), line
