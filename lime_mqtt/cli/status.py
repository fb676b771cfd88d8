"""What a cluster looks like now, from its retained messages and a moment of telemetry:
``lime-mqtt status``."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from lime_mqtt.core.topics import Topics, device_id_from_status_topic, parse_status
from lime_mqtt.planning.plan import Plan
from lime_mqtt.transport import BrokerAddress, Transport, transport_for


@dataclass
class ClusterView:
    cluster: str
    plan: Plan | None = None
    planner: dict[str, Any] = field(default_factory=dict)
    coordinators: set[str] = field(default_factory=set)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> status
    telemetry: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> latest telemetry


async def gather_status(broker: str | BrokerAddress | Transport, cluster: str, wait_s: float = 6.0) -> ClusterView:
    """The retained plan, planner, coordinator and device statuses, and the telemetry that
    arrives within ``wait_s`` seconds (devices report every 5 s by default)."""
    topics = Topics(cluster)
    view = ClusterView(cluster)
    async with transport_for(broker).connection() as conn:
        await conn.subscribe(topics.plan, topics.planner_status, topics.all_coordinator_status,
                             topics.all_device_status)
        await conn.subscribe(f"{topics.root}/devices/+/telemetry", qos=0)
        try:
            async with asyncio.timeout(wait_s):
                async for message in conn.messages():
                    _take(view, topics, message.topic, message.payload)
                    reported = {d for d, s in view.devices.items() if s.get("state") != "offline"}
                    if reported and reported <= set(view.telemetry):
                        break  # every device that is up has reported: no need to wait longer
        except TimeoutError:
            pass
    return view


def _take(view: ClusterView, topics: Topics, topic: str, payload: bytes) -> None:
    try:
        if topic == topics.plan and payload:
            view.plan = Plan.from_json(payload)
        elif topic == topics.planner_status and payload:
            view.planner = json.loads(payload)
        elif topic.startswith(f"{topics.root}/coordinators/"):
            name = topic.split("/")[-2]
            (view.coordinators.add if payload else view.coordinators.discard)(name)
        elif (device_id := device_id_from_status_topic(topic)) is not None:
            status = parse_status(payload)
            if status is not None:
                view.devices[device_id] = status
        elif topic.endswith("/telemetry"):
            data = json.loads(payload)
            if isinstance(data, dict):
                view.telemetry[topic.split("/")[-2]] = data
    except ValueError:
        pass  # a malformed message says nothing about the cluster


def format_status(view: ClusterView) -> str:
    lines = [f"cluster {view.cluster}"]
    if view.plan is not None:
        predicted = f", predicted {view.plan.predicted_ms_per_token:.1f} ms/token" \
            if view.plan.predicted_ms_per_token else ""
        lines.append(f"plan {view.plan.epoch}: {len(view.plan.stages)} stages of {view.plan.model}{predicted}")
    else:
        lines.append("no plan")
    if view.planner:
        lines.append(f"planner: {view.planner.get('state')}: {view.planner.get('message')}")
    lines.append(f"coordinators: {', '.join(sorted(view.coordinators)) or 'none'}")
    headers = ("device", "state", "stages", "layers", "streamed", "budget MB", "RSS MB", "KV tokens", "steps",
               "adaptations")
    rows = []
    for device_id in sorted(view.devices):
        status, telemetry = view.devices[device_id], view.telemetry.get(device_id, {})
        layers = ", ".join(f"[{a}, {b})" for a, b in status.get("layers", []))
        streamed = status.get("streamed") or []
        rows.append((
            device_id, status.get("state", "?"), ",".join(str(s) for s in status.get("stages", [])) or "-",
            layers or "-", f"{len(streamed)} layers" if streamed else "-", _number(status.get("memory_mb")),
            _number(telemetry.get("rss_mb", status.get("rss_mb"))), _number(telemetry.get("kv_tokens")),
            _number(telemetry.get("steps_done")), _number(telemetry.get("adaptations")),
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
    return f"{value:.1f}" if isinstance(value, float) else str(value)
