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
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lime_mqtt.core.errors import LimeError, MessageError, NoSubscribers, TransportError
from lime_mqtt.core.topics import Topics, valid_arg, valid_name
from lime_mqtt.core.view import ClusterView
from lime_mqtt.transport import BrokerAddress, Connection, Transport, transport_for
from lime_mqtt.transport.base import Message, identity_of

log = logging.getLogger(__name__)

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
    request = with_id(request)  # so that it can be resumed
    request_topic, answers = topics.requests(name), topics.answers_inbox(name)
    tracker = AnswerTracker(request)
    view = ClusterView(topics)  # the coordinators serving: one that goes takes its answers with it
    asked = False

    async def publish(conn: Connection, body: dict[str, Any], require_subscribers: bool = False) -> None:
        await conn.publish(request_topic, json.dumps(body).encode(), qos=1, correlation_data=correlation,
                           require_subscribers=require_subscribers)

    async def exchange(conn: Connection) -> AsyncIterator[dict[str, Any]]:
        nonlocal asked
        await conn.subscribe(answers, topics.all_coordinator_status, qos=1)
        if wait_for_coordinator_s > 0:
            await _coordinator_serving(conn, view, wait_for_coordinator_s)
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
            if route is not None and route.kind == "status" and route.sender.role == "coordinator":
                if tracker.lost(_coordinators_gone(view, message)):
                    # The coordinator serving this answer is gone: another continues it.
                    await publish(conn, tracker.resume())
                continue
            if route is None or route.kind != "answer" or route.arg != request["id"] or (
                    message.correlation_data is not None and message.correlation_data != correlation):
                continue
            answer = json.loads(message.payload)
            if not isinstance(answer, dict) or not tracker.take(answer, route.sender.name):
                continue
            yield answer
            if answer.get("type") in ("final", "error"):
                return

    if connection is not None:
        async for answer in exchange(connection):
            yield answer
        return

    async def resume() -> None:
        if asked:
            await publish(conn, tracker.resume())

    assert connection_transport is not None
    async with connection_transport.connection(reconnect=True, on_reconnect=resume) as conn:
        async for answer in exchange(conn):
            yield answer


class AnswerTracker:
    """What a client has received of one answer, so that the answer can be resumed without
    a gap or a repeat: the last chunk's index, the tokens of the chunks, and the
    coordinator that serves it (answers from another are ignored until a resume)."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.last_chunk = -1
        self.token_ids: list[int] = []
        self.serving: str | None = None  # the coordinator the answers come from

    def take(self, answer: dict[str, Any], coordinator: str) -> bool:
        """Whether ``answer`` (from ``coordinator``) is new and belongs to the stream."""
        if self.serving is not None and coordinator != self.serving:
            return False  # a coordinator that was given up on
        self.serving = coordinator
        if answer.get("type") == "chunk":
            if not isinstance(answer.get("index"), int) or answer["index"] <= self.last_chunk:
                return False  # sent again after a reconnect or a resume
            self.last_chunk = answer["index"]
            ids = answer.get("token_ids")
            self.token_ids += [t for t in ids if isinstance(t, int)] if isinstance(ids, list) else []
        return True

    def lost(self, gone: set[str]) -> bool:
        """Whether the coordinators in ``gone`` (their status cleared: they died or left)
        took this answer with them: then it must be resumed on another."""
        if not gone or (self.serving is not None and self.serving not in gone):
            return False
        self.serving = None  # the next coordinator to answer serves it
        return True

    def resume(self) -> dict[str, Any]:
        """The resume message: what came after the last chunk, continuing after its tokens."""
        return {"resume": self.request["id"], "after": self.last_chunk, "request": self.request,
                "token_ids": self.token_ids}


def with_id(request: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``request`` with an ``id`` (a new one if it has none); LimeError if its id
    is no topic level."""
    request = {**request}
    request.setdefault("id", uuid.uuid4().hex)
    if not isinstance(request["id"], str) or not valid_arg(request["id"]):
        raise LimeError(f"request id {str(request['id'])[:64]!r} must be 1 to 128 characters without / + # or space")
    return request


async def _coordinator_serving(conn: Connection, view: ClusterView, wait_s: float) -> None:
    """Until a coordinator's retained status says it serves this cluster (or LimeError).
    The caller has subscribed to the coordinators' status; ``view`` keeps what arrives."""
    messages = conn.messages()
    try:
        async with asyncio.timeout(wait_s):
            while not view.coordinators:
                message = await anext(messages)
                with contextlib.suppress(MessageError):  # a malformed status is no coordinator
                    view.take(message.topic, message.payload, message.retain)
    except TimeoutError:
        raise LimeError(f"no coordinator is serving cluster {view.topics.cluster!r} on this broker") from None
    finally:
        await messages.aclose()


def _coordinators_gone(view: ClusterView, message: Message) -> set[str]:
    """Absorb a coordinator status; the coordinators it says are gone."""
    before = set(view.coordinators)
    with contextlib.suppress(MessageError):
        view.take(message.topic, message.payload, message.retain)
    return before - set(view.coordinators)


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


