"""The one exception family of lime-mqtt.

Every error carries enough context to act on it; the ``code`` is what goes into a
JSON error message for a client.
"""

from __future__ import annotations


class LimeError(Exception):
    """Root of all lime-mqtt errors."""

    code = "internal_error"


class ConfigError(LimeError):
    """Settings or command-line options that cannot work."""

    code = "config_error"


class ModelError(LimeError):
    """A model folder that is missing, incomplete or of an unsupported architecture."""

    code = "model_error"


class MessageError(LimeError):
    """A received message that does not decode: too large, not the format, a wrong
    version, a field of the wrong type or out of range. Nothing of it is used."""

    code = "bad_message"


class WireError(MessageError):
    """A stage message (CBOR envelope) that cannot be decoded."""

    code = "wire_error"


class WeightsError(LimeError):
    """A manifest or tensor that cannot be served or fetched."""

    code = "weights_error"


class BadWeightMessage(WeightsError, MessageError):
    """A weights request or reply that does not decode."""

    code = "bad_message"


class PlanError(LimeError):
    """No plan can be made with the devices at hand."""

    code = "plan_error"


class TransportError(LimeError):
    """The broker cannot be reached or refused an operation."""

    code = "transport_error"


class PublishRefused(TransportError):
    """The broker refused a publish (an MQTT 5 reason code of 0x80 or more: not
    authorized, say); ``reason`` is the broker's word."""

    code = "publish_refused"

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"the broker refused the publish to {topic}: {reason}")
        self.topic, self.reason = topic, reason


class NoSubscribers(TransportError):
    """The broker took a QoS 1 publish that nobody subscribes to (reason code 0x10), where
    the publisher asked to know (``require_subscribers``): a request with no coordinator."""

    code = "no_subscribers"

    def __init__(self, topic: str) -> None:
        super().__init__(f"nobody subscribes to {topic}")
        self.topic = topic


class RequestError(LimeError):
    """A client request that cannot be served; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id

    @property
    def message(self) -> str:
        return str(self.args[0])
