"""Failures are loud: a publish the broker refuses raises in the publisher, and a request
nobody subscribes to is known at once, from the broker's MQTT 5 PUBACK."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lime_mqtt.client import ask_final
from lime_mqtt.core.errors import LimeError, NoSubscribers, PublishRefused
from lime_mqtt.core.messages import CoordinatorStatus
from lime_mqtt.core.topics import Topics
from lime_mqtt.transport import connect
from lime_mqtt.transport.memory import MemoryBroker
from lime_mqtt.transport.mosquitto import LocalBroker


@pytest.fixture
def read_only_broker() -> Iterator[LocalBroker]:
    """A real Mosquitto whose ACL lets anonymous clients read everything and write only
    under ``open/``. Its files live in /tmp, where the user mosquitto can read them (pytest's
    own tmp folder is closed to other users)."""
    folder = Path(tempfile.mkdtemp(prefix="lime-acl-"))
    try:
        folder.chmod(0o755)
        acl = folder / "acl"
        acl.write_text("topic read #\ntopic readwrite open/#\n")
        acl.chmod(0o644)
        with LocalBroker(extra_config=f"acl_file {acl}\n") as running:
            yield running
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
async def test_a_publish_the_broker_refuses_raises_in_the_publisher(read_only_broker: LocalBroker) -> None:
    async with connect(read_only_broker.url) as conn:
        await conn.subscribe("open/#", "lime/#")
        await conn.publish("open/ok", b"1", qos=1)  # allowed: no error
        with pytest.raises(PublishRefused, match=r"lime/v1/c/plan: Not authorized") as refused:
            await conn.publish("lime/v1/c/plan", b"{}", qos=1, retain=True)
        assert refused.value.topic == "lime/v1/c/plan"
        async with asyncio.timeout(5):  # only the allowed message came through
            message = await anext(conn.messages())
        assert message.topic == "open/ok"


@pytest.mark.integration
async def test_a_publish_to_nobody_is_known_when_asked_for(broker: LocalBroker, cluster_name: str) -> None:
    async with connect(broker.url) as conn:
        await conn.publish(f"{cluster_name}/nobody", b"1", qos=1)  # not asked: fine
        with pytest.raises(NoSubscribers):
            await conn.publish(f"{cluster_name}/nobody", b"1", qos=1, require_subscribers=True)
        await conn.subscribe(f"{cluster_name}/#")
        await conn.publish(f"{cluster_name}/somebody", b"1", qos=1, require_subscribers=True)


async def _stale_coordinator_status(broker: LocalBroker | MemoryBroker, cluster: str) -> None:
    """A retained coordinator status with no coordinator behind it (its will never came)."""
    status = CoordinatorStatus(v=1, name="ghost", state="online", model="tiny-llama")
    async with connect(broker.transport() if isinstance(broker, LocalBroker) else broker) as conn:
        await conn.publish(Topics(cluster).coordinator_status("ghost"), status.encode(), qos=1, retain=True)


@pytest.mark.integration
async def test_a_request_with_no_coordinator_subscribed_fails_at_once(broker: LocalBroker, cluster_name: str) -> None:
    await _stale_coordinator_status(broker, cluster_name)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LimeError, match="no coordinator subscribes to the requests"):
        await ask_final(broker.url, cluster_name, {"prompt": "Pump?", "max_tokens": 4}, timeout_s=60)
    assert loop.time() - started < 5  # not the 60 s timeout


async def test_the_twin_says_no_subscribers_as_mosquitto_does(cluster_name: str) -> None:
    broker = MemoryBroker()
    await _stale_coordinator_status(broker, cluster_name)
    with pytest.raises(LimeError, match="no coordinator subscribes to the requests"):
        await ask_final(broker, cluster_name, {"prompt": "Pump?", "max_tokens": 4}, timeout_s=60)
    async with connect(broker) as conn:
        with pytest.raises(NoSubscribers):
            await conn.publish("x/y", json.dumps({}).encode(), qos=1, require_subscribers=True)
        await conn.publish("x/y", b"", qos=0, require_subscribers=True)  # QoS 0 has no acknowledgement to read
