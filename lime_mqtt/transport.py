"""The MQTT client behind a small interface: connect, publish, subscribe, receive.

Everything aiomqtt/paho-specific lives here, and its errors become
:class:`~lime_mqtt.errors.TransportError` at this boundary.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lime_mqtt.errors import ConfigError, TransportError

CONNECT_TIMEOUT_S = 10.0
_DISCONNECTED = object()


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt://host:port`` (default port 1883) or ``mqtts://host:port`` (8883)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: {exc}") from exc
        return cls(parts.hostname, port, tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Message:
    """A received message, free of paho types."""

    topic: str
    payload: bytes
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class LastWill:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


class MqttTransport:
    """One MQTT 5 connection; an async context manager that owns it.

    TCP_NODELAY is set on the socket: without it each small round trip costs tens of
    milliseconds of Nagle delay (see docs/operations.md).
    """

    def __init__(
        self,
        broker: str | BrokerAddress,
        client_id: str | None = None,
        will: LastWill | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.address = broker if isinstance(broker, BrokerAddress) else BrokerAddress.parse(broker)
        self.client_id = client_id or f"lime-{uuid.uuid4().hex[:12]}"
        self._will = will
        self._username = username
        self._password = password
        self._connected = False

    def _new_client(self) -> aiomqtt.Client:
        """aiomqtt binds a client to the running loop, so it is made on entry, not in __init__."""
        will = self._will
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
            tls_params=aiomqtt.TLSParameters() if self.address.tls else None,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    def __repr__(self) -> str:
        state = "connected" if self._connected else "closed"
        return f"MqttTransport({self.client_id!r}, {self.address}, {state})"

    async def __aenter__(self) -> MqttTransport:
        self._client = self._new_client()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S + 1):
                await self._client.__aenter__()
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            raise TransportError(f"cannot connect to broker {self.address}: {exc}") from exc
        self._connected = True
        # Fast path (see messages()): aiomqtt's own iterator starts a task per message.
        # A disconnect puts a sentinel into the incoming queue instead.
        self._inbox: asyncio.Queue[Any] = self._client._queue  # private, aiomqtt is pinned < 3
        self._client._disconnected.add_done_callback(
            lambda _: self._inbox.put_nowait(_DISCONNECTED)
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._connected = False
        try:
            await self._client.__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError:
            pass  # the connection is already gone; nothing left to close

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> None:
        if qos == 0 and correlation_data is None and response_topic is None:
            # QoS 0 has no acknowledgement to wait for: hand it to paho and go on (aiomqtt
            # would wait for the socket write, a few event-loop turns per message).
            info = self._client._client.publish(topic, payload, 0, retain)
            if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
                raise TransportError(f"publish to {topic} failed: {paho_mqtt.error_string(info.rc)}")
            return
        properties = None
        if correlation_data is not None or response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic is not None:
                properties.ResponseTopic = response_topic
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"publish to {topic} failed: {exc}") from exc

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        try:
            await self._client.subscribe([(t, qos) for t in topics])
        except aiomqtt.MqttError as exc:
            raise TransportError(f"subscribe to {topics} failed: {exc}") from exc

    async def unsubscribe(self, *topics: str) -> None:
        try:
            await self._client.unsubscribe(list(topics))
        except aiomqtt.MqttError as exc:
            raise TransportError(f"unsubscribe from {topics} failed: {exc}") from exc

    async def messages(self) -> AsyncGenerator[Message, None]:
        """Received messages, in order, until the connection ends (then TransportError)."""
        while True:
            msg = await self._inbox.get()
            if msg is _DISCONNECTED:
                raise TransportError(f"connection to {self.address} lost")
            props = msg.properties
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            yield Message(
                topic=msg.topic.value,
                payload=payload,
                retain=bool(msg.retain),
                response_topic=getattr(props, "ResponseTopic", None) if props else None,
                correlation_data=getattr(props, "CorrelationData", None) if props else None,
            )
