"""The plan search: which device runs which layers, which of them it streams from disk,
and how much KV cache it owns (docs/planner.md).

Pure functions, no I/O. :func:`make_plan` searches for the fastest placement under the
cost model of :mod:`lime_mqtt.planning.cost`; the plan itself, the retained message, is
:class:`lime_mqtt.core.plan.Plan` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from lime_mqtt.core.errors import PlanError
from lime_mqtt.core.plan import Plan, StagePlan
from lime_mqtt.planning.cost import (
    MIB,
    DeviceProfile,
    ModelSize,
    PlanCost,
    StageLayout,
    Workload,
    busy_ms,
    evaluate,
    head_ms,
    layout_device,
    layout_stage,
    link_ms,
    predict_prefill_ms,
    stall_lower_bound,
)

__all__ = ["MIB", "DeviceProfile", "ModelSize", "Plan", "StagePlan", "Workload", "format_plan", "make_plan"]

STRATEGIES = ("optimal", "memory", "equal")
Strategy = Literal["optimal", "memory", "equal"]
# The search stops after this many partial placements and keeps the best it found
# (the plan then says ``optimal: false``); small clusters finish far below it.
SEARCH_NODE_LIMIT = 400_000


# ----- the search ---------------------------------------------------------------------------------


class _Search:
    """Branch and bound over ordered device subsets and their contiguous layer counts.

    A node is a prefix of the pipeline: stages for layers ``[0, start)`` on distinct
    devices. Its lower bound adds, for the layers still to place, the fastest unused
    device's per-layer time, one more link, the cheapest head, and each placed stage's
    stall as if the rest of the pipeline hid all of its read-ahead. The bound never
    exceeds the true cost of any completion, so pruning on it keeps the optimum.
    """

    def __init__(self, model: ModelSize, devices: Sequence[DeviceProfile], workload: Workload, node_limit: int):
        self.model = model
        # Fast devices first: good placements are found early and prune the rest.
        self.devices = sorted(devices, key=lambda d: (d.layer_decode_ms, -d.memory_bytes, d.device_id))
        self.workload = workload
        self.node_limit = node_limit
        self.nodes = 0
        self.best_cost = math.inf
        self.best: PlanCost | None = None
        self._layouts: dict[tuple[int, int, int, bool], StageLayout | None] = {}
        self._link = [link_ms(model, d) for d in self.devices]
        self._head = [head_ms(model, d) for d in self.devices]

    def layout(self, index: int, start: int, stop: int) -> StageLayout | None:
        key = (index, start, stop, stop == self.model.num_layers)
        if key not in self._layouts:
            self._layouts[key] = layout_stage(
                self.model, self.devices[index], start, stop, start == 0, key[3], self.workload
            )
        return self._layouts[key]

    def offer(self, stages: list[StageLayout]) -> None:
        cost = evaluate(stages, self.workload)
        value = cost.objective(self.workload.objective)
        if value < self.best_cost - 1e-9:
            self.best_cost, self.best = value, cost

    def lower_bound(self, stages: list[StageLayout], unused: list[int], remaining: int) -> float:
        if self.workload.objective == "throughput":
            return max(busy_ms(s) for s in stages)
        bound = self.workload.overhead_ms + sum(s.compute_ms + s.link_ms + stall_lower_bound(s) for s in stages)
        if remaining:
            bound += remaining * min(self.devices[i].layer_decode_ms for i in unused)
            bound += min(self._link[i] for i in unused) + min(self._head[i] for i in unused)
        return bound

    def run(self) -> bool:
        """Search; returns whether it finished (else the best found so far is kept)."""
        try:
            self._extend([], list(range(len(self.devices))), 0)
        except _NodeLimit:
            return False
        return True

    def _extend(self, stages: list[StageLayout], unused: list[int], start: int) -> None:
        layers = self.model.num_layers
        ends = self.workload.trusted_ends
        for index in unused:
            if ends and start == 0 and not self.devices[index].trusted:
                continue  # the first stage sees token ids
            rest = [i for i in unused if i != index]
            last = self.layout(index, start, layers)
            if last is not None and (self.devices[index].trusted or not ends):  # the last chooses them
                self.offer([*stages, last])
            if not rest:
                continue
            for stop in range(start + 1, layers):
                stage = self.layout(index, start, stop)
                if stage is None:
                    break  # more layers need more KV cache: no longer span fits either
                self.nodes += 1
                if self.nodes > self.node_limit:
                    raise _NodeLimit
                trial = [*stages, stage]
                if self.lower_bound(trial, rest, layers - stop) < self.best_cost - 1e-9:
                    self._extend(trial, rest, stop)


class _NodeLimit(Exception):
    pass


def _split_counts(weights: list[float], total: int) -> list[int]:
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


def split_layouts(
    model: ModelSize, devices: Sequence[DeviceProfile], workload: Workload, weights: list[float]
) -> list[StageLayout]:
    """Contiguous stages in the given device order with layer counts proportional to
    ``weights``; a :class:`PlanError` names the first stage that cannot fit even with
    streaming."""
    devices = list(devices)[: model.num_layers]
    counts = _split_counts(weights[: len(devices)], model.num_layers)
    stages, start = [], 0
    for index, (device, count) in enumerate(zip(devices, counts, strict=True)):
        first, last = index == 0, index == len(devices) - 1
        stage = layout_stage(model, device, start, start + count, first, last, workload)
        if stage is None:
            kv = model.kv_bytes_per_token_per_layer * workload.kv_tokens * count
            fixed = kv + workload.reserve_bytes + model.embed_bytes * first + model.head_bytes * last
            raise PlanError(
                f"this split gives {device.device_id} ({device.memory_bytes / MIB:.0f} MiB) layers "
                f"[{start}, {start + count}){' and the embedding' if first else ''}{' and the head' if last else ''}: "
                f"{fixed / MIB:.1f} MiB before any streamed layer, more than it has; the optimal strategy "
                "places layers by what each device can hold"
            )
        stages.append(stage)
        start += count
    return stages


def unfit_reason(model: ModelSize, device: DeviceProfile, workload: Workload) -> str | None:
    """Why ``device`` cannot run even one layer (streamed), or ``None`` if it can."""
    smallest = min(range(model.num_layers), key=lambda i: model.layer_bytes[i])
    if layout_stage(model, device, smallest, smallest + 1, False, False, workload) is not None:
        return None
    need = (
        model.layer_bytes[smallest]
        + model.kv_bytes_per_token_per_layer * workload.kv_tokens
        + workload.reserve_bytes
    )
    return (
        f"device {device.device_id} has a budget of {device.memory_bytes / MIB:.0f} MiB; one layer needs "
        f"{need / MIB:.1f} MiB ({model.layer_bytes[smallest] / MIB:.1f} MiB of weights, "
        f"{model.kv_bytes_per_token_per_layer * workload.kv_tokens / MIB:.1f} MiB of KV cache for "
        f"{workload.kv_tokens} tokens, {workload.reserve_bytes / MIB:.0f} MiB of working memory): "
        f"{(need - device.memory_bytes) / MIB:.1f} MiB missing"
    )


def _diagnose(model: ModelSize, devices: Sequence[DeviceProfile], workload: Workload) -> str:
    """Why no placement exists, naming what is missing."""
    one_layer = min(model.layer_bytes)
    kv_layer = model.kv_bytes_per_token_per_layer * workload.kv_tokens
    for part, size in (("token embedding", model.embed_bytes), ("output head", model.head_bytes)):
        need = size + one_layer + kv_layer + workload.reserve_bytes
        largest = max(devices, key=lambda d: d.memory_bytes)
        if largest.memory_bytes < need:
            return (
                f"no device can hold the {part} ({size / MIB:.1f} MiB) with one streamed layer, its KV cache "
                f"and working memory ({need / MIB:.1f} MiB): the largest budget is {largest.device_id}'s "
                f"{largest.memory_bytes / MIB:.0f} MiB, {(need - largest.memory_bytes) / MIB:.1f} MiB missing"
            )
    kv_all = model.kv_bytes_per_token_per_layer * workload.kv_tokens * model.num_layers
    need = model.embed_bytes + model.head_bytes + kv_all + workload.reserve_bytes * len(devices) + one_layer
    have = sum(d.memory_bytes for d in devices)
    return (
        f"the {len(devices)} devices cannot hold the model even with layers streamed from disk: the KV cache "
        f"for {workload.kv_tokens} tokens on all {model.num_layers} layers is {kv_all / MIB:.1f} MiB, and with "
        f"the embedding, the head and each device's working memory at least {need / MIB:.0f} MiB are needed "
        f"where the devices offer {have / MIB:.0f} MiB; add a device or lower --context-tokens/--sequences"
    )


def make_plan(
    model: ModelSize,
    devices: Sequence[DeviceProfile],
    epoch: int,
    workload: Workload | None = None,
    strategy: Strategy = "optimal",
    node_limit: int = SEARCH_NODE_LIMIT,
    interleaving: bool = True,
) -> Plan:
    """The plan for ``devices``.

    ``optimal`` searches for the placement with the least predicted time per token
    (or, with ``objective="throughput"``, the least busy bottleneck stage): which
    devices take part, in which order, how many layers each, which of them streamed;
    then, with ``interleaving``, whether cutting each device's layers into several
    segments (a token goes round the ring more than once) is predicted faster still.
    ``memory`` and ``equal`` split the layers in device-id order proportionally to the
    memory budgets or evenly (baselines for benchmarks; streaming where needed).
    Raises :class:`PlanError` saying what is missing when no placement fits.
    """
    workload = workload or Workload()
    if not devices:
        raise PlanError("no devices have registered")
    unfit = {d.device_id: reason for d in devices if (reason := unfit_reason(model, d, workload))}
    usable = [d for d in devices if d.device_id not in unfit]
    if not usable:
        raise PlanError("no device can hold even one layer: " + "; ".join(unfit.values()))
    if workload.trusted_ends and not any(d.trusted for d in usable):
        raise PlanError("the first and last stage must run on trusted devices, and no device that can hold "
                        "a layer is trusted (mark them: trusted = true in a device profile, or --trusted)")
    complete: bool | None = None
    if strategy == "optimal":
        search = _Search(model, usable, workload, node_limit)
        complete = search.run()
        cost = search.best
        if cost is not None and interleaving:
            interleaved = _best_interleaving(model, {d.device_id: d for d in usable}, cost, workload)
            if not workload.trusted_ends or _ends_trusted_in(interleaved, usable):
                cost = interleaved
    else:
        ordered = _ends_trusted(sorted(usable, key=lambda d: d.device_id)) if workload.trusted_ends \
            else sorted(usable, key=lambda d: d.device_id)
        weights = [float(d.memory_bytes) if strategy == "memory" else 1.0 for d in ordered]
        cost = evaluate(split_layouts(model, ordered, workload, weights), workload)
    if cost is None:
        if workload.trusted_ends:
            trusted = sorted(d.device_id for d in usable if d.trusted)
            raise PlanError(f"no plan puts the first and last stage on trusted devices (trusted: "
                            f"{', '.join(trusted) or 'none'}): {_diagnose(model, usable, workload)}")
        raise PlanError(_diagnose(model, usable, workload))
    used = {s.device_id for s in cost.stages}
    left_out = dict(unfit)
    for device in usable:
        if device.device_id not in used:
            left_out[device.device_id] = (
                "not needed: the plan is predicted faster without it" if strategy == "optimal"
                else f"more devices than layers ({model.num_layers})"
            )
    return plan_from_cost(model, cost, epoch, workload, strategy, complete, left_out)


def _ends_trusted_in(cost: PlanCost, devices: Sequence[DeviceProfile]) -> bool:
    trusted = {d.device_id for d in devices if d.trusted}
    return cost.stages[0].device_id in trusted and cost.stages[-1].device_id in trusted


def _ends_trusted(ordered: list[DeviceProfile]) -> list[DeviceProfile]:
    """``ordered`` with a trusted device first and another last (for the baseline strategies);
    as it is when there are not two of them (the plan is then refused, or one stage)."""
    trusted = [d for d in ordered if d.trusted]
    if len(trusted) < 2:
        return trusted[:1] if trusted else ordered
    others = [d for d in ordered if not d.trusted]
    return [trusted[0], *others, *trusted[1:]]


MAX_ROUNDS = 4


def interleave(stages: Sequence[StageLayout], rounds: int) -> list[tuple[str, int, int]]:
    """The same devices, order and layer counts as ``stages``, but each device's layers cut
    into up to ``rounds`` segments, so that a token goes round the ring ``rounds`` times.

    The first device's segments open the rounds (it keeps the embedding first), the last
    device's close them (it keeps the head last); neighbouring segments of one device
    are merged. Returns (device, start, stop) spans in ring order.
    """
    parts: list[list[int]] = []
    for stage in stages:
        count = stage.stop - stage.start
        pieces = min(rounds, count)
        parts.append([count // pieces + (1 if i < count % pieces else 0) for i in range(pieces)])
    spans: list[tuple[str, int, int]] = []
    start = 0
    for round_ in range(rounds):
        for index, stage in enumerate(stages):
            mine = parts[index]
            # The last device fills the last rounds; every other device the first ones.
            piece = round_ - (rounds - len(mine)) if index == len(stages) - 1 else round_
            if not 0 <= piece < len(mine):
                continue
            stop = start + mine[piece]
            if spans and spans[-1][0] == stage.device_id:
                spans[-1] = (stage.device_id, spans[-1][1], stop)
            else:
                spans.append((stage.device_id, start, stop))
            start = stop
    return spans


def interleaved_layouts(
    model: ModelSize, devices: Mapping[str, DeviceProfile], spans: list[tuple[str, int, int]], workload: Workload
) -> list[StageLayout] | None:
    """Lay out every device's segments together (they share its memory); ring order kept."""
    by_device: dict[str, list[tuple[int, int]]] = {}
    for device_id, start, stop in spans:
        by_device.setdefault(device_id, []).append((start, stop))
    layouts: dict[tuple[int, int], StageLayout] = {}
    for device_id, mine in by_device.items():
        laid = layout_device(model, devices[device_id], mine, workload)
        if laid is None:
            return None
        layouts.update({(s.start, s.stop): s for s in laid})
    return [layouts[(start, stop)] for _, start, stop in spans]


