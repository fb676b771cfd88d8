"""What a cluster looks like now, from its retained messages and a moment of telemetry:
``lime-mqtt status``."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

from pydantic import BaseModel

from lime_mqtt.core.errors import MessageError
from lime_mqtt.core.topics import Topics
from lime_mqtt.core.view import ClusterView
from lime_mqtt.transport import BrokerAddress, Transport, transport_for
from lime_mqtt.watch import ClusterWatch


async def gather_status(broker: str | BrokerAddress | Transport, cluster: str, wait_s: float = 6.0) -> ClusterView:
    """The retained plan, planner, coordinator and device statuses, and the telemetry that
    arrives within ``wait_s`` seconds (devices report every 5 s by default)."""
    view = ClusterView(Topics(cluster))
    async with transport_for(broker).connection() as conn:
        await conn.subscribe(*view.subscriptions())
        await conn.subscribe(view.topics.all_device_telemetry, qos=0)
        try:
            async with asyncio.timeout(wait_s):
                async for message in conn.messages():
                    with contextlib.suppress(MessageError):  # a malformed message says nothing of the cluster
                        view.take(message.topic, message.payload, message.retain)
                    reported = {d for d, s in view.devices.items() if s.state != "offline"}
                    if reported and reported <= set(view.telemetry):
                        break  # every device that is up has reported: no need to wait longer
        except TimeoutError:
            pass
    return view


async def watch_status(broker: str | BrokerAddress | Transport, cluster: str, every_s: float = 1.0,
                       clear: bool = True) -> None:
    """``lime-mqtt status --watch``: the status table again whenever the cluster changes (at
    most every ``every_s``), until cancelled. On a terminal (``clear``) each frame replaces
    the last; otherwise frames follow one another, each under a timestamped rule."""
    async with ClusterWatch(transport_for(broker), cluster) as watch:
        version = -1
        while True:
            now = await watch.changed(version, timeout_s=max(every_s, 5.0))
            if now == version:
                continue
            version = now
            text = format_status(watch.view, {d: r.busy for d, r in watch.rates.items()})
            stamp = time.strftime("%H:%M:%S")
            if clear:
                sys.stdout.write(f"\x1b[H\x1b[2J{text}\n\n(updated {stamp}; Ctrl-C to stop)\n")
            else:
                sys.stdout.write(f"--- {stamp} ---\n{text}\n")
            sys.stdout.flush()
            await asyncio.sleep(every_s)  # at most one frame per interval


def status_json(view: ClusterView) -> dict[str, Any]:
    """The view as JSON-ready data (``lime-mqtt status --json``): the messages as received."""

    def dump(message: BaseModel | None) -> Any:
        return message.model_dump(mode="json", exclude_none=True) if message is not None else None

    return {"cluster": view.topics.cluster, "plan": dump(view.plan), "planner": dump(view.planner),
            "coordinators": view.serving_coordinators(),
            "devices": {d: dump(s) for d, s in sorted(view.devices.items())},
            "telemetry": {d: dump(t) for d, t in sorted(view.telemetry.items())},
            "coordinator_telemetry": {c: dump(t) for c, t in sorted(view.coordinator_telemetry.items())}}


def format_status(view: ClusterView, busy: dict[str, float] | None = None) -> str:
    """The view as text: the plan, the planner's word, the coordinators and their requests,
    and a table of devices (with ``busy``, the share of time each device computed lately)."""
    lines = [f"cluster {view.topics.cluster}"]
    if view.plan is not None:
        predicted = f", predicted {view.plan.predicted_ms_per_token:.1f} ms/token" \
            if view.plan.predicted_ms_per_token else ""
        lines.append(f"plan {view.plan.epoch}: {len(view.plan.stages)} stages of {view.plan.model}{predicted}")
    else:
        lines.append("no plan")
    if view.planner:
        lines.append(f"planner: {view.planner.state}: {view.planner.message}")
    lines.append(f"coordinators: {', '.join(view.serving_coordinators()) or 'none'}")
    for name in view.serving_coordinators():
        figures = view.coordinator_telemetry.get(name)
        if figures is not None:
            errors = ", ".join(f"{code} {n}" for code, n in sorted(figures.errors.items()))
            lines.append(f"requests on {name}: {figures.running} in flight, {figures.waiting} waiting, "
                         f"{figures.served} served" + (f" (errors: {errors})" if errors else ""))
    headers = ("device", "state", "stages", "layers", "streamed", "budget MB", "RSS MB", "KV tokens", "busy",
               "steps", "adaptations")
    rows = []
    for device_id in sorted(view.devices):
        status, telemetry = view.devices[device_id], view.telemetry.get(device_id)
        layers = ", ".join(f"[{a}, {b})" for a, b in status.layers)
        rows.append((
            device_id, status.state, ",".join(str(s) for s in status.stages) or "-",
            layers or "-", f"{len(status.streamed)} layers" if status.streamed else "-", _number(status.memory_mb),
            _number(telemetry.rss_mb if telemetry else status.rss_mb),
            _number(telemetry.kv_tokens if telemetry else None),
            f"{busy[device_id]:.0%}" if busy and device_id in busy else "-",
            _number(telemetry.steps_done if telemetry else None), _number(telemetry.adaptations if telemetry else None),
        ))
    if not rows:
        lines.append("no devices have registered")
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.1f}"
    return str(int(value)) if isinstance(value, float) else str(value)
