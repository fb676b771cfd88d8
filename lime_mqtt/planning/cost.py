"""The cost model of docs/planner.md: predicted time per token and memory of a placement.

Pure arithmetic, no I/O. A *placement* is an ordered list of (device, first layer, stop
layer) stages; :func:`layout_stage` decides which of a stage's layers stay resident and
which are streamed from local disk, and :func:`evaluate` predicts the milliseconds per
output token of the whole pipeline. The planner's search (lime_mqtt/planning/plan.py) and the
brute-force check of its optimality (tests/test_planner_search.py) both call these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

MIB = 1024 * 1024
# A long prompt goes in chunks small enough that one chunk's hidden states cross the
# plan's slowest link within this budget (``--prefill-link-ms``): a bigger message
# would hold the decode steps of other requests behind it on that link.
PREFILL_LINK_BUDGET_MS = 100.0
MIN_LINK_CHUNK = 16  # however slow the link: smaller chunks cost more in round trips than they save
OBJECTIVES = ("latency", "throughput")
Objective = Literal["latency", "throughput"]

# What a device that has not measured itself (``--no-measure``) is assumed to do: the
# same for every device, so the planner then splits by memory alone.
DEFAULT_CAPABILITIES: dict[str, float] = {
    "layer_decode_ms": 2.0,
    "layer_prefill_ms_per_token": 0.2,
    "matvec_gb_s": 10.0,
    "disk_mb_s": 200.0,
    "link_rtt_ms": 0.5,
    "link_mb_s": 100.0,
}


@dataclass(frozen=True)
class ModelSize:
    """The byte sizes the planner needs, read from safetensors headers."""

    name: str
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int
    hidden_bytes_per_token: int = 0  # one token's activations between stages

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes


@dataclass(frozen=True)
class DeviceProfile:
    """A device as the cost model sees it: its memory budget and measured rates.

    ``memory_bytes`` is what the device may use above its process baseline, for
    resident weights, streaming buffers and KV cache together.
    """

    device_id: str
    memory_bytes: int
    layer_decode_ms: float = DEFAULT_CAPABILITIES["layer_decode_ms"]
    layer_prefill_ms_per_token: float = DEFAULT_CAPABILITIES["layer_prefill_ms_per_token"]
    matvec_gb_s: float = DEFAULT_CAPABILITIES["matvec_gb_s"]
    disk_mb_s: float = DEFAULT_CAPABILITIES["disk_mb_s"]
    link_rtt_ms: float = DEFAULT_CAPABILITIES["link_rtt_ms"]
    link_mb_s: float = DEFAULT_CAPABILITIES["link_mb_s"]
    trusted: bool = False  # may see token ids and text (docs/security.md)

    @classmethod
    def from_status(cls, device_id: str, status: Mapping[str, Any]) -> DeviceProfile:
        """From a device's status message: ``memory_mb``, its measured ``capabilities`` and
        whether its profile marks it ``trusted``."""
        measured = status.get("capabilities") if isinstance(status.get("capabilities"), dict) else {}
        rates = {}
        for name, default in DEFAULT_CAPABILITIES.items():
            value = measured.get(name, default) if measured else default
            rates[name] = float(value) if isinstance(value, int | float) and value > 0 else default
        return cls(device_id, int(status.get("memory_mb", 0)) * MIB, **rates, trusted=status.get("trusted") is True)


@dataclass(frozen=True)
class Workload:
    """What the plan is made for."""

    context_tokens: int = 512  # KV cache reserved per sequence
    sequences: int = 1  # sequences served at once
    objective: Objective = "latency"
    reserve_bytes: int = 32 * MIB  # per device: activations, message buffers, allocator slack
    # per token, besides the stages: measured when the coordinator sent every step (its hop
    # and bookkeeping); with chained decode steps it is off the path, and the constant was
    # kept, not measured again (docs/planner.md)
    overhead_ms: float = 1.0
    # The first stage (it sees token ids) and the last (it chooses them) only on trusted devices.
    trusted_ends: bool = False

    @property
    def kv_tokens(self) -> int:
        return self.context_tokens * self.sequences


@dataclass(frozen=True)
class StageLayout:
    """One stage's memory layout and the parts of its predicted time that are its own."""

    device_id: str
    start: int
    stop: int
    embed: bool
    head: bool
    streamed: tuple[int, ...]  # layers read from disk for every token
    slots: int  # streamed layers held in memory at once (in use + prefetched)
    resident_bytes: int  # resident layers + embedding/head
    streamed_bytes: int
    slot_bytes: int
    kv_tokens: int  # tokens of KV cache (all sequences) this device may hold
    compute_ms: float  # its layers (and head) for one decode token
    link_ms: float  # receiving and sending one token's message through the broker
    load_ms: float  # reading its streamed layers from disk, per token
    prefetch_ms: float  # reading its first `slots` streamed layers (read ahead while it waits)
    resident_compute_ms: float  # its resident layers, which run before the streamed ones
    tail_stall_ms: float  # waiting for each later streamed layer while computing the one before

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


