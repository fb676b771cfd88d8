"""The cluster as the bridge sees it: one connection that follows the retained state and
the telemetry of devices and coordinators, derived rates, and a snapshot for the
dashboard. Readers wait for :meth:`ClusterWatch.changed` instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from lime_mqtt.core.errors import MessageError
from lime_mqtt.core.messages import GONE_STATES, DeviceTelemetry
from lime_mqtt.core.topics import Topics
from lime_mqtt.core.view import ClusterView
from lime_mqtt.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rates:
    """A device's load between its last two telemetry reports."""

    busy: float  # the share of the time its layers computed, 0 to 1
    steps_per_s: float  # steps run per second (a decode step is one token of one sequence)


def rates(before: DeviceTelemetry | None, after: DeviceTelemetry) -> Rates | None:
    if before is None or after.ts <= before.ts or after.steps_done < before.steps_done:
        return None  # the first report, or the device restarted in between
    span = after.ts - before.ts
    return Rates(busy=min(1.0, max(0.0, (after.compute_s - before.compute_s) / span)),
                 steps_per_s=(after.steps_done - before.steps_done) / span)


class ClusterWatch:
    """Follows one cluster's state (plan, planner, coordinators, devices, telemetry) on its
    own connection, as an async context manager."""

    def __init__(self, transport: Transport, cluster: str) -> None:
        self.transport = transport
        self.view = ClusterView(Topics(cluster))
        self.rates: dict[str, Rates] = {}
        self.version = 0  # goes up with every change
        self._changed = asyncio.Condition()
        self._receiver: asyncio.Task[None] | None = None  # owned: cancelled and awaited on the way out
        self._conn = transport.connection(f"lime-watch-{uuid.uuid4().hex[:8]}", reconnect=True)

    def __repr__(self) -> str:
        return f"ClusterWatch({self.view!r}, version={self.version})"

    async def __aenter__(self) -> ClusterWatch:
        await self._conn.__aenter__()
        try:
            await self._conn.subscribe(*self.view.subscriptions(telemetry=True), qos=1)
        except BaseException:
            await self._conn.__aexit__(None, None, None)
            raise
        self._receiver = asyncio.create_task(self._receive(), name="cluster-watch")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._receiver is not None:
                self._receiver.cancel()
                await asyncio.gather(self._receiver, return_exceptions=True)  # its own failures are logged there
        finally:
            await self._conn.__aexit__(None, None, None)

    async def changed(self, since: int, timeout_s: float) -> int:
        """Wait until the version is past ``since`` (at most ``timeout_s``); the version."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: self.version > since)
            return self.version

    async def _receive(self) -> None:
        try:
            await self._follow()
        except Exception:  # the supervisor of the watch: say so, loudly; the view stays as it was
            log.exception("the cluster watch stopped receiving")
            raise

    async def _follow(self) -> None:
        async for message in self._conn.messages():
            before = None
            route = self.view.topics.parse(message.topic)
            if route is not None and route.sender.role == "device" and route.kind == "telemetry":
                before = self.view.telemetry.get(route.sender.name)
            try:
                update = self.view.take(message.topic, message.payload, message.retain)
            except MessageError as exc:
                log.warning("ignoring a message on %s: %s", message.topic, exc)
                continue
            if update is None:
                continue
            if update.kind == "telemetry" and update.key is not None:
                derived = rates(before, self.view.telemetry[update.key])
                if derived is not None:
                    self.rates[update.key] = derived
            async with self._changed:
                self.version += 1
                self._changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's data: devices, the plan as layers on devices, coordinators and
        their requests."""
        view = self.view
        devices = []
        for device_id, status in sorted(view.devices.items()):
            telemetry, rate = view.telemetry.get(device_id), self.rates.get(device_id)
            devices.append({
                "id": device_id, "state": status.state, "online": status.state not in GONE_STATES,
                "trusted": status.trusted, "memory_mb": status.memory_mb,
                "rss_mb": telemetry.rss_mb if telemetry else status.rss_mb,
                "held_mb": telemetry.held_mb if telemetry else None,
                "baseline_mb": status.baseline_rss_mb,
                "kv_tokens": telemetry.kv_tokens if telemetry else None,
                "kv_sequences": telemetry.kv_sequences if telemetry else None,
                "busy": round(rate.busy, 3) if rate else None,
                "steps_per_s": round(rate.steps_per_s, 2) if rate else None,
                "link_rtt_ms": status.capabilities.get("link_rtt_ms"),
                "link_mb_s": status.capabilities.get("link_mb_s"),
                "stages": status.stages, "formats": status.formats,
            })
        plan = None
        if view.plan is not None:
            plan = {"epoch": view.plan.epoch, "model": view.plan.model, "num_layers": view.plan.num_layers,
                    "predicted_ms_per_token": view.plan.predicted_ms_per_token,
                    "stages": [{"stage": s.stage, "device": s.device_id, "start": s.start, "stop": s.stop,
                                "embed": s.embed, "head": s.head, "streamed": s.streamed}
                               for s in view.plan.stages],
                    "ready": view.plan_ready()}
        coordinators = []
        for name in view.serving_coordinators():
            figures = view.coordinator_telemetry.get(name)
            coordinators.append({
                "name": name, "model": view.coordinators[name].model,
                "running": figures.running if figures else None,
                "waiting": figures.waiting if figures else None,
                "served": figures.served if figures else None,
                "errors": figures.errors if figures else {},
                "recent": [r.model_dump() for r in figures.recent] if figures else [],
            })
        planner = ({"state": view.planner.state, "message": view.planner.message}
                   if view.planner is not None else None)
        return {"cluster": view.topics.cluster, "version": self.version, "devices": devices, "plan": plan,
                "planner": planner, "coordinators": coordinators}