class ClientSession:
    """One connection that carries many requests at once (the HTTP bridge's, per client
    identity): each answer goes to the request it belongs to, by its id.

    An async context manager; inside it, :meth:`ask` streams one request's answer and
    :meth:`cancel` stops one. It reconnects by itself, and then asks the coordinator again
    for what each request in flight missed (``resume``), as :func:`ask` does. A request
    whose caller stops reading (a closed HTTP stream) is cancelled on the coordinator, so
    every device frees its KV cache.
    """

    def __init__(self, broker: Broker, cluster: str, *, client: str | None = None, timeout_s: float = 300.0,
                 wait_for_coordinator_s: float = 5.0) -> None:
        self.transport = transport_for(broker)
        self.name = client_name(self.transport, client)
        self.topics = Topics(cluster)
        self.timeout_s = timeout_s
        self.wait_for_coordinator_s = wait_for_coordinator_s
        self.view = ClusterView(self.topics)  # the coordinators serving, from their retained status
        self._coordinator_seen = asyncio.Event()
        self._inflight: dict[str, _InFlight] = {}
        self._conn: Connection | None = None
        self._receiver: asyncio.Task[None] | None = None  # owned: cancelled and awaited on the way out

    def __repr__(self) -> str:
        return f"ClientSession({self.topics.cluster!r}, client={self.name!r}, in_flight={len(self._inflight)})"

    async def __aenter__(self) -> ClientSession:
        self._conn = self.transport.connection(f"lime-client-{self.name}-{uuid.uuid4().hex[:8]}", reconnect=True,
                                               on_reconnect=self._resume_all)
        await self._conn.__aenter__()
        try:
            await self._conn.subscribe(self.topics.answers_inbox(self.name), self.topics.all_coordinator_status, qos=1)
            self._receiver = asyncio.create_task(self._receive(), name=f"client-{self.name}-receive")
        except BaseException:
            await self._conn.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._conn is not None and self._receiver is not None
        try:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)  # its own failures are logged there
        finally:
            await self._conn.__aexit__(None, None, None)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def coordinators(self) -> list[str]:
        return self.view.serving_coordinators()

    async def ask(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send one request; yield its chunks, then its final (or error) message. Leaving
        the loop early cancels the request on the coordinator."""
        conn = self._conn
        if conn is None:
            raise LimeError("the client session is not open")
        request = with_id(request)
        request_id = request["id"]
        if request_id in self._inflight:
            raise LimeError(f"request {request_id} is already in flight on this session")
        await self._wait_for_coordinator()
        flight = self._inflight[request_id] = _InFlight(request)
        finished = False
        try:
            try:
                await conn.publish(self.topics.requests(self.name), json.dumps(request).encode(), qos=1,
                                   require_subscribers=True)
                flight.asked = True
            except NoSubscribers:
                raise LimeError(f"no coordinator subscribes to the requests of cluster {self.topics.cluster!r}: "
                                "the broker delivered the request to nobody") from None
            async with asyncio.timeout(self.timeout_s):
                while True:
                    answer = await flight.queue.get()
                    yield answer
                    if answer.get("type") in ("final", "error"):
                        finished = True
                        return
        except TimeoutError:
            raise TimeoutError(f"no complete answer within {self.timeout_s:.0f} s") from None
        finally:
            del self._inflight[request_id]
            if not finished:
                # The caller stopped reading (or the wait ran out): stop the work it paid for.
                with contextlib.suppress(LimeError, TimeoutError):
                    async with asyncio.timeout(5):
                        await asyncio.shield(self.cancel(request_id))

    async def cancel(self, request_id: str) -> None:
        if self._conn is not None:
            await self._conn.publish(self.topics.requests(self.name), json.dumps({"cancel": request_id}).encode(),
                                     qos=1)

    async def _wait_for_coordinator(self) -> None:
        if self.view.coordinators or self.wait_for_coordinator_s <= 0:
            return
        try:
            async with asyncio.timeout(self.wait_for_coordinator_s):
                while not self.view.coordinators:
                    self._coordinator_seen.clear()
                    await self._coordinator_seen.wait()
        except TimeoutError:
            raise LimeError(f"no coordinator is serving cluster {self.topics.cluster!r} on this broker") from None

    async def _receive(self) -> None:
        """Route answers to their requests; if the connection fails for good, every request
        in flight gets an error instead of waiting for its timeout."""
        try:
            await self._route_answers()
        except Exception as exc:  # the supervisor of this session's receiving
            log.exception("client session %s: receiving failed", self.name)
            for flight in self._inflight.values():
                flight.queue.put_nowait({"type": "error", "error": {"code": "transport_error", "message": str(exc)}})

    async def _route_answers(self) -> None:
        assert self._conn is not None
        async for message in self._conn.messages():
            route = self.topics.parse(message.topic)
            if route is None:
                continue
            if route.kind == "status":
                gone = _coordinators_gone(self.view, message)
                self._coordinator_seen.set()
                for waiting in list(self._inflight.values()):
                    if waiting.asked and waiting.tracker.lost(gone):
                        await self._publish(waiting.tracker.resume())  # another coordinator continues it
                continue
            if route.kind != "answer" or route.arg is None or (flight := self._inflight.get(route.arg)) is None:
                continue
            try:
                answer = json.loads(message.payload)
            except ValueError:
                continue
            if isinstance(answer, dict) and flight.tracker.take(answer, route.sender.name):
                flight.queue.put_nowait(answer)

    async def _publish(self, body: dict[str, Any]) -> None:
        assert self._conn is not None
        await self._conn.publish(self.topics.requests(self.name), json.dumps(body).encode(), qos=1)

    async def _resume_all(self) -> None:
        for flight in list(self._inflight.values()):
            if flight.asked:
                await self._publish(flight.tracker.resume())


class _InFlight:
    def __init__(self, request: dict[str, Any]) -> None:
        self.tracker = AnswerTracker(request)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.asked = False  # the request itself has gone out
