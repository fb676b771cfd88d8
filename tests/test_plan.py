"""Unit: the baseline splits (memory-proportional, equal) and the plan contract."""

from __future__ import annotations

import pytest

from lime_mqtt.core.errors import PlanError
from lime_mqtt.planning.plan import MIB, DeviceProfile, ModelSize, Plan, Workload, format_plan, make_plan

MODEL = ModelSize("m", layer_bytes=(10 * MIB,) * 12, embed_bytes=20 * MIB, head_bytes=20 * MIB,
                  kv_bytes_per_token_per_layer=1024, hidden_bytes_per_token=256)
WORKLOAD = Workload(context_tokens=256, reserve_bytes=4 * MIB)


def devices(*mb: int) -> list[DeviceProfile]:
    return [DeviceProfile(f"d{i}", m * MIB) for i, m in enumerate(mb)]


def test_memory_split_is_contiguous_and_proportional_to_memory() -> None:
    plan = make_plan(MODEL, devices(100, 200, 100), epoch=3, workload=WORKLOAD, strategy="memory")
    assert [(s.device_id, s.start, s.stop) for s in plan.stages] == [("d0", 0, 3), ("d1", 3, 9), ("d2", 9, 12)]
    assert plan.epoch == 3 and plan.stages[0].embed and plan.stages[-1].head
    assert not any(s.embed for s in plan.stages[1:]) and not any(s.head for s in plan.stages[:-1])
    equal = make_plan(MODEL, devices(100, 200, 100), epoch=3, workload=WORKLOAD, strategy="equal")
    assert [(s.start, s.stop) for s in equal.stages] == [(0, 4), (4, 8), (8, 12)]


def test_every_stage_fits_its_budget_and_owns_kv_for_its_layers() -> None:
    budgets = devices(60, 200, 60)
    plan = make_plan(MODEL, budgets, epoch=1, workload=WORKLOAD, strategy="memory")
    memory = {d.device_id: d.memory_bytes for d in budgets}
    for stage in plan.stages:
        kv = stage.kv_tokens * MODEL.kv_bytes_per_token_per_layer * (stage.stop - stage.start)
        slots = stage.slots * 10 * MIB
        assert stage.weight_bytes + slots + kv + WORKLOAD.reserve_bytes <= memory[stage.device_id]
        assert stage.kv_tokens >= 256
        assert stage.weight_bytes + stage.streamed_bytes == (
            10 * MIB * (stage.stop - stage.start) + 20 * MIB * (stage.embed + stage.head))
    assert plan.kv_token_capacity == min(s.kv_tokens for s in plan.stages)


def test_more_devices_than_layers_leaves_some_out() -> None:
    small = ModelSize("s", (MIB,) * 2, MIB, MIB, 64)
    plan = make_plan(small, devices(50, 50, 50), epoch=1, workload=WORKLOAD, strategy="equal")
    assert len(plan.stages) == 2
    assert "d2" in plan.left_out


def test_no_devices_is_an_error() -> None:
    with pytest.raises(PlanError, match="no devices"):
        make_plan(MODEL, [], epoch=1)


def test_a_baseline_split_that_cannot_fit_names_the_device() -> None:
    with pytest.raises(PlanError, match=r"d0 .* layers \[0, 6\) and the embedding"):
        make_plan(MODEL, devices(30, 300), epoch=1, workload=WORKLOAD, strategy="equal")


def test_plan_json_round_trip_and_validation() -> None:
    plan = make_plan(MODEL, devices(100, 100), epoch=5, workload=WORKLOAD, strategy="equal")
    assert Plan.from_json(plan.to_json()) == plan
    broken = plan.model_dump()
    broken["stages"][1]["start"] = 7
    with pytest.raises(ValueError, match="continue"):
        Plan.model_validate(broken)
    streams_elsewhere = plan.model_dump()
    streams_elsewhere["stages"][0]["streamed"] = [11]
    with pytest.raises(ValueError, match="outside"):
        Plan.model_validate(streams_elsewhere)
    assert "d1" in format_plan(plan) and "[6, 12)" in format_plan(plan)
