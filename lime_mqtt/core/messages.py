"""Typed messages of the cluster's retained state and reports (docs/topics.md).

One model per message, each with a version, and one decoder each that checks size,
JSON, version, types and ranges before anything uses the message, and raises
:class:`~lime_mqtt.core.errors.MessageError` (never a library's error). Receivers drop
what does not decode and log why; a malformed message changes nothing.

- :class:`DeviceStatus`: ``device/{id}/status``, retained; an empty payload (cleared) is offline.
- :class:`DeviceTelemetry`: ``device/{id}/telemetry``, every few seconds.
- :class:`PlannerStatus`: ``planner/{name}/status``, retained: why there is (no) plan.
- :class:`CoordinatorStatus`: ``coordinator/{name}/status``, retained while it serves.
- :class:`CoordinatorTelemetry`: ``coordinator/{name}/telemetry``, every few seconds:
  requests in flight, counts, errors by code, time-to-first-token and per-token histograms.

Plans (``core.plan.Plan``), stage envelopes (``core.wire``), client requests
(``core.protocol``) and weight messages (``core.weight_messages``) have their own modules
and decoders of the same kind.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from lime_mqtt.core.errors import MessageError

STATUS_VERSION = 1
MAX_STATUS_BYTES = 64 * 1024  # a device status with its capabilities is about 1 KB
MAX_TELEMETRY_BYTES = 64 * 1024

DeviceState = Literal["idle", "measuring", "fetching", "loading", "ready", "leaving", "offline", "error"]
# States in which a device counts as a member of the cluster (the planner may plan with it).
ONLINE_STATES: tuple[DeviceState, ...] = ("idle", "fetching", "loading", "ready")
# States that mean a plan's stage will not answer. ("leaving" is not one: such a device
# serves on until the plan without it is out.)
GONE_STATES: tuple[DeviceState, ...] = ("offline", "error")

# A version field: exactly this integer (not true, not 1.0, not "1").
V1 = Annotated[int, Strict(), Field(ge=1, le=1)]
V2 = Annotated[int, Strict(), Field(ge=2, le=2)]

_DEVICE_ID = r"^[^/+#\s\x00]{1,64}$"
_NAME = r"^[^/+#\s\x00]{1,128}$"


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


M = TypeVar("M", bound=BaseModel)


def problems(exc: ValidationError) -> str:
    """A pydantic error list as one readable line."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in exc.errors())


def decode_json_model(model: type[M], payload: bytes, max_bytes: int, what: str) -> M:
    """``payload`` as ``model``: at most ``max_bytes``, JSON, every field checked."""
    if len(payload) > max_bytes:
        raise MessageError(f"{what} of {len(payload)} bytes is larger than the {max_bytes} allowed")
    try:
        return model.model_validate_json(payload, context={"received": True})
    except ValidationError as exc:
        raise MessageError(f"malformed {what}: {problems(exc)}") from None
    except (ValueError, RecursionError) as exc:  # a library's limit, not a field's check
        raise MessageError(f"malformed {what}: {type(exc).__name__}") from None


class DeviceStatus(_Message):
    """What a device says about itself (retained; its last will says ``offline``)."""

    v: V1
    device_id: str = Field(pattern=_DEVICE_ID)
    state: DeviceState
    model: str | None = Field(None, min_length=1, max_length=256)
    memory_mb: float = Field(0, ge=0, le=1 << 30)  # the API takes fractions (tests); the CLI whole MB
    host: str | None = Field(None, max_length=256)
    pid: int | None = Field(None, ge=0)
    torch_device: str | None = Field(None, max_length=64)
    threads: int | None = Field(None, ge=1, le=4096)
    baseline_rss_mb: float = Field(0.0, ge=0)
    baseline_anon_mb: float = Field(0.0, ge=0)
    ts: float = Field(0.0, ge=0)
    peak_rss_mb: float | None = Field(None, ge=0)
    rss_mb: float | None = Field(None, ge=0)
    anon_mb: float | None = Field(None, ge=0)
    plan_epoch: int | None = Field(None, ge=1)
    stages: list[int] = Field(default_factory=list, max_length=4096)
    layers: list[tuple[int, int]] = Field(default_factory=list, max_length=4096)
    streamed: list[int] = Field(default_factory=list, max_length=65536)
    streamed_by_plan: list[int] = Field(default_factory=list, max_length=65536)
    param_count: int | None = Field(None, ge=0)
    weight_bytes: int | None = Field(None, ge=0)  # held by its shards, in their own formats
    formats: list[str] = Field(default_factory=list, max_length=16)  # e.g. ["BF16"], ["F32", "Q4_1", "Q8_0"]
    loaded_anon_mb: float | None = Field(None, ge=0)  # resident memory its last load of shards added
    capabilities: dict[str, float] = Field(default_factory=dict, max_length=64)
    trusted: bool = False  # its profile says it may see token ids and text (docs/security.md)
    error: str | None = Field(None, max_length=4096)

    @classmethod
    def offline(cls, device_id: str) -> DeviceStatus:
        """What an empty (cleared) retained status means."""
        return cls(v=1, device_id=device_id, state="offline")


def decode_device_status(payload: bytes, device_id: str | None = None) -> DeviceStatus:
    """A device status; with ``device_id`` (from the topic) it must name that device.
    An empty payload, a cleared retained status, is that device gone offline."""
    if not payload:
        if device_id is None:
            raise MessageError("an empty device status needs the device id of its topic")
        return DeviceStatus.offline(device_id)
    status = decode_json_model(DeviceStatus, payload, MAX_STATUS_BYTES, "device status")
    if device_id is not None and status.device_id != device_id:
        raise MessageError(f"a status of device {status.device_id!r} arrived on the topic of {device_id!r}")
    return status


