"""The broker connection behind one interface (``base``): MQTT (``mqtt``), an in-memory twin
(``memory``), and a local Mosquitto to run tests and demos against (``mosquitto``)."""

from __future__ import annotations

from typing import Any

from lime_mqtt.transport.base import BrokerAddress, Connection, LastWill, Message, Transport

__all__ = ["BrokerAddress", "Connection", "LastWill", "Message", "Transport", "connect", "transport_for"]


def transport_for(broker: str | BrokerAddress | Transport) -> Transport:
    """A transport for a broker URL (MQTT, no credentials), or ``broker`` itself if it is one."""
    if isinstance(broker, (str, BrokerAddress)):
        from lime_mqtt.transport.mqtt import MqttTransport

        return MqttTransport(broker)
    return broker


def connect(broker: str | BrokerAddress | Transport, client_id: str | None = None, **options: Any) -> Connection:
    """One connection to ``broker`` (a URL or a transport): ``async with connect(url) as conn``."""
    return transport_for(broker).connection(client_id, **options)
