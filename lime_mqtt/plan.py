"""Plans: which device runs which layers and owns which KV cache (docs/planner.md).

Pure functions and models, no I/O. A plan is published as retained JSON with an epoch
that grows by one with every new plan.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, model_validator

from lime_mqtt.errors import PlanError

MIB = 1024 * 1024
PLAN_VERSION = 1


class StagePlan(BaseModel):
    """One stage: its device, its half-open layer range, and the KV cache it owns."""

    stage: int = Field(ge=0)
    device_id: str
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    embed: bool
    head: bool
    weight_bytes: int = Field(ge=0)
    kv_tokens: int = Field(ge=0, description="tokens of KV cache (all sequences) this device may hold")

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


class Plan(BaseModel):
    version: int = PLAN_VERSION
    epoch: int = Field(ge=1)
    model: str
    num_layers: int = Field(ge=1)
    created: float = Field(default_factory=time.time)
    stages: list[StagePlan]

    @model_validator(mode="after")
    def _covers_all_layers(self) -> Plan:
        expected = 0
        for index, stage in enumerate(self.stages):
            if stage.stage != index or stage.start != expected or stage.stop <= stage.start:
                raise ValueError(f"stage {index} does not continue the layer ranges at {expected}")
            expected = stage.stop
        if expected != self.num_layers or not self.stages:
            raise ValueError(f"stages cover {expected} of {self.num_layers} layers")
        if not self.stages[0].embed or not self.stages[-1].head:
            raise ValueError("the first stage must hold the embedding and the last the head")
        return self

    def stage_of(self, device_id: str) -> StagePlan | None:
        return next((s for s in self.stages if s.device_id == device_id), None)

    def ready(self, statuses: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether every stage's device reports, in ``statuses`` (device id -> status), that it
        has loaded this plan."""
        return all(
            statuses.get(s.device_id, {}).get("state") == "ready"
            and statuses.get(s.device_id, {}).get("plan_epoch") == self.epoch
            for s in self.stages
        )

    @property
    def kv_token_capacity(self) -> int:
        """Tokens the whole pipeline can hold at once: the smallest owner decides."""
        return min(s.kv_tokens for s in self.stages)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, payload: bytes) -> Plan:
        return cls.model_validate(json.loads(payload))


@dataclass(frozen=True)
class DeviceOffer:
    """What the planner knows of a device: its id and memory budget (bytes for weights + KV)."""

    device_id: str
    memory_bytes: int


@dataclass(frozen=True)
class ModelSize:
    """The byte sizes the planner needs, read from safetensors headers."""

    name: str
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)


def _stage_bytes(model: ModelSize, start: int, stop: int, first: bool, last: bool) -> int:
    return (
        sum(model.layer_bytes[start:stop])
        + (model.embed_bytes if first else 0)
        + (model.head_bytes if last else 0)
    )


def _proportional_counts(weights: list[float], total: int) -> list[int]:
    """Split ``total`` items proportionally to ``weights`` (largest remainder), at least 1 each."""
    share = sum(weights)
    raw = [total * w / share for w in weights]
    counts = [max(1, int(r)) for r in raw]
    while sum(counts) > total:
        i = max(range(len(counts)), key=lambda j: (counts[j] - raw[j], counts[j]))
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(len(counts)), key=lambda j: raw[j] - counts[j])
        counts[i] += 1
    return counts


def proportional_plan(
    model: ModelSize,
    devices: list[DeviceOffer],
    epoch: int,
    min_kv_tokens: int = 256,
) -> Plan:
    """A contiguous split of the layers proportional to each device's memory budget.

    Devices are taken in id order. A device whose share would be zero layers is left
    out. Every stage must fit its weights plus ``min_kv_tokens`` of KV cache in its
    budget; if the proportional split does not, layers move from over-full stages to
    neighbours with room. A cluster that cannot hold the model gets a :class:`PlanError`
    that says how much is missing.
    """
    if not devices:
        raise PlanError("no devices have registered")
    devices = sorted(devices, key=lambda d: d.device_id)[: model.num_layers]
    kv_per_layer = model.kv_bytes_per_token_per_layer * min_kv_tokens
    need = sum(model.layer_bytes) + model.embed_bytes + model.head_bytes + kv_per_layer * model.num_layers
    have = sum(d.memory_bytes for d in devices)
    if need > have:
        raise PlanError(
            f"the model needs {need / MIB:.0f} MiB (weights and {min_kv_tokens} tokens of KV cache) "
            f"but the {len(devices)} devices offer {have / MIB:.0f} MiB together: "
            f"{(need - have) / MIB:.0f} MiB missing"
        )
    counts = _proportional_counts([float(d.memory_bytes) for d in devices], model.num_layers)

    def fits(i: int, start: int, stop: int) -> bool:
        used = _stage_bytes(model, start, stop, i == 0, i == len(devices) - 1)
        return used + kv_per_layer * (stop - start) <= devices[i].memory_bytes

    for _ in range(model.num_layers * len(devices)):
        bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
        over = [i for i in range(len(devices)) if not fits(i, bounds[i], bounds[i + 1])]
        if not over:
            break
        i = over[0]
        # Give one layer to the neighbour with the most spare room (it must still fit).
        moved = False
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(devices)]
        for j in sorted(neighbours, key=lambda j: -devices[j].memory_bytes):
            if counts[i] > 1:
                trial = counts.copy()
                trial[i] -= 1
                trial[j] += 1
                b = [sum(trial[:k]) for k in range(len(trial) + 1)]
                if fits(j, b[j], b[j + 1]):
                    counts, moved = trial, True
                    break
        if not moved:
            raise PlanError(
                f"device {devices[i].device_id} ({devices[i].memory_bytes / MIB:.0f} MiB) cannot hold "
                f"its {counts[i]} layer(s) and no neighbour has room to take one"
            )
    else:
        raise PlanError("could not balance the layers within the memory budgets")

    stages: list[StagePlan] = []
    start = 0
    active = [(d, c) for d, c in zip(devices, counts, strict=True) if c > 0]
    for index, (device, count) in enumerate(active):
        stop = start + count
        first, last = index == 0, index == len(active) - 1
        weights = _stage_bytes(model, start, stop, first, last)
        kv_budget = device.memory_bytes - weights
        kv_tokens = kv_budget // max(1, model.kv_bytes_per_token_per_layer * count)
        stages.append(
            StagePlan(
                stage=index,
                device_id=device.device_id,
                start=start,
                stop=stop,
                embed=first,
                head=last,
                weight_bytes=weights,
                kv_tokens=int(kv_tokens),
            )
        )
        start = stop
    return Plan(epoch=epoch, model=model.name, num_layers=model.num_layers, stages=stages)


def format_plan(plan: Plan) -> str:
    """The plan as a fixed-width table for a terminal."""
    rows = [("stage", "device", "layers", "embed", "head", "weights MiB", "KV tokens")]
    for s in plan.stages:
        rows.append(
            (
                str(s.stage),
                s.device_id,
                f"[{s.start}, {s.stop})",
                "yes" if s.embed else "",
                "yes" if s.head else "",
                f"{s.weight_bytes / MIB:.1f}",
                str(s.kv_tokens),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"plan epoch {plan.epoch}, model {plan.model}, {plan.num_layers} layers"]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