class Adaptation(_Message):
    """One change of what a device streams, made by its memory governor."""

    ts: float
    kv_mb: float = Field(ge=0)
    budget_mb: float = Field(ge=0)
    held_mb_before: float = Field(ge=0)
    held_mb_after: float = Field(ge=0)
    streamed: list[int] = Field(max_length=65536)
    action: Literal["stream", "hold"]


class DeviceTelemetry(_Message):
    """A device's moment-to-moment figures, published every ``--telemetry-interval``."""

    v: V1
    device_id: str = Field(pattern=_DEVICE_ID)
    ts: float = Field(ge=0)
    rss_mb: float = Field(ge=0)
    peak_rss_mb: float = Field(ge=0)
    kv_sequences: int = Field(ge=0)
    kv_tokens: int = Field(ge=0)
    peak_kv_tokens: int = Field(ge=0)
    queue_depth: int = Field(ge=0)
    steps_done: int = Field(ge=0)
    batches: int = Field(ge=0)
    inline_steps: int = Field(0, ge=0)  # forward passes run on the event loop's thread (quick decode steps)
    duplicates: int = Field(ge=0)
    impostors: int = Field(0, ge=0)  # steps dropped: their sender is not the one the plan puts before the stage
    adaptations: int = Field(ge=0)
    last_adaptation: Adaptation | None = None
    streamed: list[int] = Field(default_factory=list, max_length=65536)
    held_mb: float | None = Field(None, ge=0)
    compute_s: float = Field(ge=0)
    streamed_mb: float = Field(ge=0)
    stream_wait_s: float = Field(ge=0)


def decode_device_telemetry(payload: bytes, device_id: str | None = None) -> DeviceTelemetry:
    telemetry = decode_json_model(DeviceTelemetry, payload, MAX_TELEMETRY_BYTES, "device telemetry")
    if device_id is not None and telemetry.device_id != device_id:
        raise MessageError(f"telemetry of device {telemetry.device_id!r} arrived on the topic of {device_id!r}")
    return telemetry


class PlannerStatus(_Message):
    """The planner's word (retained): waiting for devices, planned, or why it cannot plan."""

    v: V1
    state: Literal["waiting", "planned", "error"]
    message: str = Field(max_length=16384)
    model: str = Field(min_length=1, max_length=256)
    devices: list[str] = Field(default_factory=list, max_length=4096)
    ts: float = Field(0.0, ge=0)


def decode_planner_status(payload: bytes) -> PlannerStatus:
    return decode_json_model(PlannerStatus, payload, MAX_STATUS_BYTES, "planner status")


class CoordinatorStatus(_Message):
    """A coordinator that serves (retained; cleared by a clean exit or its last will)."""

    v: V1
    name: str = Field(pattern=_NAME)
    state: Literal["online"]
    model: str = Field(min_length=1, max_length=256)


def decode_coordinator_status(payload: bytes) -> CoordinatorStatus | None:
    """The status, or ``None`` for an empty payload (the coordinator is gone)."""
    if not payload:
        return None
    return decode_json_model(CoordinatorStatus, payload, MAX_STATUS_BYTES, "coordinator status")


# The bucket bounds (ms) of a coordinator's histograms; the last bucket is everything above.
TTFT_BUCKETS_MS = (25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0)
TPOT_BUCKETS_MS = (5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)
MAX_ERROR_CODES = 64
MAX_RECENT = 32


class Histogram(_Message):
    """Observations by bucket: ``counts[i]`` fell at or below ``bounds[i]`` and above the
    bound before; the last count is everything above the last bound (so one more count
    than bounds). ``sum`` of every observation, in the same unit."""

    bounds: list[float] = Field(max_length=64)
    counts: list[Annotated[int, Field(ge=0)]] = Field(max_length=65)
    sum: float = Field(ge=0)

    @property
    def count(self) -> int:
        return sum(self.counts)

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.counts) != len(self.bounds) + 1 or any(a >= b for a, b in itertools.pairwise(self.bounds)):
            raise ValueError("a histogram needs increasing bounds and one count more than bounds")
        return self


class RecentRequest(_Message):
    """One request that ended with an answer, for the dashboard's recent figures."""

    ts: float = Field(ge=0)
    ttft_ms: float = Field(ge=0)
    tpot_ms: float = Field(ge=0)
    tokens: int = Field(ge=0)


class CoordinatorTelemetry(_Message):
    """A coordinator's figures, published every ``--telemetry-interval``. Counters count
    since the coordinator started."""

    v: V1
    name: str = Field(pattern=_NAME)
    ts: float = Field(ge=0)
    running: int = Field(ge=0)  # requests generating now
    waiting: int = Field(ge=0)  # received, waiting for a slot or for KV-cache room
    served: int = Field(ge=0)  # requests that ended, with an answer or an error
    answered: int = Field(ge=0)  # of them, with a whole answer
    errors: dict[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=MAX_ERROR_CODES)  # by error code
    replays: int = Field(ge=0)  # token histories replayed on a new plan
    prefill_chunks: int = Field(0, ge=0)  # leading chunks of long prompts, each sent as its own step
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    ttft_ms: Histogram
    tpot_ms: Histogram
    recent: list[RecentRequest] = Field(default_factory=list, max_length=MAX_RECENT)


def decode_coordinator_telemetry(payload: bytes, name: str | None = None) -> CoordinatorTelemetry:
    """A coordinator's telemetry; with ``name`` (from the topic) it must be that coordinator's."""
    telemetry = decode_json_model(CoordinatorTelemetry, payload, MAX_TELEMETRY_BYTES, "coordinator telemetry")
    if name is not None and telemetry.name != name:
        raise MessageError(f"telemetry of coordinator {telemetry.name!r} arrived on the topic of {name!r}")
    return telemetry
