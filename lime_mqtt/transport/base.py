"""The transport interface every service is given: what a broker connection can do.

A :class:`Transport` knows how to reach one broker (address, credentials) and opens
:class:`Connection` objects, one per client identity. Services receive a Transport and
open the connections they need (with their own client id, last will and reconnect
policy); they never build an MQTT client themselves. Two implementations exist:
:class:`lime_mqtt.transport.mqtt.MqttTransport` (the only code that imports an MQTT
library) and :class:`lime_mqtt.transport.memory.MemoryBroker`, an in-memory twin for
logic tests.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable
from urllib.parse import urlsplit

from lime_mqtt.core.errors import ConfigError, TransportError
from lime_mqtt.core.topics import Identity, Role

ReconnectHook = Callable[[], Awaitable[None]]
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name


def check_topic(topic: str) -> None:
    """A topic one may publish to: not empty, no wildcards, no NUL, not too long;
    :class:`TransportError` otherwise (every implementation checks the same)."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > MAX_TOPIC_BYTES:
        raise TransportError(f"cannot publish to topic {topic[:200]!r}: empty, too long or with a wildcard")


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
    """A received message, free of any MQTT library's types."""

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


@runtime_checkable
class Connection(Protocol):
    """One client's connection to the broker; an async context manager that owns it.

    With ``reconnect``, a lost connection is made again in the background, the
    subscriptions are restored and the reconnect hook runs; meanwhile ``publish`` and
    ``subscribe`` wait, and ``messages`` goes on. Without it, ``messages`` ends with
    :class:`~lime_mqtt.core.errors.TransportError` when the connection is lost.
    """

    client_id: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self, timeout_s: float | None = None) -> None: ...

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
        """Send one message. At QoS 1 the broker's answer is checked: a refusal raises
        :class:`~lime_mqtt.core.errors.PublishRefused`; with ``require_subscribers``, a
        message nobody subscribes to raises :class:`~lime_mqtt.core.errors.NoSubscribers`."""
        ...

    async def subscribe(self, *topics: str, qos: int = 1) -> None: ...

    async def unsubscribe(self, *topics: str) -> None: ...

    def messages(self) -> AsyncGenerator[Message, None]: ...


@runtime_checkable
class Transport(Protocol):
    """How to reach one broker: opens connections for the services that are given it."""

    def connection(
        self,
        client_id: str | None = None,
        *,
        will: LastWill | None = None,
        reconnect: bool = False,
        session_expiry_s: int = 0,
        on_reconnect: ReconnectHook | None = None,
    ) -> Connection: ...


def identity_of(transport: object) -> Identity | None:
    """The identity a transport's credentials name (its MQTT user name ``{role}/{name}``),
    or None: no user name (anonymous, the twin), or one of another form."""
    username = getattr(transport, "username", None)
    if not isinstance(username, str):
        return None
    try:
        return Identity.parse(username)
    except ValueError:
        return None


def check_identity(transport: object, role: Role, name: str) -> None:
    """:class:`ConfigError` when the transport's user name is another identity than
    ``role/name``: the broker's ACL would refuse everything it publishes."""
    identity = identity_of(transport)
    username = getattr(transport, "username", None)
    if username is None:
        return
    if identity is None or identity != Identity(role, name):
        raise ConfigError(f"this {role} is {role}/{name}, but its credentials are for user {username!r}: the "
                          f"broker lets a user publish only under its own name (docs/topics.md)")


def own_name(transport: object, role: Role, name: str | None, default: str) -> str:
    """The name a ``role`` component goes by: ``name`` if given, else its user name's
    (when the credentials are of that role), else ``default``; checked against the
    credentials (:func:`check_identity`)."""
    identity = identity_of(transport)
    chosen = name or (identity.name if identity is not None and identity.role == role else default)
    check_identity(transport, role, chosen)
    return chosen
