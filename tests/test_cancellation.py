"""A stopped service stops: a cancellation is never lost on the way through the MQTT
client (aiomqtt waits with asyncio.wait_for, which in Python 3.11 drops a cancellation
that arrives together with the result: python/cpython#86296)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker


async def _cancel_as_it_is_answered(call: Callable[[], Awaitable[Any]], answer: asyncio.Future[None],
                                    waiting: asyncio.Event) -> asyncio.Task[Any]:
    """Start ``call``; once it waits for ``answer``, give the answer and cancel it in the
    same turn of the event loop, as when the broker's SUBACK and a stop arrive together."""
    task = asyncio.create_task(call())
    await waiting.wait()  # set just before its wait_for, which it then entered without yielding
    answer.set_result(None)
    task.cancel()
    return task


async def test_a_cancellation_that_comes_with_the_brokers_answer_is_not_lost(
    broker: LocalBroker, cluster_name: str
) -> None:
    loop = asyncio.get_running_loop()
    async with connect(broker.url) as conn:
        suback, waiting = loop.create_future(), asyncio.Event()
        subscribe = conn._client.subscribe

        async def subscribe_answered_late(*args: Any, **kwargs: Any) -> Any:
            await subscribe(*args, **kwargs)  # the real one; then a wait as aiomqtt's own
            waiting.set()
            return await asyncio.wait_for(suback, 10)

        conn._client.subscribe = subscribe_answered_late
        task = await _cancel_as_it_is_answered(lambda: conn.subscribe(f"{cluster_name}/x"), suback, waiting)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps cancellations from Python 3.12 on")
async def test_without_the_guard_this_python_loses_that_cancellation() -> None:
    """The same race on a bare asyncio.wait_for: on Python 3.11 the call returns as if
    nothing happened, which is what the transport's guard is for."""
    loop = asyncio.get_running_loop()
    answer, waiting = loop.create_future(), asyncio.Event()

    async def bare_call() -> str:
        waiting.set()
        await asyncio.wait_for(answer, 10)
        return "went on"

    task = await _cancel_as_it_is_answered(bare_call, answer, waiting)
    assert await task == "went on"


async def test_a_connect_stopped_as_the_connack_comes_is_stopped_and_leaves_no_socket(
    broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiomqtt

    from lime_mqtt.transport.mqtt import MqttConnection

    loop = asyncio.get_running_loop()
    connack, waiting = loop.create_future(), asyncio.Event()
    clients: list[aiomqtt.Client] = []
    enter = aiomqtt.Client.__aenter__

    async def connected_late(self: aiomqtt.Client) -> aiomqtt.Client:
        clients.append(self)
        await enter(self)  # the real connection; then a wait as aiomqtt's own
        waiting.set()
        await asyncio.wait_for(connack, 10)
        return self

    monkeypatch.setattr(aiomqtt.Client, "__aenter__", connected_late)
    conn = MqttConnection(broker.url)
    task = await _cancel_as_it_is_answered(conn.__aenter__, connack, waiting)
    with pytest.raises(asyncio.CancelledError):
        await task
    [client] = clients
    assert client._client.socket() is None  # not left connected behind the caller's back