def link_ms(model: ModelSize, device: DeviceProfile) -> float:
    """One token's message in and one out through the broker."""
    return device.link_rtt_ms + 2 * model.hidden_bytes_per_token / (device.link_mb_s * 1e3)


def head_ms(model: ModelSize, device: DeviceProfile) -> float:
    """The final norm and output matrix: one matrix-vector product, bound by memory bandwidth."""
    return model.head_bytes / (device.matvec_gb_s * 1e6)


def layout_stage(
    model: ModelSize, device: DeviceProfile, start: int, stop: int, embed: bool, head: bool, workload: Workload
) -> StageLayout | None:
    """Fit layers ``[start, stop)`` into ``device``'s budget; ``None`` if they cannot fit
    even with all but the KV cache streamed. (One segment: see :func:`layout_device`.)"""
    layouts = layout_device(model, device, [(start, stop)], workload, embed=embed, head=head)
    return layouts[0] if layouts else None


def layout_device(
    model: ModelSize,
    device: DeviceProfile,
    spans: list[tuple[int, int]],
    workload: Workload,
    *,
    embed: bool | None = None,
    head: bool | None = None,
) -> list[StageLayout] | None:
    """Fit a device's segments (layer spans, in ring order) into its budget.

    Layers stay resident from the front of each span; the fewest layers that make the
    device fit are streamed, taken from the ends of its spans in turn (last span first).
    A streaming device keeps up to two streamed layers in memory (one in use, one being
    read ahead), shared by all its segments. The embedding goes with a span that starts
    at layer 0 and the head with one that ends at the last layer, unless ``embed`` and
    ``head`` say otherwise. ``None`` if even all layers streamed do not fit.
    """
    count = sum(stop - start for start, stop in spans)
    has_embed = any(start == 0 for start, _ in spans) if embed is None else embed
    has_head = any(stop == model.num_layers for _, stop in spans) if head is None else head
    kv_per_token = model.kv_bytes_per_token_per_layer * count
    fixed = (model.embed_bytes if has_embed else 0) + (model.head_bytes if has_head else 0) + workload.reserve_bytes
    fixed += kv_per_token * workload.kv_tokens
    available = device.memory_bytes - fixed
    order = _streaming_order(spans)
    resident_bytes = sum(model.layer_bytes[i] for start, stop in spans for i in range(start, stop))
    chosen: list[int] = []
    while True:
        slots = min(len(chosen), 2)
        slot_bytes = slots * max((model.layer_bytes[i] for i in chosen), default=0)
        if resident_bytes + slot_bytes <= available:
            break
        if len(chosen) == len(order):
            return None
        layer = order[len(chosen)]
        chosen.append(layer)
        resident_bytes -= model.layer_bytes[layer]
    streamed = set(chosen)
    slots = min(len(chosen), 2)
    slot_bytes = slots * max((model.layer_bytes[i] for i in chosen), default=0)
    weights = resident_bytes + (model.embed_bytes if has_embed else 0) + (model.head_bytes if has_head else 0)
    spare = device.memory_bytes - weights - slot_bytes - workload.reserve_bytes
    kv_tokens = spare // max(1, kv_per_token)
    overlap = (slots - 1) * device.layer_decode_ms
    layouts = []
    for index, (start, stop) in enumerate(spans):
        mine = [i for i in range(start, stop) if i in streamed]
        first = has_embed and start == 0
        last = has_head and (stop == model.num_layers if head is None else index == len(spans) - 1)
        loads = [model.layer_bytes[i] / (device.disk_mb_s * 1e3) for i in mine]
        span_weights = sum(model.layer_bytes[i] for i in range(start, stop) if i not in streamed)
        layouts.append(StageLayout(
            device_id=device.device_id,
            start=start,
            stop=stop,
            embed=first,
            head=last,
            streamed=tuple(mine),
            slots=slots,
            resident_bytes=span_weights + (model.embed_bytes if first else 0) + (model.head_bytes if last else 0),
            streamed_bytes=sum(model.layer_bytes[i] for i in mine),
            slot_bytes=slot_bytes if index == 0 else 0,  # shared by the device's segments
            kv_tokens=kv_tokens,
            compute_ms=(stop - start) * device.layer_decode_ms + (head_ms(model, device) if last else 0.0),
            link_ms=link_ms(model, device),
            load_ms=sum(loads),
            prefetch_ms=sum(loads[:slots]),
            resident_compute_ms=(stop - start - len(mine)) * device.layer_decode_ms,
            # Streamed layer j > slots is read once layer j - slots is done, and is needed
            # once layer j - 1 is done: with two slots, its read overlaps one layer's compute.
            tail_stall_ms=sum(max(0.0, load - overlap) for load in loads[slots:]),
        ))
    return layouts


