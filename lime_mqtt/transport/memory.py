"""An in-memory twin of the transport (lime_mqtt/transport/base.py), for logic tests.

:class:`MemoryBroker` is a :class:`~lime_mqtt.transport.base.Transport` whose broker lives
in this event loop: services (coordinator, planner, device agent) given one run their
logic in milliseconds, with no broker process and no sockets. It behaves as the MQTT
implementation does as seen by a caller (topic filters, retained messages, MQTT 5
response topic and correlation data, last wills, sessions, reconnects, takeover), and
lets a test make the faults a network makes: :meth:`MemoryBroker.drop` one client,
:meth:`MemoryBroker.partition` it for a while, or :meth:`MemoryBroker.stop` the broker.

It is a model, not a proof: what depends on the network (sockets, TLS, credentials and
ACLs, message size limits, timing, Mosquitto's own quirks) is still tested on a real
Mosquitto. tests/test_transport_twin.py runs one contract against both.

Differences worth knowing (Mosquitto 2.0.11 measured): a message matched by several
subscriptions of one client arrives once here, but once per subscription from
Mosquitto, unless ``copy_per_subscription=True``. QoS 2 is accepted and treated as QoS 1.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Self

from lime_mqtt.core.errors import NoSubscribers, TransportError
from lime_mqtt.transport.base import MAX_TOPIC_BYTES, LastWill, Message, ReconnectHook, check_topic

if TYPE_CHECKING:
    from lime_mqtt.transport.base import Connection, Transport

# The project's Mosquitto keeps at most this many messages for a client that is away
# (broker/mosquitto.conf, max_queued_messages); newer ones are dropped.
MAX_QUEUED_MESSAGES = 10000

log = logging.getLogger(__name__)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether an MQTT topic filter matches a topic name.

    ``+`` matches exactly one level (an empty one too), ``#`` the rest of the levels,
    none included (``a/#`` matches ``a``). A filter that starts with a wildcard does not
    match topics that start with ``$`` (``$SYS/...``), as MQTT requires.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    for i, part in enumerate(topic_filter.split("/")):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(topic_filter.split("/")) == len(levels)


def check_filter(topic_filter: str) -> None:
    """A valid topic filter: ``+`` alone in its level, ``#`` alone in the last; TransportError otherwise."""
    parts = topic_filter.split("/")
    valid = bool(topic_filter) and "\0" not in topic_filter and len(topic_filter.encode()) <= MAX_TOPIC_BYTES
    for i, part in enumerate(parts):
        if ("+" in part and part != "+") or ("#" in part and (part != "#" or i != len(parts) - 1)):
            valid = False
    if not valid:
        raise TransportError(f"invalid topic filter {topic_filter!r}")


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise TransportError(f"QoS must be 0, 1 or 2, not {qos!r}")


@dataclass(frozen=True)
class _Lost:
    """Put in a non-reconnecting connection's inbox when its connection is lost."""

    reason: str


@dataclass
class _Session:
    """What the broker keeps for one client id: its subscriptions and, while it is away
    with a session expiry, the QoS 1 messages sent to them."""

    client_id: str
    expiry_s: int
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> QoS
    queued: deque[Message] = field(default_factory=deque)
    connection: MemoryConnection | None = None
    gone_at: float | None = None  # clock time the client went away

    def expired(self, now: float) -> bool:
        return self.gone_at is not None and now - self.gone_at >= self.expiry_s


