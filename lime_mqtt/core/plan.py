"""The plan as a message: which device runs which layers, which of them it streams from
disk, and how much KV cache it owns (docs/planner.md). Published by the planner as
retained JSON with an epoch that grows by one with every plan; the search that makes it
is :mod:`lime_mqtt.planning.plan`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from lime_mqtt.core.messages import V2, DeviceStatus, decode_json_model

PLAN_VERSION: Literal[2] = 2
MAX_PLAN_BYTES = 4 * 1024 * 1024  # a plan of 4096 stages is about 1.5 MB


class StagePlan(BaseModel):
    """One stage: its device, its half-open layer range, and the KV cache it owns."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    stage: int = Field(ge=0)
    device_id: str
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    embed: bool
    head: bool
    weight_bytes: int = Field(ge=0, description="resident weights: resident layers, embedding, head")
    kv_tokens: int = Field(ge=0, description="tokens of KV cache (all sequences) this device may hold")
    streamed: list[int] = Field(default_factory=list, description="layers read from disk for every token")
    slots: int = Field(default=0, ge=0, description="streamed layers in memory at once")
    streamed_bytes: int = Field(default=0, ge=0)
    compute_ms: float | None = None  # predicted, per token
    link_ms: float | None = None
    stall_ms: float | None = None

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    @property
    def predicted_ms(self) -> float | None:
        if self.compute_ms is None or self.link_ms is None:
            return None
        return self.compute_ms + self.link_ms + (self.stall_ms or 0.0)


class Plan(BaseModel):
    """The retained plan: the stages in ring order, with what the planner predicted."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    version: V2 = PLAN_VERSION
    epoch: int = Field(ge=1)
    model: str
    num_layers: int = Field(ge=1)
    created: float = Field(default_factory=time.time)
    stages: list[StagePlan]
    strategy: str = "optimal"
    objective: str = "latency"
    optimal: bool | None = None  # the search finished (None: not a searched plan)
    context_tokens: int = 0
    sequences: int = 1
    predicted_ms_per_token: float | None = None
    overhead_ms: float | None = None
    left_out: dict[str, str] = Field(default_factory=dict)  # device id -> why it has no stage

    @model_validator(mode="before")
    @classmethod
    def _received_with_version(cls, data: Any, info: ValidationInfo) -> Any:
        """A plan received must say its version (one made here gets the current one)."""
        if info.context and info.context.get("received") and isinstance(data, dict) and "version" not in data:
            raise ValueError("a received plan needs its 'version'")
        return data

    @model_validator(mode="after")
    def _covers_all_layers(self) -> Plan:
        expected = 0
        for index, stage in enumerate(self.stages):
            if stage.stage != index or stage.start != expected or stage.stop <= stage.start:
                raise ValueError(f"stage {index} does not continue the layer ranges at {expected}")
            if any(layer not in stage.layers for layer in stage.streamed):
                raise ValueError(f"stage {index} streams layers outside its range")
            expected = stage.stop
        if expected != self.num_layers or not self.stages:
            raise ValueError(f"stages cover {expected} of {self.num_layers} layers")
        if not self.stages[0].embed or not self.stages[-1].head:
            raise ValueError("the first stage must hold the embedding and the last the head")
        if any(s.embed for s in self.stages[1:]) or any(s.head for s in self.stages[:-1]):
            raise ValueError("only the first stage holds the embedding and only the last the head")
        for a, b in zip(self.stages, self.stages[1:], strict=False):
            if a.device_id == b.device_id:
                raise ValueError(f"stages {a.stage} and {b.stage} are neighbours on one device: make them one")
        return self

    def stages_of(self, device_id: str) -> list[StagePlan]:
        """The device's segments, in ring order (more than one in an interleaved plan)."""
        return [s for s in self.stages if s.device_id == device_id]

    def stage_of(self, device_id: str) -> StagePlan | None:
        """The device's first segment."""
        return next(iter(self.stages_of(device_id)), None)

    @property
    def rounds(self) -> int:
        """How many times a token goes round the devices (1: a plain pipeline)."""
        return max(len(self.stages_of(s.device_id)) for s in self.stages)

    def ready(self, statuses: Mapping[str, DeviceStatus]) -> bool:
        """Whether every stage's device reports, in ``statuses`` (device id -> status), that it
        has loaded this plan."""
        return all(
            (status := statuses.get(s.device_id)) is not None and status.state == "ready"
            and status.plan_epoch == self.epoch
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
        """The plan in ``payload``; :class:`MessageError` if it is not a valid plan."""
        return decode_json_model(cls, payload, MAX_PLAN_BYTES, "plan")
