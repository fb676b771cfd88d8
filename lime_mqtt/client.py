"""Ask the cluster a question over MQTT, the way a factory system would.

Uses the MQTT 5 request/response pattern: a Response Topic unique to this call and
Correlation Data that the coordinator echoes back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lime_mqtt.errors import LimeError, TransportError
from lime_mqtt.topics import Topics
from lime_mqtt.transport import MqttTransport


async def ask(
    broker: str,
    cluster: str,
    request: dict[str, Any],
    *,
    timeout_s: float = 300.0,
    transport: MqttTransport | None = None,
    wait_for_coordinator_s: float = 5.0,
) -> AsyncIterator[dict[str, Any]]:
    """Send one request; yield each chunk, then the final (or error) message, then stop.

    First it checks that a coordinator serves the cluster (its retained status), so that
    a request to an empty cluster fails at once instead of waiting ``timeout_s``.
    """
    topics = Topics(cluster)
    correlation = uuid.uuid4().bytes
    reply_topic = f"{topics.root}/responses/ask-{uuid.uuid4().hex[:12]}"

    async def exchange(conn: MqttTransport) -> AsyncIterator[dict[str, Any]]:
        await conn.subscribe(reply_topic, qos=1)
        if wait_for_coordinator_s > 0:
            await _coordinator_serving(conn, topics, wait_for_coordinator_s)
        await conn.publish(
            topics.requests, json.dumps(request).encode(), qos=1,
            response_topic=reply_topic, correlation_data=correlation,
        )
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
            yield answer
            if answer.get("type") in ("final", "error"):
                return

    if transport is not None:
        async for answer in exchange(transport):
            yield answer
        return
    async with MqttTransport(broker) as conn:
        async for answer in exchange(conn):
            yield answer


async def _coordinator_serving(conn: MqttTransport, topics: Topics, wait_s: float) -> None:
    await conn.subscribe(topics.all_coordinator_status, qos=1)
    messages = conn.messages()
    try:
        async with asyncio.timeout(wait_s):
            while True:
                message = await anext(messages)
                if message.topic.startswith(f"{topics.root}/coordinators/") and message.payload:
                    return
    except TimeoutError:
        raise LimeError(f"no coordinator is serving cluster {topics.cluster!r} on this broker") from None
    finally:
        await messages.aclose()
        await conn.unsubscribe(topics.all_coordinator_status)


async def ask_final(broker: str, cluster: str, request: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """The final (or error) message of one request, skipping the streamed chunks."""
    last: dict[str, Any] = {}
    async for answer in ask(broker, cluster, request, **kwargs):
        last = answer
    return last


async def cancel(broker: str, cluster: str, request_id: str, transport: MqttTransport | None = None) -> None:
    """Ask the coordinator to stop request ``request_id`` (the ``id`` every answer message
    carries). Its client then gets an error with code ``cancelled``, and every device frees
    the request's KV cache."""
    payload = json.dumps({"cancel": request_id}).encode()
    if transport is not None:
        await transport.publish(Topics(cluster).requests, payload, qos=1)
        return
    async with MqttTransport(broker) as conn:
        await conn.publish(Topics(cluster).requests, payload, qos=1)
