"""Unit: the memory-proportional planner and the plan contract."""

from __future__ import annotations

import pytest

from lime_mqtt.errors import PlanError
from lime_mqtt.plan import MIB, DeviceOffer, ModelSize, Plan, format_plan, proportional_plan

MODEL = ModelSize("m", layer_bytes=(10 * MIB,) * 12, embed_bytes=20 * MIB, head_bytes=20 * MIB,
                  kv_bytes_per_token_per_layer=1024)


def offers(*mb: int) -> list[DeviceOffer]:
    return [DeviceOffer(f"d{i}", m * MIB) for i, m in enumerate(mb)]


def test_split_is_contiguous_and_proportional_to_memory() -> None:
    plan = proportional_plan(MODEL, offers(100, 200, 100), epoch=3)
    assert [(s.device_id, s.start, s.stop) for s in plan.stages] == [("d0", 0, 3), ("d1", 3, 9), ("d2", 9, 12)]
    assert plan.epoch == 3 and plan.stages[0].embed and plan.stages[-1].head
    assert not any(s.embed for s in plan.stages[1:]) and not any(s.head for s in plan.stages[:-1])


def test_every_stage_fits_its_budget_and_owns_kv_for_its_layers() -> None:
    plan = proportional_plan(MODEL, offers(60, 200, 60), epoch=1, min_kv_tokens=256)
    budgets = {o.device_id: o.memory_bytes for o in offers(60, 200, 60)}
    for stage in plan.stages:
        kv = stage.kv_tokens * MODEL.kv_bytes_per_token_per_layer * (stage.stop - stage.start)
        assert stage.weight_bytes + kv <= budgets[stage.device_id]
        assert stage.kv_tokens >= 256
    assert plan.kv_token_capacity == min(s.kv_tokens for s in plan.stages)


def test_more_devices_than_layers_leaves_some_out() -> None:
    small = ModelSize("s", (MIB,) * 2, MIB, MIB, 64)
    plan = proportional_plan(small, offers(50, 50, 50), epoch=1)
    assert len(plan.stages) == 2


def test_a_cluster_too_small_gets_an_error_with_the_shortfall() -> None:
    with pytest.raises(PlanError, match="MiB missing"):
        proportional_plan(MODEL, offers(40, 40), epoch=1)
    with pytest.raises(PlanError, match="no devices"):
        proportional_plan(MODEL, [], epoch=1)


def test_plan_json_round_trip_and_validation() -> None:
    plan = proportional_plan(MODEL, offers(100, 100), epoch=5)
    assert Plan.from_json(plan.to_json()) == plan
    broken = plan.model_dump()
    broken["stages"][1]["start"] = 7
    with pytest.raises(ValueError, match="continue"):
        Plan.model_validate(broken)
    assert "d1" in format_plan(plan) and "[6, 12)" in format_plan(plan)
