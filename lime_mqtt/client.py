"""Ask the cluster a question over MQTT, the way a factory system would.

A client sends its requests on ``client/{name}/requests`` and reads its answers on
``coordinator/+/to/client/{name}/answer/{id}`` (docs/topics.md); with the broker's ACL
only it can do either. Its name is its MQTT user name's (``client/{name}``) when the
transport has credentials, else ``client`` (default ``default``). The MQTT 5
Correlation Data it sends is echoed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lime_mqtt.core.errors import LimeError, MessageError, NoSubscribers, TransportError
from lime_mqtt.core.topics import Topics, valid_arg, valid_name
from lime_mqtt.core.view import ClusterView
from lime_mqtt.transport import BrokerAddress, Connection, Transport, transport_for
from lime_mqtt.transport.base import identity_of

Broker = str | BrokerAddress | Transport  # a URL, or a transport with credentials


async def ask(
    broker: Broker,
    cluster: str,
    request: dict[str, Any],
    *,
    timeout_s: float = 300.0,
    connection: Connection | None = None,
    wait_for_coordinator_s: float = 5.0,
    client: str | None = None,
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
    connection_transport = transport_for(broker) if connection is None else None
    name = client_name(connection_transport if connection_transport is not None else broker, client)
    correlation = uuid.uuid4().bytes
    request = {**request}
    request.setdefault("id", uuid.uuid4().hex)  # so that it can be resumed
    if not isinstance(request["id"], str) or not valid_arg(request["id"]):
        raise LimeError(f"request id {str(request['id'])[:64]!r} must be 1 to 128 characters without / + # or space")
    request_topic, answers = topics.requests(name), topics.answers_inbox(name)
    last_chunk = -1
    asked = False

    async def publish(conn: Connection, body: dict[str, Any], require_subscribers: bool = False) -> None:
        await conn.publish(request_topic, json.dumps(body).encode(), qos=1, correlation_data=correlation,
                           require_subscribers=require_subscribers)

    async def exchange(conn: Connection) -> AsyncIterator[dict[str, Any]]:
        nonlocal last_chunk, asked
        await conn.subscribe(answers, qos=1)
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
            route = topics.parse(message.topic)
            if route is None or route.kind != "answer" or route.arg != request["id"] or (
                    message.correlation_data is not None and message.correlation_data != correlation):
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

    assert connection_transport is not None
    async with connection_transport.connection(reconnect=True, on_reconnect=resume) as conn:
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


async def cancel(broker: Broker, cluster: str, request_id: str, connection: Connection | None = None,
                 client: str | None = None) -> None:
    """Ask the coordinator to stop this client's request ``request_id`` (the ``id`` every
    answer message carries). The client then gets an error with code ``cancelled``, and
    every device frees the request's KV cache. Another client's request of the same id is
    not touched."""
    payload = json.dumps({"cancel": request_id}).encode()
    topic = Topics(cluster).requests(client_name(broker, client))
    if connection is not None:
        await connection.publish(topic, payload, qos=1)
        return
    async with transport_for(broker).connection() as conn:
        await conn.publish(topic, payload, qos=1)


def client_name(broker: Broker, client: str | None = None) -> str:
    """The name a client sends under: ``client``, else its user name's (``client/{name}``),
    else ``default``. :class:`LimeError` if the two disagree or the name is no topic level."""
    identity = identity_of(broker) if not isinstance(broker, str | BrokerAddress) else None
    if identity is not None and identity.role != "client":
        identity = None  # an operator's or another role's credentials: the client is named by hand
    if identity is not None and client is not None and identity.name != client:
        raise LimeError(f"client name {client!r} is not this user's ({identity.username}): the broker would refuse")
    name = client or (identity.name if identity is not None else "default")
    if not valid_name(name):
        raise LimeError(f"client name {name!r} must be 1 to 64 characters without / + # or space")
    return name
