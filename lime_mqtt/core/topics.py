"""Topic names, all under ``lime/v1/{cluster}/``. Documented in docs/topics.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "lime/v1"

# Activations and sampled tokens go at QoS 0: they are on the per-token path, and the
# coordinator, which holds every request's history, retries a step that goes missing.
# Everything else (requests, responses, plans, status, control) is QoS 1.
STEP_QOS = 0


@dataclass(frozen=True)
class Topics:
    """Every topic of one cluster; pure string functions, no I/O."""

    cluster: str = "default"

    def __post_init__(self) -> None:
        if not self.cluster or any(c in self.cluster for c in "/+#\0"):
            raise ValueError(f"cluster name {self.cluster!r} must be non-empty without / + # or NUL")

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.cluster}"

    def device_status(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/status"

    @property
    def all_device_status(self) -> str:
        return f"{self.root}/devices/+/status"

    def device_telemetry(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/telemetry"

    @property
    def all_device_telemetry(self) -> str:
        return f"{self.root}/devices/+/telemetry"

    def parse(self, topic: str) -> tuple[Literal["device", "telemetry", "coordinator"], str] | None:
        """``devices/{id}/status`` -> ("device", id), ``devices/{id}/telemetry`` ->
        ("telemetry", id), ``coordinators/{name}/status`` -> ("coordinator", name); None
        for any other topic (or another cluster's)."""
        prefix = f"{self.root}/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if len(parts) != 3 or not parts[1]:
            return None
        if parts[0] == "devices" and parts[2] == "status":
            return "device", parts[1]
        if parts[0] == "devices" and parts[2] == "telemetry":
            return "telemetry", parts[1]
        if parts[0] == "coordinators" and parts[2] == "status":
            return "coordinator", parts[1]
        return None

    def coordinator_status(self, name: str) -> str:
        return f"{self.root}/coordinators/{name}/status"

    @property
    def all_coordinator_status(self) -> str:
        return f"{self.root}/coordinators/+/status"

    @property
    def planner_status(self) -> str:
        return f"{self.root}/planner/status"

    @property
    def plan(self) -> str:
        return f"{self.root}/plan"

    def stage_in(self, stage: int) -> str:
        return f"{self.root}/stage/{stage}/in"

    @property
    def results(self) -> str:
        """Where the last stage sends sampled tokens back to the coordinator."""
        return f"{self.root}/coordinator/results"

    @property
    def control(self) -> str:
        """Broadcast to every device: end of a request (free its KV cache)."""
        return f"{self.root}/control"

    @property
    def requests(self) -> str:
        return f"{self.root}/requests"

    def responses(self, client: str, request_id: str) -> str:
        return f"{self.root}/responses/{client}/{request_id}"

    @property
    def weights_requests(self) -> str:
        """Requests for a model's manifest or a tensor's bytes, to every weight source."""
        return f"{self.root}/weights/request"

    def weights_reply(self, client: str) -> str:
        """Where weight sources answer one fetching client (docs/wire-format.md)."""
        return f"{self.root}/weights/to/{client}"


def valid_device_id(device_id: str) -> bool:
    """1 to 64 characters, none of them / + # NUL or whitespace (one topic level)."""
    return 0 < len(device_id) <= 64 and not any(c in "/+#\0" or c.isspace() for c in device_id)
