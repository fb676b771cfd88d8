"""Ask the cluster a question over MQTT, the way a factory system would.

Uses the MQTT 5 request/response pattern: a Response Topic unique to this call and
Correlation Data that the coordinator echoes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lime_mqtt.core.errors import LimeError, MessageError, NoSubscribers, TransportError
from lime_mqtt.core.topics import Topics
from lime_mqtt.core.view import ClusterView
from lime_mqtt.transport import BrokerAddress, Connection, Transport, transport_for

Broker = str | BrokerAddress | Transport  # a URL, or a transport with credentials


async def ask(
    broker: Broker,
    cluster: str,
    request: dict[str, Any],
    *,
    timeout_s: float = 300.0,
    connection: Connection | None = None,
    wait_for_coordinator_s: float = 5.0,
) -> AsyncIterator[dict[str, Any]]:
    """Send one request; yield each chunk, then the final (or error) message, then stop.

    First it checks that a coordinator serves the cluster (its retained status), so that
    a request to an empty cluster fails at once instead of waiting ``timeout_s``.

    If the connection to the broker is lost (a broker restart, say), it reconnects and
    sends a ``resume`` message: the coordinator sends again what came after the last chunk
    received (and serves the request if the broker lost it before delivering it). Chunks
    that arrive twice are dropped, so the stream has no gap and no repeat.
    """
    topics = Topics(cluster)
    correlation = uuid.uuid4().bytes
    reply_topic = f"{topics.root}/responses/ask-{uuid.uuid4().hex[:12]}"
    request = {**request}
    request.setdefault("id", uuid.uuid4().hex)  # so that it can be resumed
    last_chunk = -1
    asked = False

    async def publish(conn: Connection, body: dict[str, Any], require_subscribers: bool = False) -> None:
        await conn.publish(topics.requests, json.dumps(body).encode(), qos=1, response_topic=reply_topic,
                           correlation_data=correlation, require_subscribers=require_subscribers)

    async def exchange(conn: Connection) -> AsyncIterator[dict[str, Any]]:
        nonlocal last_chunk, asked
        await conn.subscribe(reply_topic, qos=1)
        if wait_for_coordinator_s > 0:
            await _coordinator_serving(conn, topics, wait_for_coordinator_s)
        try:
            # The broker's PUBACK says whether anyone subscribes to the request topic: a
            # coordinator that is gone (its status retained by mistake, say) is known now,
            # not after the timeout. A coordinator that is only away keeps its session, and
            # with it its subscription.
            await publish(conn, request, require_subscribers=True)
        except NoSubscribers:
            raise LimeError(f"no coordinator subscribes to the requests of cluster {topics.cluster!r}: the "
                            "broker delivered the request to nobody") from None
        asked = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        messages = conn.messages()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await anext(messages)
            except StopAsyncIteration:
                raise TransportError("the connection ended before the answer did") from None
            except TimeoutError:
                raise TimeoutError(f"no complete answer within {timeout_s:.0f} s") from None
            if message.topic != reply_topic or message.correlation_data != correlation:
                continue
            answer = json.loads(message.payload)
            if answer.get("type") == "chunk":
                if not isinstance(answer.get("index"), int) or answer["index"] <= last_chunk:
                    continue  # sent again after a reconnect
                last_chunk = answer["index"]
            yield answer
            if answer.get("type") in ("final", "error"):
                return

    if connection is not None:
        async for answer in exchange(connection):
            yield answer
        return

    async def resume() -> None:
        if asked:
            await publish(conn, {"resume": request["id"], "after": last_chunk, "request": request})

    async with transport_for(broker).connection(reconnect=True, on_reconnect=resume) as conn:
        async for answer in exchange(conn):
            yield answer


async def _coordinator_serving(conn: Connection, topics: Topics, wait_s: float) -> None:
    """Until a coordinator's retained status says it serves this cluster (or LimeError)."""
    view = ClusterView(topics)
    await conn.subscribe(topics.all_coordinator_status, qos=1)
    messages = conn.messages()
    try:
        async with asyncio.timeout(wait_s):
            while not view.coordinators:
                message = await anext(messages)
                with contextlib.suppress(MessageError):  # a malformed status is no coordinator
                    view.take(message.topic, message.payload, message.retain)
    except TimeoutError:
        raise LimeError(f"no coordinator is serving cluster {topics.cluster!r} on this broker") from None
    finally:
        await messages.aclose()
        await conn.unsubscribe(topics.all_coordinator_status)


async def ask_final(broker: Broker, cluster: str, request: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """The final (or error) message of one request, skipping the streamed chunks."""
    last: dict[str, Any] = {}
    async for answer in ask(broker, cluster, request, **kwargs):
        last = answer
    return last


async def cancel(broker: Broker, cluster: str, request_id: str, connection: Connection | None = None) -> None:
    """Ask the coordinator to stop request ``request_id`` (the ``id`` every answer message
    carries). Its client then gets an error with code ``cancelled``, and every device frees
    the request's KV cache."""
    payload = json.dumps({"cancel": request_id}).encode()
    if connection is not None:
        await connection.publish(Topics(cluster).requests, payload, qos=1)
        return
    async with transport_for(broker).connection() as conn:
        await conn.publish(Topics(cluster).requests, payload, qos=1)
