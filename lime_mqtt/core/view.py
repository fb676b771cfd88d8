"""One view of a cluster's retained state, built from its messages as they arrive.

The coordinator, the planner, ``lime-mqtt status``, the cluster helper and the client all
read the same topics (the plan, the planner's word, coordinators, device status and
telemetry); this is the one reader they share. It decodes each message strictly
(:mod:`lime_mqtt.core.messages`) and keeps the latest of each; what a service does with
a change is the service's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lime_mqtt.core.errors import MessageError
from lime_mqtt.core.messages import (
    CoordinatorStatus,
    CoordinatorTelemetry,
    DeviceStatus,
    DeviceTelemetry,
    PlannerStatus,
    decode_coordinator_status,
    decode_coordinator_telemetry,
    decode_device_status,
    decode_device_telemetry,
    decode_planner_status,
)
from lime_mqtt.core.plan import Plan
from lime_mqtt.core.topics import Topics

Kind = Literal["plan", "planner", "coordinator", "device", "telemetry", "coordinator_telemetry"]


@dataclass(frozen=True)
class Update:
    """What one message changed: its kind, the device or coordinator it is about, and
    (for a device) the status it had before."""

    kind: Kind
    key: str | None = None
    before: DeviceStatus | None = None
    retained: bool = False


@dataclass
class ClusterView:
    """The latest plan, planner status, coordinators, device statuses and telemetry.

    With ``model``, plans for another model are refused (:class:`MessageError`), so the
    view's plan is always one its owner can serve. Plans only move forward: one whose
    epoch is not above the current plan's changes nothing.
    """

    topics: Topics
    model: str | None = None
    plan: Plan | None = None
    planner: PlannerStatus | None = None
    coordinators: dict[str, CoordinatorStatus] = field(default_factory=dict)
    devices: dict[str, DeviceStatus] = field(default_factory=dict)
    telemetry: dict[str, DeviceTelemetry] = field(default_factory=dict)
    coordinator_telemetry: dict[str, CoordinatorTelemetry] = field(default_factory=dict)

    def __repr__(self) -> str:
        epoch = self.plan.epoch if self.plan else None
        return (f"ClusterView({self.topics.cluster!r}, plan_epoch={epoch}, devices={len(self.devices)}, "
                f"coordinators={len(self.coordinators)})")

    def subscriptions(self, telemetry: bool = False) -> list[str]:
        """The topics that feed this view (device and coordinator telemetry only if asked:
        they are chatty)."""
        topics = [self.topics.all_plans, self.topics.all_planner_status, self.topics.all_coordinator_status,
                  self.topics.all_device_status]
        if telemetry:
            topics += [self.topics.all_device_telemetry, self.topics.all_coordinator_telemetry]
        return topics

    def take(self, topic: str, payload: bytes, retained: bool = False) -> Update | None:
        """Absorb one message. ``None``: not a topic of the view, or nothing changed.
        :class:`MessageError`: malformed (the view is unchanged)."""
        route = self.topics.parse(topic)
        if route is None or route.to is not None:
            return None
        role, name, kind = route.sender.role, route.sender.name, route.kind
        if role == "planner" and kind == "plan":
            return self._take_plan(payload, retained)
        if role == "planner" and kind == "status":
            self.planner = decode_planner_status(payload) if payload else None
            return Update("planner", retained=retained)
        if role == "coordinator" and kind == "status":
            status = decode_coordinator_status(payload)
            if status is None:
                self.coordinators.pop(name, None)
                self.coordinator_telemetry.pop(name, None)
            else:
                self.coordinators[name] = status
            return Update("coordinator", name, retained=retained)
        if role == "coordinator" and kind == "telemetry":
            self.coordinator_telemetry[name] = decode_coordinator_telemetry(payload, name)
            return Update("coordinator_telemetry", name, retained=retained)
        if role == "device" and kind == "status":
            before = self.devices.get(name)
            self.devices[name] = decode_device_status(payload, name)
            return Update("device", name, before, retained)
        if role == "device" and kind == "telemetry":
            self.telemetry[name] = decode_device_telemetry(payload, name)
            return Update("telemetry", name, retained=retained)
        return None

    def _take_plan(self, payload: bytes, retained: bool) -> Update | None:
        if not payload:
            return None  # a cleared retained plan: the devices keep what they run
        plan = Plan.from_json(payload)
        if self.model is not None and plan.model != self.model:
            raise MessageError(f"plan {plan.epoch} is for model {plan.model}, this serves {self.model}")
        if self.plan is not None and plan.epoch <= self.plan.epoch:
            return None  # a stale or repeated plan
        self.plan = plan
        return Update("plan", retained=retained)

    def state_of(self, device_id: str) -> str | None:
        status = self.devices.get(device_id)
        return status.state if status else None

    def plan_ready(self) -> bool:
        """Whether every stage device of the current plan has loaded it."""
        return self.plan is not None and self.plan.ready(self.devices)

    def serving_coordinators(self, model: str | None = None) -> list[str]:
        return sorted(n for n, s in self.coordinators.items() if model is None or s.model == model)