def _streaming_order(spans: list[tuple[int, int]]) -> list[int]:
    """Which layers to stream first: the ends of the spans in turn, last span first, so
    that every segment keeps resident layers at its front to hide its read-ahead."""
    tails = [list(range(stop - 1, start - 1, -1)) for start, stop in reversed(spans)]
    order = []
    for depth in range(max((len(t) for t in tails), default=0)):
        order += [t[depth] for t in tails if depth < len(t)]
    return order


@dataclass(frozen=True)
class PlanCost:
    """The prediction for one placement."""

    stages: tuple[StageLayout, ...]
    stall_ms: tuple[float, ...]  # per stage: disk reading not hidden behind other work
    ms_per_token: float  # latency of one token with one sequence in flight
    bottleneck_ms: float  # the busiest stage's time per token when many sequences are in flight
    overhead_ms: float

    def objective(self, objective: Objective) -> float:
        return self.ms_per_token if objective == "latency" else self.bottleneck_ms

    def stage_ms(self, index: int) -> float:
        stage = self.stages[index]
        return stage.compute_ms + stage.link_ms + self.stall_ms[index]


def stall_ms(stage: StageLayout, idle_ms: float) -> float:
    """Weight reading of ``stage`` not hidden: its read-ahead beyond the time since the
    device's previous segment (``idle_ms``) and its own resident layers, plus the waits
    for its later streamed layers."""
    if not stage.streamed:
        return 0.0
    return max(0.0, stage.prefetch_ms - idle_ms - stage.resident_compute_ms) + stage.tail_stall_ms


def stall_lower_bound(stage: StageLayout) -> float:
    """The stall if the rest of the pipeline took forever (all of the read-ahead hidden)."""
    return stage.tail_stall_ms


def busy_ms(stage: StageLayout) -> float:
    """A stage's own time per token when it never waits for others (throughput bound)."""
    return stage.compute_ms + stage.link_ms + stall_ms(stage, 0.0)