class MemoryBroker:
    """An MQTT broker in this event loop, and the transport that reaches it.

    ``connection(...)`` opens a :class:`MemoryConnection`. Faults for tests: ``drop(id)``
    loses one client's network (its will is published; a reconnecting one comes back at
    once), ``partition(id)`` does the same and keeps it away until ``heal(id)``, and
    ``stop()``/``start()``/``restart()`` stop the broker as Mosquitto stops: every client is
    disconnected (wills published first), sessions are lost, retained messages are kept;
    ``lose(rule)`` loses every QoS 0 message for which ``rule(topic, payload)`` is true, as
    a network may.

    ``clock`` times session expiry (a test may pass its own); ``copy_per_subscription``
    delivers one copy per matching subscription, as Mosquitto 2.0 does, instead of one.
    Two reconnecting connections with one client id take each other over without end,
    as they do on Mosquitto (where the reconnect backoff only slows it down).
    """

    def __init__(
        self,
        *,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        copy_per_subscription: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_queued_messages = max_queued_messages
        self.copy_per_subscription = copy_per_subscription
        self._clock = clock
        self._up = True
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}  # topic -> message, retain=True
        self._partitioned: set[str] = set()
        self._losses: list[Callable[[str, bytes], bool]] = []
        # Set and replaced whenever a client may now connect again (start, heal): waiters
        # hold the old event, so each change wakes all of them once.
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return f"MemoryBroker({state}, {len(self.clients)} clients, {len(self._retained)} retained)"

    # -- Transport -------------------------------------------------------------------

    def connection(
        self,
        client_id: str | None = None,
        *,
        will: LastWill | None = None,
        reconnect: bool = False,
        session_expiry_s: int = 0,
        on_reconnect: ReconnectHook | None = None,
    ) -> MemoryConnection:
        return MemoryConnection(
            self, client_id, will, reconnect=reconnect, session_expiry_s=session_expiry_s, on_reconnect=on_reconnect
        )

    # -- what a test looks at --------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    @property
    def clients(self) -> frozenset[str]:
        """Ids of the clients connected now."""
        return frozenset(cid for cid, s in self._sessions.items() if s.connection is not None)

    def retained(self, topic: str) -> bytes | None:
        """The retained payload of ``topic``, None if there is none."""
        message = self._retained.get(topic)
        return None if message is None else message.payload

    # -- faults a test makes ---------------------------------------------------------

    def drop(self, client_id: str) -> None:
        """Lose one client's network (an unclean disconnect): its will is published, its
        connection is lost; a reconnecting one comes back at once if the broker is up."""
        session = self._sessions.get(client_id)
        if session is None or session.connection is None:
            raise KeyError(f"{client_id!r} is not connected to {self!r}")
        self._disconnect(session.connection, "connection dropped", will=True)

    def lose(self, rule: Callable[[str, bytes], bool]) -> None:
        """From now on, lose the QoS 0 messages for which ``rule(topic, payload)`` is true."""
        self._losses.append(rule)

    def partition(self, client_id: str) -> None:
        """Cut one client off until :meth:`heal`: dropped as by :meth:`drop` if connected,
        and its connections are refused meanwhile (a reconnecting one waits)."""
        self._partitioned.add(client_id)
        if client_id in self.clients:
            self.drop(client_id)

    def heal(self, client_id: str) -> None:
        """End a :meth:`partition`: a reconnecting client comes back (if the broker is up)."""
        self._partitioned.discard(client_id)
        self._wake()

    async def stop(self) -> None:
        """Stop as Mosquitto stops: wills of all clients are published (while they are all
        still connected), then every connection is lost; sessions are lost, retained
        messages kept. New connections fail until :meth:`start`."""
        if not self._up:
            return
        self._up = False
        online = [s.connection for s in self._sessions.values() if s.connection is not None]
        for conn in online:
            if conn.will is not None:
                self._publish_will(conn.will)
        self._sessions.clear()
        for conn in online:
            conn._on_lost("the memory broker stopped")
        log.info("memory broker stopped: %d clients disconnected", len(online))
        await asyncio.sleep(0)

    def start(self) -> None:
        """Start again: reconnecting connections come back (re-subscribe, then their hook)."""
        if self._up:
            return
        self._up = True
        log.info("memory broker started")
        self._wake()

    async def restart(self) -> None:
        await self.stop()
        self.start()

    # -- what connections ask of the broker ------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _reachable(self, client_id: str) -> bool:
        return self._up and client_id not in self._partitioned

    async def _wait_reachable(self, client_id: str) -> None:
        while not self._reachable(client_id):
            await self._changed.wait()

    def _attach(self, conn: MemoryConnection, clean_start: bool) -> None:
        """Connect ``conn``: a client already connected with its id is taken over (dropped
        with its will). Without ``clean_start`` a kept session resumes, and what was
        queued for it is delivered now."""
        if not self._up:
            raise TransportError(f"cannot connect to {self!r}: it is stopped")
        if conn.client_id in self._partitioned:
            raise TransportError(f"cannot connect {conn.client_id!r} to {self!r}: partitioned")
        now = self._clock()
        session = self._sessions.get(conn.client_id)
        if session is not None and session.connection is not None:
            log.warning("%s: client id taken over by a new connection", conn.client_id)
            self._disconnect(session.connection, "session taken over by another connection", will=True)
            session = self._sessions.get(conn.client_id)
        if session is None or clean_start or session.expired(now):
            session = _Session(conn.client_id, conn.session_expiry_s)
            self._sessions[conn.client_id] = session
        session.expiry_s = conn.session_expiry_s
        session.connection = conn
        session.gone_at = None
        while session.queued:
            conn._deliver(session.queued.popleft())

    def _disconnect(self, conn: MemoryConnection, reason: str, *, will: bool) -> None:
        """Take ``conn`` off the broker; with ``will`` (an unclean end) publish its will,
        then tell it that its connection is lost. A session with an expiry stays."""
        session = self._sessions.get(conn.client_id)
        if session is None or session.connection is not conn:
            return
        session.connection = None
        if session.expiry_s > 0 and will:
            session.gone_at = self._clock()
        else:
            del self._sessions[conn.client_id]
        if will:
            if conn.will is not None:
                self._publish_will(conn.will)
            conn._on_lost(reason)

    def _publish_will(self, will: LastWill) -> None:
        self._publish(will.topic, will.payload, will.qos, will.retain, None, None)

    def _publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        correlation_data: bytes | None,
        response_topic: str | None,
    ) -> bool:
        """Deliver (or queue for a session away) to every matching subscriber; whether any matched."""
        if qos == 0 and any(rule(topic, payload) for rule in self._losses):
            return True  # taken, and lost on the way
        live = Message(topic, payload, False, response_topic, correlation_data)
        matched = False
        if retain:
            if payload:
                self._retained[topic] = replace(live, retain=True)
            else:
                self._retained.pop(topic, None)
        now = self._clock()
        for session in list(self._sessions.values()):
            granted = [q for f, q in session.subscriptions.items() if topic_matches(f, topic)]
            if not granted:
                continue
            matched = True
            if session.connection is not None:
                for _ in range(len(granted) if self.copy_per_subscription else 1):
                    session.connection._deliver(live)
            elif session.expired(now):
                del self._sessions[session.client_id]
            else:
                copies = [q for q in granted if min(q, qos) >= 1]
                for _ in range(len(copies) if self.copy_per_subscription else min(len(copies), 1)):
                    self._queue(session, live)
        return matched

    def _queue(self, session: _Session, message: Message) -> None:
        if len(session.queued) >= self.max_queued_messages:
            log.warning("%s: away with %d messages queued; dropping one to %s",
                        session.client_id, len(session.queued), message.topic)
            return
        session.queued.append(message)

    def _subscribe(self, conn: MemoryConnection, filters: dict[str, int]) -> None:
        """Add subscriptions, then send the retained messages that match them."""
        session = self._session_of(conn)
        session.subscriptions.update(filters)
        for message in self._retained.values():
            matching = sum(topic_matches(f, message.topic) for f in filters)
            for _ in range(matching if self.copy_per_subscription else min(matching, 1)):
                conn._deliver(message)

    def _unsubscribe(self, conn: MemoryConnection, filters: tuple[str, ...]) -> None:
        session = self._session_of(conn)
        for topic_filter in filters:
            session.subscriptions.pop(topic_filter, None)

    def _session_of(self, conn: MemoryConnection) -> _Session:
        session = self._sessions.get(conn.client_id)
        if session is None or session.connection is not conn:
            raise TransportError(f"{conn.client_id}: not connected to {self!r}")
        return session