def _best_interleaving(
    model: ModelSize, devices: Mapping[str, DeviceProfile], cost: PlanCost, workload: Workload
) -> PlanCost:
    """The searched contiguous plan, or an interleaved version of it where that is
    predicted faster (it can be when devices stream: each segment reads its next
    streamed layers ahead while the other devices work)."""
    if not any(s.streamed for s in cost.stages) or len(cost.stages) < 2:
        return cost
    best = cost
    for rounds in range(2, MAX_ROUNDS + 1):
        stages = interleaved_layouts(model, devices, interleave(cost.stages, rounds), workload)
        if stages is None:
            continue
        trial = evaluate(stages, workload)
        if trial.objective(workload.objective) < best.objective(workload.objective) - 1e-9:
            best = trial
    return best


def plan_from_cost(
    model: ModelSize,
    cost: PlanCost,
    epoch: int,
    workload: Workload,
    strategy: str,
    optimal: bool | None = None,
    left_out: dict[str, str] | None = None,
) -> Plan:
    stages = [
        StagePlan(
            stage=index,
            device_id=s.device_id,
            start=s.start,
            stop=s.stop,
            embed=s.embed,
            head=s.head,
            weight_bytes=s.resident_bytes,
            kv_tokens=int(s.kv_tokens),
            streamed=list(s.streamed),
            slots=s.slots,
            streamed_bytes=s.streamed_bytes,
            compute_ms=round(s.compute_ms, 4),
            link_ms=round(s.link_ms, 4),
            stall_ms=round(cost.stall_ms[index], 4),
        )
        for index, s in enumerate(cost.stages)
    ]
    return Plan(
        epoch=epoch,
        model=model.name,
        num_layers=model.num_layers,
        stages=stages,
        strategy=strategy,
        objective=workload.objective,
        optimal=optimal,
        context_tokens=workload.context_tokens,
        sequences=workload.sequences,
        predicted_ms_per_token=round(cost.ms_per_token, 4),
        overhead_ms=workload.overhead_ms,
        left_out=left_out or {},
    )


