"""The MQTT implementation of the transport interface (lime_mqtt/transport/base.py).

The only module that imports aiomqtt or paho: their types stay here, and their errors
become :class:`~lime_mqtt.core.errors.TransportError` at this boundary.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import ssl
import threading
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as paho_mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from lime_mqtt.core.errors import ConfigError, NoSubscribers, PublishRefused, TransportError
from lime_mqtt.transport.base import BrokerAddress, LastWill, Message, ReconnectHook, check_topic

CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # for the DISCONNECT to be written on the way out
# Reconnecting: the first retry after about RECONNECT_MIN_S, doubling to RECONNECT_MAX_S,
# each delay jittered by +-50% so that a whole cluster does not knock at once.
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
_DISCONNECTED = object()
MAX_PACKET_PAYLOAD = 268_435_455 - 65_535 - 8  # MQTT's largest packet, less the largest topic and header

log = logging.getLogger(__name__)
T = TypeVar("T")

# The message id of the QoS 1 publish the current task is waiting for (see _hear_acks).
_PUBLISH_MID: ContextVar[int | None] = ContextVar("lime_publish_mid", default=None)

# CONNACK reason codes that say the credentials are wrong (MQTT 5: 0x86 bad user name or
# password, 0x87 not authorized, which Mosquitto 2.0 sends for a wrong password too;
# MQTT 3.1.1: 4 and 5).
_LOGIN_REFUSED = {0x86, 0x87, 4, 5}


async def _keeping_cancellation(call: Awaitable[T]) -> T:
    """``await call``, one of aiomqtt's, without losing a cancellation of the caller.

    aiomqtt waits with ``asyncio.wait_for``, which in Python 3.11 returns the result and
    drops a cancellation that arrives in the same turn of the event loop as the broker's
    answer (python/cpython#86296; fixed in 3.12). A device agent cancelled just as its
    SUBACK arrived served on and never stopped. Here the cancellation is raised anyway."""
    task = asyncio.current_task()
    requested = task.cancelling() if task is not None else 0
    result = await call
    if task is not None and task.cancelling() > requested:
        raise asyncio.CancelledError
    return result


class _LoginRefused(TransportError):
    """The broker's CONNACK refused the credentials."""


@dataclass(frozen=True)
class TlsFiles:
    """The files of a TLS connection: the CA to trust (None: the system's CAs) and an
    optional client certificate and key. The broker's name is always checked against its
    certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def parameters(self) -> aiomqtt.TLSParameters:
        return aiomqtt.TLSParameters(ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MqttConnection:
    """One MQTT 5 connection; an async context manager that owns it.

    TCP_NODELAY is set on the socket: without it each small round trip costs tens of
    milliseconds of Nagle delay (see docs/operations.md).

    With ``reconnect``, a lost connection is made again in the background (jittered
    exponential backoff), the subscriptions are restored, and ``on_reconnect`` runs (to
    publish a status again, say); meanwhile ``publish`` and ``subscribe`` wait for the
    connection, and ``messages`` simply goes on. With ``session_expiry_s`` the broker keeps
    this client's subscriptions, and the QoS 1 messages sent to them, that long while it
    is away (and, with Mosquitto's persistence, across a broker restart).
    """

    def __init__(
        self,
        broker: str | BrokerAddress,
        client_id: str | None = None,
        will: LastWill | None = None,
        username: str | None = None,
        password: str | None = None,
        *,
        reconnect: bool = False,
        session_expiry_s: int = 0,
        on_reconnect: ReconnectHook | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.address = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        self.client_id = client_id or f"lime-{uuid.uuid4().hex[:12]}"
        self._tls = tls or TlsFiles()
        self._will = will
        self._username = username
        self._password = password
        self._connected = False
        self.reconnect = reconnect
        self.session_expiry_s = session_expiry_s
        self.on_reconnect = on_reconnect
        self._subscriptions: dict[str, int] = {}  # topic -> QoS, restored on reconnect
        self._acks: dict[int, ReasonCode | None] = {}  # message id -> the broker's PUBACK reason, while awaited
        self._write_now: Callable[[], None] = lambda: None  # write what paho has queued (_take_the_fast_paths)
        self._writing = False  # a QoS 0 publish is under way: it writes its packet itself
        self._closing = False

    def _new_client(self, first: bool) -> aiomqtt.Client:
        """aiomqtt binds a client to the running loop, so it is made on entry, not in __init__.
        A reconnection with a session asks the broker to resume it (clean start off)."""
        will = self._will
        properties = None
        if self.session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=self.client_id,
            username=self._username,
            password=self._password,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain) if will else None,
            timeout=CONNECT_TIMEOUT_S,
            keepalive=30,
            tls_params=self._tls.parameters() if self.address.tls else None,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            clean_start=first or not self.session_expiry_s,
            properties=properties,
        )

    def __repr__(self) -> str:
        state = "connected" if self._connected else "closed"
        return f"MqttConnection({self.client_id!r}, {self.address}, {state})"

    async def __aenter__(self) -> MqttConnection:
        # Received messages of every connection go to one queue (aiomqtt's own iterator
        # starts a task per message; see messages()). A lost connection puts a sentinel
        # there instead, unless this transport reconnects.
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        await self._connect(first=True)
        self._keeper = asyncio.create_task(self._keep_connected(), name=f"{self.client_id}-reconnect") \
            if self.reconnect else None
        return self

    async def _connect(self, first: bool) -> None:
        client = self._new_client(first)
        client._queue = self._inbox  # private, aiomqtt is pinned < 3: one queue outlives connections
        self._hear_acks(client)
        self._take_the_fast_paths(client)
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S + 1):
                    await _keeping_cancellation(client.__aenter__())
            except BaseException:
                # Stopped (or timed out) just as the CONNACK came: the socket may be open.
                if client._client.socket() is not None:
                    client._client._sock_close()
                raise
        except MqttConnectError as exc:
            raise self._refused(exc) from exc
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            if _is_tls_failure(exc):
                raise TransportError(
                    f"TLS handshake with broker {self.address} failed: {exc or type(exc).__name__} (is ca_file the "
                    "CA that signed the broker's certificate, and is the host one of its names?)"
                ) from exc
            raise TransportError(f"cannot connect to broker {self.address}: {exc or type(exc).__name__}") from exc
        self._client = client
        self._connected = True
        self._up.set()
        client._disconnected.add_done_callback(lambda done: self._on_disconnect(client, done))

    def _refused(self, exc: MqttConnectError) -> TransportError:
        """The broker's CONNACK said no: a clear word for a refused login."""
        code = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
        if code in _LOGIN_REFUSED:
            who = f"user {self._username!r}" if self._username else "an anonymous client (no username)"
            return _LoginRefused(
                f"broker {self.address} refused the login of {who}: {exc}; check username and password "
                "(or password_file) in the settings"
            )
        return TransportError(f"broker {self.address} refused the connection: {exc}")

    def _hear_acks(self, client: aiomqtt.Client) -> None:
        """aiomqtt drops the reason code of a PUBACK; keep it for the publish that waits.

        paho's ``publish`` returns the message id synchronously, inside ``aiomqtt.publish``
        and before its first await, so the id goes to a context variable of the publishing
        task; the ``on_publish`` callback records the reason of each id that is awaited."""
        paho = client._client
        send = paho.publish
        acknowledged: Any = paho.on_publish  # aiomqtt's own: it sets the event the publish waits on

        def publish(*args: Any, **kwargs: Any) -> paho_mqtt.MQTTMessageInfo:
            info = send(*args, **kwargs)
            qos = args[2] if len(args) > 2 else kwargs.get("qos", 0)
            if qos:
                self._acks[info.mid] = None
                _PUBLISH_MID.set(info.mid)
            return info

        def on_publish(paho_client: Any, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
            if mid in self._acks:
                self._acks[mid] = reason
            acknowledged(paho_client, userdata, mid, reason, properties)

        paho.publish = publish  # type: ignore[method-assign]
        paho.on_publish = on_publish

    def _take_the_fast_paths(self, client: aiomqtt.Client) -> None:
        """Three shortcuts past aiomqtt and paho on the per-token path (both are pinned < 3):

        - a received QoS 0 PUBLISH without properties (every step between stages) goes to
          the inbox as this module's :class:`Message`, made from paho's packet
          (:func:`_plain_publish`): paho's own decoding, its message object and its
          dispatch cost 180 us a message with the caches cold after a forward pass, this
          25 us. Any other packet goes through paho as before;
        - any other received message goes to the inbox as paho's own (``messages()`` reads
          it), without aiomqtt's ``Message`` and ``Topic`` objects made for each;
        - a packet that paho queues from the event loop's thread registers its socket for
          writing at once (aiomqtt's callback does it through ``call_soon_threadsafe``: a
          write to the loop's wake-up pipe and one more turn of the loop), except the
          packet of a QoS 0 :meth:`publish`, which writes it itself before returning and
          registers the socket only for what did not fit: a step leaves when it is
          published, not one or two turns of the loop later.
        """
        paho = client._client
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        through_aiomqtt: Any = paho.on_socket_register_write

        def write() -> None:  # as aiomqtt's: a failed write is a lost connection
            try:
                paho.loop_write()
            except Exception as exc:  # paho raises what the socket raised
                if not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        def register_write(paho_client: Any, userdata: Any, sock: Any) -> None:
            if threading.get_ident() != loop_thread:  # paho calls it from the thread that connects, too
                through_aiomqtt(paho_client, userdata, sock)
            elif not self._writing:  # (publish() writes at once, and registers only what is left)
                loop.add_writer(sock.fileno(), write)

        def write_now() -> None:
            write()
            sock = paho.socket()
            if paho.want_write() and sock is not None:  # the socket is full: the rest when it drains
                loop.add_writer(sock.fileno(), write)

        def on_message(paho_client: Any, userdata: Any, message: paho_mqtt.MQTTMessage) -> None:
            self._inbox.put_nowait(message)

        handle_publish = paho._handle_publish

        def handle_plain_publish() -> paho_mqtt.MQTTErrorCode:
            message = _plain_publish(paho._in_packet["command"], paho._in_packet["packet"])
            if message is None:
                return handle_publish()
            self._inbox.put_nowait(message)
            return paho_mqtt.MQTT_ERR_SUCCESS

        paho.on_socket_register_write = register_write
        paho.on_message = on_message
        if paho._protocol == paho_mqtt.MQTTv5:  # (always, as made here; the packet layout is 5's)
            paho._handle_publish = handle_plain_publish  # type: ignore[method-assign]
        self._write_now = write_now

    def _on_disconnect(self, client: aiomqtt.Client, done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()  # seen here: no "exception was never retrieved" for a dropped connection
        if client is not self._client or self._closing:
            return
        self._connected = False
        self._up.clear()
        if self.reconnect:
            self._lost.set()
        else:
            self._inbox.put_nowait(_DISCONNECTED)

    async def _keep_connected(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            log.warning("%s: connection to %s lost; reconnecting", self.client_id, self.address)
            try:
                await _keeping_cancellation(self._client.__aexit__(None, None, None))
            except aiomqtt.MqttError:
                pass
            delay = RECONNECT_MIN_S
            while True:
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                try:
                    await self._connect(first=False)
                    if self._subscriptions:
                        await _keeping_cancellation(self._client.subscribe(list(self._subscriptions.items())))
                    break
                except (TransportError, aiomqtt.MqttError) as exc:
                    # A refused login (rotated or removed credentials) does not mend itself: say it louder.
                    level = logging.WARNING if isinstance(exc, _LoginRefused) else logging.INFO
                    log.log(level, "%s: reconnect failed (%s); next try in about %.1f s", self.client_id, exc, delay)
                    self._connected = False
                    self._up.clear()
                    delay = min(2 * delay, RECONNECT_MAX_S)
            log.warning("%s: reconnected to %s", self.client_id, self.address)
            if self.on_reconnect is not None:
                try:
                    await self.on_reconnect()
                except Exception:  # the hook's failure must not stop reconnecting
                    log.exception("%s: after reconnecting", self.client_id)

    @property
    def connected(self) -> bool:
        return self._connected

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Until the connection is up (at once when it is); TransportError after ``timeout_s``."""
        if self._up.is_set():
            return
        if not self.reconnect:
            raise TransportError(f"not connected to {self.address}")
        try:
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        except TimeoutError:
            raise TransportError(f"no connection to {self.address} for {timeout_s:.0f} s") from None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        self._connected = False
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        try:
            # aiomqtt gives up on the DISCONNECT after its own timeout (10 s) and leaves the
            # socket open; a close here takes at most CLOSE_TIMEOUT_S and closes it.
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await _keeping_cancellation(self._client.__aexit__(exc_type, exc, tb))
        except (aiomqtt.MqttError, TimeoutError):
            paho = self._client._client
            if paho.socket() is not None:  # not gone: the DISCONNECT could not be written
                log.warning("%s: the DISCONNECT to %s was not sent within %.0f s (%d packets unsent); "
                            "closing the socket", self.client_id, self.address, CLOSE_TIMEOUT_S,
                            len(paho._out_packet))
                paho._sock_close()

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
        check_topic(topic)  # paho would raise its own ValueError
        if qos == 0 and correlation_data is None and response_topic is None:
            # QoS 0 has no acknowledgement to wait for: hand it to paho and go on (aiomqtt
            # would wait for the socket write, a few event-loop turns per message).
            await self.wait_connected()
            paho = self._client._client
            data = payload.encode() if isinstance(payload, str) else payload
            if _publish_now(paho, topic, data, retain):
                return
            self._writing = True
            try:
                info = paho.publish(topic, payload, 0, retain)
            finally:
                self._writing = False
            if info.rc != paho_mqtt.MQTT_ERR_SUCCESS and not self.reconnect:
                raise TransportError(f"publish to {topic} failed: {paho_mqtt.error_string(info.rc)}")
            if paho.want_write():
                self._write_now()  # what does not fit in the socket now goes when it is writable
            return  # reconnecting: at most once, as QoS 0 promises
        properties = None
        if correlation_data is not None or response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic is not None:
                properties.ResponseTopic = response_topic
        while True:
            await self.wait_connected()
            token = _PUBLISH_MID.set(None)
            try:
                await _keeping_cancellation(
                    self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties))
                self._check_ack(topic, _PUBLISH_MID.get(), require_subscribers)
                return
            except aiomqtt.MqttError as exc:
                if not self.reconnect or self._closing:
                    raise TransportError(f"publish to {topic} failed: {exc}") from exc
                # At least once: send it again on the next connection.
                log.info("%s: publish to %s failed (%s); again once reconnected", self.client_id, topic, exc)
                await asyncio.sleep(0.05)  # let the disconnect be noticed before waiting for the next one
            finally:
                self._acks.pop(_PUBLISH_MID.get() or -1, None)
                _PUBLISH_MID.reset(token)

    def _check_ack(self, topic: str, mid: int | None, require_subscribers: bool) -> None:
        """Raise what the broker's PUBACK said, if it said no (MQTT 5 reason codes)."""
        reason = self._acks.get(mid) if mid is not None else None
        if reason is None:
            return
        if reason.value >= 0x80:
            log.error("%s: the broker refused the publish to %s: %s", self.client_id, topic, reason)
            raise PublishRefused(topic, str(reason))
        if reason.value == 0x10 and require_subscribers:
            raise NoSubscribers(topic)

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        self._subscriptions.update({t: qos for t in topics})
        await self.wait_connected()
        try:
            await _keeping_cancellation(self._client.subscribe([(t, qos) for t in topics]))
        except aiomqtt.MqttError as exc:
            if not self.reconnect:
                raise TransportError(f"subscribe to {topics} failed: {exc}") from exc
            # made again, with every recorded subscription, on reconnect

    async def unsubscribe(self, *topics: str) -> None:
        for topic in topics:
            self._subscriptions.pop(topic, None)
        await self.wait_connected()
        try:
            await _keeping_cancellation(self._client.unsubscribe(list(topics)))
        except aiomqtt.MqttError as exc:
            if not self.reconnect:
                raise TransportError(f"unsubscribe from {topics} failed: {exc}") from exc

    async def messages(self) -> AsyncGenerator[Message, None]:
        """Received messages, in order, until the connection ends (then TransportError)."""
        while True:
            msg = await self._inbox.get()
            if msg is _DISCONNECTED:
                raise TransportError(f"connection to {self.address} lost")
            if isinstance(msg, Message):  # made by _plain_publish
                yield msg
                continue
            props = msg.properties
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            yield Message(
                topic=msg.topic,  # paho's: the topic as text
                payload=payload,
                retain=bool(msg.retain),
                response_topic=getattr(props, "ResponseTopic", None) if props else None,
                correlation_data=getattr(props, "CorrelationData", None) if props else None,
            )


def _is_tls_failure(exc: BaseException) -> bool:
    """aiomqtt turns paho's ssl errors into a plain MqttError with the same text."""
    return isinstance(exc, ssl.SSLError) or any(word in str(exc) for word in ("SSL", "TLS", "certificate"))


def _plain_publish(command: int, packet: bytearray) -> Message | None:
    """A received MQTT 5 PUBLISH packet (its first byte and the rest after the length) as a
    :class:`Message`, when it is QoS 0 and has no properties; None for paho to handle (an
    acknowledgement to send, properties to read, or a packet it should call malformed)."""
    if command & 0x06 or len(packet) < 3:  # QoS 1 or 2
        return None
    length = (packet[0] << 8) | packet[1]
    if len(packet) < 3 + length or packet[2 + length] != 0:  # no room, or properties
        return None
    try:
        topic = packet[2 : 2 + length].decode()
    except UnicodeDecodeError:
        return None
    return Message(topic=topic, payload=bytes(packet[3 + length :]), retain=bool(command & 0x01))


def _publish_now(paho: paho_mqtt.Client, topic: str, payload: bytes, retain: bool) -> bool:
    """Write a QoS 0 PUBLISH (MQTT 5, no properties) straight to the socket; False when paho
    should send it instead: not connected, or packets of its own wait to be written first
    (they go in order).

    paho's ``publish`` makes the same bytes, but through a message-info object, locks, its
    packet queue and the write callbacks: after a forward pass has streamed the weights
    through the caches, that path costs a few hundred microseconds on each hop, this one a
    fraction. What the socket does not take now goes to paho's queue and leaves when the
    socket is writable."""
    if not paho.is_connected() or paho._out_packet or len(payload) > MAX_PACKET_PAYLOAD:
        return False
    name = topic.encode()
    length = 2 + len(name) + 1 + len(payload)  # topic, no properties, payload
    header = bytearray((0x30 | retain,))
    while True:  # the remaining length: 7 bits a byte, least significant first
        length, low = divmod(length, 128)
        header.append(low | (0x80 if length else 0))
        if not length:
            break
    packet = b"".join((header, len(name).to_bytes(2, "big"), name, b"\x00", payload))
    try:
        sent = paho._sock_send(packet)
    except BlockingIOError:
        sent = 0
    except OSError:
        return False  # a lost connection: paho's own publish reports it as it does
    if sent < len(packet):
        paho._packet_queue(paho_mqtt.PUBLISH, packet[sent:], 0, 0, paho_mqtt.MQTTMessageInfo(0))
    paho._last_msg_out = paho_mqtt.time_func()  # for the keepalive, as paho's write does
    return True


class MqttTransport:
    """How to reach one MQTT broker: its address and this process's credentials.

    ``connection(...)`` opens an :class:`MqttConnection` with a client id, last will and
    reconnect policy of the caller's choosing.

    ``mqtts://`` verifies the broker's certificate against ``ca_file`` (the system's CAs
    without it) and its host name against the certificate; ``cert_file`` and ``key_file``
    add a client certificate. Plaintext ``mqtt://`` is refused for a host that is not
    loopback, unless ``insecure``: credentials and prompts would cross the network in
    the clear.
    """

    def __init__(
        self,
        broker: str | BrokerAddress,
        username: str | None = None,
        password: str | None = None,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        insecure: bool = False,
    ) -> None:
        self.address = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        self._username = username
        self._password = password
        self.insecure = insecure
        if not self.address.tls and not insecure and not is_loopback(self.address.host):
            raise ConfigError(
                f"broker {self.address} is plaintext MQTT to a host that is not this machine: use mqtts:// "
                "(with ca_file, see docs/broker.md), or set insecure = true (--insecure, LIME_INSECURE=1) "
                "on a network you trust"
            )
        if key_file is not None and cert_file is None:
            raise ConfigError("key_file is set without cert_file (the client certificate it belongs to)")
        for what, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{what} {str(path)!r} is not a file")
        if not self.address.tls and (ca_file or cert_file):
            log.warning("broker %s is plaintext mqtt://: ca_file and cert_file are not used", self.address)
        self.tls = TlsFiles(*(str(p) if p is not None else None for p in (ca_file, cert_file, key_file)))

    @property
    def username(self) -> str | None:
        """The MQTT user name, ``{role}/{name}`` with a broker folder's identities."""
        return self._username

    def __repr__(self) -> str:
        tls = f", ca_file={self.tls.ca_file!r}" if self.address.tls and self.tls.ca_file else ""
        return f"MqttTransport({self.address}, user={self._username!r}{tls})"

    def connection(
        self,
        client_id: str | None = None,
        *,
        will: LastWill | None = None,
        reconnect: bool = False,
        session_expiry_s: int = 0,
        on_reconnect: ReconnectHook | None = None,
    ) -> MqttConnection:
        return MqttConnection(
            self.address, client_id, will, self._username, self._password,
            reconnect=reconnect, session_expiry_s=session_expiry_s, on_reconnect=on_reconnect, tls=self.tls,
        )