class MemoryConnection:
    """One client's connection to a :class:`MemoryBroker`; an async context manager.

    As :class:`~lime_mqtt.transport.mqtt.MqttConnection`: one inbox that outlives
    reconnects; with ``reconnect`` a lost connection is made again by a task of this
    connection (as soon as the broker lets it), the subscriptions are restored and
    ``on_reconnect`` is awaited (its failure logged); meanwhile ``publish`` and
    ``subscribe`` wait. Without it, ``messages`` raises TransportError once the connection
    is lost, and so do ``publish`` and ``subscribe``.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str | None = None,
        will: LastWill | None = None,
        *,
        reconnect: bool = False,
        session_expiry_s: int = 0,
        on_reconnect: ReconnectHook | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id or f"lime-{uuid.uuid4().hex[:12]}"
        self.will = will
        self.reconnect = reconnect
        self.session_expiry_s = session_expiry_s
        self.on_reconnect = on_reconnect
        self._subscriptions: dict[str, int] = {}  # filter -> QoS, restored on reconnect
        self._inbox: asyncio.Queue[Message | _Lost] = asyncio.Queue()
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._entered = False
        self._closing = False

    def __repr__(self) -> str:
        if self._up.is_set():
            state = "connected"
        elif self._entered and self.reconnect and not self._closing:
            state = "reconnecting"
        else:
            state = "closed"
        return f"MemoryConnection({self.client_id!r}, memory, {state})"

    async def __aenter__(self) -> Self:
        if self.will is not None:
            check_topic(self.will.topic)
            _check_qos(self.will.qos)
        self._inbox = asyncio.Queue()
        self._up.clear()
        self._lost.clear()
        self._closing = False
        self.broker._attach(self, clean_start=True)
        self._up.set()
        self._entered = True
        if self.reconnect:
            self._keeper = asyncio.create_task(self._keep_connected(), name=f"{self.client_id}-reconnect")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """A clean disconnect: no will is published, and the session ends."""
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        self.broker._disconnect(self, "closed", will=False)
        self._up.clear()

    def _deliver(self, message: Message) -> None:
        self._inbox.put_nowait(message)

    def _on_lost(self, reason: str) -> None:
        """The broker ended this connection (not a clean exit of ours)."""
        self._up.clear()
        if self._closing:
            return
        if self.reconnect:
            self._lost.set()
        else:
            self._inbox.put_nowait(_Lost(reason))

    async def _keep_connected(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            log.warning("%s: connection to the memory broker lost; reconnecting", self.client_id)
            while True:
                await self.broker._wait_reachable(self.client_id)
                try:
                    self.broker._attach(self, clean_start=not self.session_expiry_s)
                    break
                except TransportError as exc:  # not reachable after all: wait for the next change
                    log.info("%s: reconnect failed (%s)", self.client_id, exc)
                    await asyncio.sleep(0)
            if self._subscriptions:
                self.broker._subscribe(self, dict(self._subscriptions))
            self._up.set()
            log.warning("%s: reconnected to the memory broker", self.client_id)
            if self.on_reconnect is not None:
                try:
                    await self.on_reconnect()
                except Exception:  # the hook's failure must not stop reconnecting
                    log.exception("%s: after reconnecting", self.client_id)

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Until the connection is up (at once when it is); TransportError after ``timeout_s``,
        or at once when it is down and does not reconnect."""
        if self._up.is_set():
            return
        if not self.reconnect or self._closing or not self._entered:
            raise TransportError(f"{self.client_id}: not connected to the memory broker")
        try:
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        except TimeoutError:
            raise TransportError(f"{self.client_id}: no connection to the memory broker for {timeout_s} s") from None

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        require_subscribers: bool = False,
    ) -> None:
        """Publish; while a reconnecting connection is down this waits, then sends. At QoS 1
        with ``require_subscribers``, a message nobody subscribes to raises NoSubscribers
        (Mosquitto's PUBACK reason 0x10)."""
        check_topic(topic)
        _check_qos(qos)
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        await self.wait_connected()
        matched = self.broker._publish(topic, data, qos, retain, correlation_data, response_topic)
        if qos:
            await asyncio.sleep(0)  # the acknowledgement's turn of the loop
            if require_subscribers and not matched:
                raise NoSubscribers(topic)

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        for topic in topics:
            check_filter(topic)
        _check_qos(qos)
        self._subscriptions.update({t: qos for t in topics})
        await self.wait_connected()
        self.broker._subscribe(self, {t: qos for t in topics})
        await asyncio.sleep(0)

    async def unsubscribe(self, *topics: str) -> None:
        for topic in topics:
            self._subscriptions.pop(topic, None)
        await self.wait_connected()
        self.broker._unsubscribe(self, topics)
        await asyncio.sleep(0)

    async def messages(self) -> AsyncGenerator[Message, None]:
        """Received messages, in order, until the connection is lost (then TransportError).

        As with the MQTT connection this is a generator: a timeout or cancellation that
        interrupts it closes it, and a later ``messages()`` goes on from the same inbox.
        """
        while True:
            item = await self._inbox.get()
            if isinstance(item, _Lost):
                raise TransportError(f"{self.client_id}: connection to the memory broker lost ({item.reason})")
            yield item


if TYPE_CHECKING:
    _transport: Transport = MemoryBroker()
    _connection: Connection = MemoryConnection(MemoryBroker())