def predict_plan_prefill_ms(plan: Plan, model: ModelSize, devices: Mapping[str, DeviceProfile], prompt_tokens: int,
                            workload: Workload) -> float | None:
    """The cost model's time to first token for ``plan`` on ``devices`` as they measure
    now; ``None`` if a stage no longer fits its device."""
    laid = [layout_stage(model, devices[s.device_id], s.start, s.stop, s.embed, s.head, workload) for s in plan.stages]
    if any(stage is None for stage in laid):
        return None
    return predict_prefill_ms(evaluate([s for s in laid if s is not None], workload), model, devices, prompt_tokens)


def format_plan(plan: Plan, explain: bool = False) -> str:
    """The plan as a fixed-width table for a terminal; ``explain`` adds memory and the
    predicted milliseconds per token of each stage."""
    header = ["stage", "device", "layers", "embed", "head", "resident MB", "streamed MB", "KV tokens"]
    if explain:
        header += ["compute ms", "link ms", "stall ms", "stage ms"]
    rows = [tuple(header)]
    for s in plan.stages:
        row = [
            str(s.stage),
            s.device_id,
            f"[{s.start}, {s.stop})" + (f" ({len(s.streamed)} streamed)" if s.streamed else ""),
            "yes" if s.embed else "",
            "yes" if s.head else "",
            f"{s.weight_bytes / 1e6:.1f}",
            f"{s.streamed_bytes / 1e6:.1f}",
            str(s.kv_tokens),
        ]
        if explain:
            row += [_ms(s.compute_ms), _ms(s.link_ms), _ms(s.stall_ms), _ms(s.predicted_ms)]
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"plan epoch {plan.epoch}, model {plan.model}, {plan.num_layers} layers, strategy {plan.strategy}"
             + (f", interleaved: {plan.rounds} rounds per token" if plan.rounds > 1 else "")]
    for n, line in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if explain:
        if plan.predicted_ms_per_token is not None:
            search = {True: ", search complete", False: ", search stopped at its node limit"}.get(
                plan.optimal, ""  # type: ignore[arg-type]
            )
            lines.append(
                f"predicted {plan.predicted_ms_per_token:.1f} ms per token (stages plus {plan.overhead_ms or 0:.1f} ms "
                f"per-token overhead; objective {plan.objective}{search})"
            )
        lines.append(
            f"KV cache: planned for {plan.sequences} sequence(s) of {plan.context_tokens} tokens; "
            f"the pipeline holds {plan.kv_token_capacity} tokens at once"
        )
        for device_id, reason in sorted(plan.left_out.items()):
            lines.append(f"left out {device_id}: {reason}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