def evaluate(stages: Sequence[StageLayout], workload: Workload) -> PlanCost:
    """Predicted milliseconds per output token (docs/planner.md, "The cost model").

    With one token in flight the stages run one after another, so the pipeline time is
    ``P`` = the sum of every stage's compute and link time plus the coordinator's
    overhead. A streaming stage reads its streamed layers once per token: its first
    ``slots`` are read ahead while the rest of the pipeline (``P`` minus its own part)
    works and while it computes its resident layers; each later one is read while it
    computes the layer before. What is not hidden is a stall that adds to ``P``.
    """
    own = [s.compute_ms + s.link_ms for s in stages]
    pipeline = sum(own) + workload.overhead_ms
    stalls = []
    for index, stage in enumerate(stages):
        # The time since this device's previous segment (round the ring) ended.
        idle, back = 0.0, index
        while True:
            back = (back - 1) % len(stages)
            if back == len(stages) - 1:
                idle += workload.overhead_ms
            if stages[back].device_id == stage.device_id:
                break
            idle += own[back]
        stalls.append(stall_ms(stage, idle))
    busy: dict[str, float] = {}
    for stage in stages:  # a device with several segments does all of them per token
        busy[stage.device_id] = busy.get(stage.device_id, 0.0) + busy_ms(stage)
    return PlanCost(
        stages=tuple(stages),
        stall_ms=tuple(stalls),
        ms_per_token=pipeline + sum(stalls),
        bottleneck_ms=max(busy.values()),
        overhead_ms=workload.overhead_ms,
    )


def predict_prefill_ms(
    cost: PlanCost, model: ModelSize, devices: Mapping[str, DeviceProfile], prompt_tokens: int
) -> float:
    """Predicted time to the first token for a prompt of ``prompt_tokens``: every stage
    runs its layers over the whole prompt once, streamed layers are read once. The
    prompt's hidden states cross each device's link once in (but the first stage's, which
    gets token ids) and once out (but the last stage's, which sends one token)."""
    total = cost.overhead_ms
    hidden_bytes = prompt_tokens * model.hidden_bytes_per_token
    for index, stage in enumerate(cost.stages):
        device = devices[stage.device_id]
        total += (stage.stop - stage.start) * device.layer_prefill_ms_per_token * prompt_tokens
        total += stage.compute_ms - (stage.stop - stage.start) * device.layer_decode_ms  # the head, once
        crossings = (index > 0) + (index < len(cost.stages) - 1)
        total += device.link_rtt_ms + crossings * hidden_bytes / (device.link_mb_s * 1e3)
        total += max(0.0, stage.load_ms - stage.prefetch_ms)
    return total


def link_chunk_tokens(chunk: int, hidden_bytes_per_token: int, link_mb_s: Sequence[float],
                      budget_ms: float) -> int:
    """The prefill chunk for a plan whose devices' links measure ``link_mb_s``: at most
    ``chunk`` tokens (0: prompts are never cut), and few enough that one chunk's hidden
    states cross the slowest link, in and out through the broker, within ``budget_ms``, so
    that other requests' decode steps are not held behind it for longer. Rounded down to
    a power of two (a link measured a little faster or slower gives the same chunk), at
    least :data:`MIN_LINK_CHUNK`. ``budget_ms`` 0, or no link measured: ``chunk``."""
    if not chunk or budget_ms <= 0 or not link_mb_s or hidden_bytes_per_token <= 0:
        return chunk
    slowest = min(link_mb_s)
    if slowest <= 0:
        return min(chunk, MIN_LINK_CHUNK)
    fits = int(budget_ms * slowest * 1e3 / (2 * hidden_bytes_per_token))
    if fits >= chunk:
        return chunk
    return min(chunk, max(MIN_LINK_CHUNK, 1 << max(0, fits.bit_length() - 1)))
