"""Unit: the optimal planner against brute force, and what it decides and explains."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from lime_mqtt.core.errors import PlanError
from lime_mqtt.planning.cost import evaluate, layout_stage
from lime_mqtt.planning.plan import MIB, DeviceProfile, ModelSize, Plan, Workload, format_plan, interleave, make_plan


def brute_force(model: ModelSize, devices: list[DeviceProfile], workload: Workload) -> float:
    """Every ordered subset of devices, every contiguous split of the layers: the least
    objective under the same cost model (inf when nothing fits)."""
    best = math.inf
    layers = model.num_layers
    for size in range(1, min(len(devices), layers) + 1):
        for order in itertools.permutations(devices, size):
            for cuts in itertools.combinations(range(1, layers), size - 1):
                bounds = (0, *cuts, layers)
                stages = []
                for i, device in enumerate(order):
                    stage = layout_stage(model, device, bounds[i], bounds[i + 1], i == 0, i == size - 1, workload)
                    if stage is None:
                        break
                    stages.append(stage)
                else:
                    best = min(best, evaluate(stages, workload).objective(workload.objective))
    return best


def random_instance(rng: random.Random) -> tuple[ModelSize, list[DeviceProfile], Workload]:
    layers = rng.randint(1, 12)
    model = ModelSize(
        "r",
        layer_bytes=tuple(rng.randint(5, 15) * MIB for _ in range(layers)),
        embed_bytes=rng.randint(5, 30) * MIB,
        head_bytes=rng.randint(5, 30) * MIB,
        kv_bytes_per_token_per_layer=rng.choice([512, 4096]),
        hidden_bytes_per_token=rng.choice([1024, 8192]),
    )
    devices = [
        DeviceProfile(
            f"d{i}",
            memory_bytes=rng.randint(20, 160) * MIB,
            layer_decode_ms=rng.uniform(0.5, 8.0),
            matvec_gb_s=rng.uniform(1.0, 20.0),
            disk_mb_s=rng.uniform(50.0, 2000.0),
            link_rtt_ms=rng.uniform(0.2, 5.0),
            link_mb_s=rng.uniform(5.0, 500.0),
        )
        for i in range(rng.randint(1, 5))
    ]
    workload = Workload(
        context_tokens=rng.choice([64, 512]),
        sequences=rng.choice([1, 2]),
        reserve_bytes=rng.randint(0, 8) * MIB,
        objective=rng.choice(["latency", "latency", "throughput"]),
    )
    return model, devices, workload


def test_optimal_plan_matches_brute_force_on_random_small_instances() -> None:
    rng = random.Random(20261128)
    checked = streamed = infeasible = 0
    for _ in range(150):
        model, devices, workload = random_instance(rng)
        expected = brute_force(model, devices, workload)
        if math.isinf(expected):
            with pytest.raises(PlanError):
                make_plan(model, devices, 1, workload, interleaving=False)
            infeasible += 1
            continue
        plan = make_plan(model, devices, 1, workload, interleaving=False)  # brute force: contiguous plans
        assert plan.optimal is True
        stages = [
            layout_stage(model, next(d for d in devices if d.device_id == s.device_id), s.start, s.stop,
                         s.embed, s.head, workload)
            for s in plan.stages
        ]
        assert all(stage is not None for stage in stages)
        got = evaluate([s for s in stages if s is not None], workload).objective(workload.objective)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9), (model, devices, workload)
        checked += 1
        streamed += any(s.streamed for s in plan.stages)
    # The instances exercise what they should: plans with and without streaming, and no plan.
    assert checked > 80 and streamed > 10 and infeasible > 3


def same_speed(n: int, mb: int, **rates: float) -> list[DeviceProfile]:
    return [DeviceProfile(f"d{i}", mb * MIB, **rates) for i in range(n)]


SMALL = ModelSize("m", (10 * MIB,) * 12, 20 * MIB, 20 * MIB, 1024, 2048)


def test_a_slow_device_gets_fewer_layers_and_a_useless_one_is_left_out() -> None:
    fast = DeviceProfile("fast", 120 * MIB, layer_decode_ms=1.0)
    slow = DeviceProfile("slow", 120 * MIB, layer_decode_ms=4.0)
    spare = DeviceProfile("spare", 400 * MIB, layer_decode_ms=9.0, link_rtt_ms=3.0)
    plan = make_plan(SMALL, [slow, fast, spare], 1, Workload(context_tokens=64, reserve_bytes=0))
    by_device = {s.device_id: s.stop - s.start for s in plan.stages}
    assert by_device["fast"] > by_device.get("slow", 0)
    assert "spare" in plan.left_out and "faster without it" in plan.left_out["spare"]
    assert not any(s.streamed for s in plan.stages)


def test_streaming_is_used_only_when_memory_is_short() -> None:
    roomy = make_plan(SMALL, same_speed(2, 200), 1, Workload(context_tokens=64, reserve_bytes=0))
    assert not any(s.streamed for s in roomy.stages)
    tight = make_plan(SMALL, same_speed(2, 60), 1, Workload(context_tokens=64, reserve_bytes=0))
    assert sum(len(s.streamed) for s in tight.stages) > 0
    for stage in tight.stages:  # streamed layers are the tail of the stage's span
        assert stage.streamed == list(range(stage.stop - len(stage.streamed), stage.stop))
        assert stage.slots == min(2, len(stage.streamed))


def test_a_device_that_cannot_hold_one_layer_is_named() -> None:
    workload = Workload(context_tokens=64, reserve_bytes=4 * MIB)
    with pytest.raises(PlanError, match=r"no device can hold even one layer: device tiny has a budget of 8 MiB; "
                                        r"one layer needs 14\.1 MiB .* 6\.1 MiB missing"):
        make_plan(SMALL, [DeviceProfile("tiny", 8 * MIB)], 1, workload)
    plan = make_plan(SMALL, [DeviceProfile("tiny", 8 * MIB), DeviceProfile("big", 400 * MIB)], 1, workload)
    assert [s.device_id for s in plan.stages] == ["big"]
    assert "one layer needs" in plan.left_out["tiny"]


def test_a_cluster_that_cannot_hold_the_model_even_streaming_says_what_is_missing() -> None:
    workload = Workload(context_tokens=64, reserve_bytes=0)
    # Every device holds a layer, but none holds the 20 MiB embedding next to one.
    with pytest.raises(PlanError, match=r"no device can hold the token embedding \(20\.0 MiB\).*25 MiB, "
                                        r"5\.1 MiB missing"):
        make_plan(SMALL, same_speed(3, 25), 1, workload)
    # The KV cache for a long context does not fit anywhere.
    with pytest.raises(PlanError, match="KV cache for 200000 tokens on all 12 layers"):
        make_plan(SMALL, same_speed(3, 400), 1, Workload(context_tokens=200_000, reserve_bytes=0))


def test_explain_shows_memory_and_predicted_time_per_stage() -> None:
    plan = make_plan(SMALL, same_speed(2, 60, layer_decode_ms=2.0), 4, Workload(context_tokens=64, reserve_bytes=0))
    text = format_plan(plan, explain=True)
    for column in ("resident MB", "streamed MB", "KV tokens", "compute ms", "link ms", "stall ms", "stage ms"):
        assert column in text
    assert f"predicted {plan.predicted_ms_per_token:.1f} ms per token" in text
    total = sum(s.predicted_ms or 0 for s in plan.stages) + (plan.overhead_ms or 0)
    assert total == pytest.approx(plan.predicted_ms_per_token, abs=1e-3)


def test_throughput_objective_balances_the_busiest_stage() -> None:
    devices = same_speed(3, 400, layer_decode_ms=2.0)
    latency = make_plan(SMALL, devices, 1, Workload(context_tokens=64, reserve_bytes=0))
    throughput = make_plan(SMALL, devices, 1, Workload(context_tokens=64, reserve_bytes=0, objective="throughput"))
    assert len(latency.stages) == 1  # one device: no hops
    assert len(throughput.stages) == 3  # the work spread over all three



def test_interleaving_cuts_each_device_into_segments_in_ring_order() -> None:
    workload = Workload(context_tokens=64, reserve_bytes=0)
    model = ModelSize("m", (10 * MIB,) * 30, 20 * MIB, 20 * MIB, 1024, 2048)
    devices = {d.device_id: d for d in same_speed(4, 400)}
    stages = [layout_stage(model, devices[f"d{i}"], start, stop, start == 0, stop == 30, workload)
              for i, (start, stop) in enumerate([(0, 1), (1, 11), (11, 29), (29, 30)])]
    spans = interleave([s for s in stages if s is not None], 2)
    assert spans == [("d0", 0, 1), ("d1", 1, 6), ("d2", 6, 15), ("d1", 15, 20), ("d2", 20, 29), ("d3", 29, 30)]


def test_interleaving_is_chosen_when_it_hides_more_of_the_streaming() -> None:
    """SmolLM2-like sizes on four small devices with a slow disk: the two middle devices
    stream, and with two rounds each reads the first streamed layers of its second
    segment while the others work."""
    model = ModelSize("s", (14 * MIB,) * 30, 108 * MIB, 108 * MIB, 1536, 2304)
    devices = same_speed(4, 160, layer_decode_ms=2.5, disk_mb_s=700.0)
    workload = Workload(context_tokens=256)
    contiguous = make_plan(model, devices, 1, workload, interleaving=False)
    plan = make_plan(model, devices, 1, workload)
    assert contiguous.rounds == 1 and plan.rounds >= 2
    assert plan.predicted_ms_per_token is not None and contiguous.predicted_ms_per_token is not None
    assert plan.predicted_ms_per_token < contiguous.predicted_ms_per_token
    assert "interleaved" in format_plan(plan, explain=True)
    for device in {s.device_id for s in plan.stages}:  # every device's memory still fits
        mine = plan.stages_of(device)
        used = sum(s.weight_bytes for s in mine) + mine[0].slots * 14 * MIB
        kv = sum(s.stop - s.start for s in mine) * 1536 * mine[0].kv_tokens
        assert used + kv + workload.reserve_bytes <= 160 * MIB


def test_a_plan_with_neighbouring_segments_on_one_device_is_rejected() -> None:
    plan = make_plan(SMALL, same_speed(2, 200), 1, Workload(context_tokens=64, reserve_bytes=0), strategy="equal")
    data = plan.model_dump()
    data["stages"][1]["device_id"] = data["stages"][0]["device_id"]
    with pytest.raises(ValueError, match="neighbours on one device"):
        Plan.model_validate(data)


def test_prefill_prediction_grows_with_the_prompt_and_counts_the_head_once() -> None:
    from lime_mqtt.planning.cost import head_ms, predict_prefill_ms

    devices = same_speed(2, 200, layer_decode_ms=2.0, layer_prefill_ms_per_token=0.25)
    workload = Workload(context_tokens=64, reserve_bytes=0)
    plan_cost = evaluate([s for s in (layout_stage(SMALL, devices[0], 0, 6, True, False, workload),
                                      layout_stage(SMALL, devices[1], 6, 12, False, True, workload)) if s], workload)
    by_id = {d.device_id: d for d in devices}
    short, long = (predict_prefill_ms(plan_cost, SMALL, by_id, n) for n in (10, 110))
    # 12 layers x 0.25 ms per token x 100 more tokens, plus the larger messages
    assert 300 <= long - short < 310
    assert short > 12 * 0.25 * 10 + head_ms(SMALL, devices[1])


def test_prefill_prediction_counts_each_crossing_of_the_prompts_activations() -> None:
    """The prompt's hidden states cross a link only between stages: out of the first
    device and into the second (through the broker), not into the first (token ids) or
    out of the last (one token)."""
    from lime_mqtt.planning.cost import predict_prefill_ms

    workload = Workload(context_tokens=64, reserve_bytes=0)

    def predicted(link_mb_s: float, tokens: int) -> float:
        devices = same_speed(2, 200, layer_decode_ms=2.0, link_mb_s=link_mb_s, link_rtt_ms=1.0)
        cost = evaluate([s for s in (layout_stage(SMALL, devices[0], 0, 6, True, False, workload),
                                     layout_stage(SMALL, devices[1], 6, 12, False, True, workload)) if s], workload)
        return predict_prefill_ms(cost, SMALL, {d.device_id: d for d in devices}, tokens)

    tokens = 100
    # Half the link speed: the transfer time of the activations doubles, twice (two crossings).
    extra = predicted(0.5, tokens) - predicted(1.0, tokens)
    one_crossing_ms = tokens * SMALL.hidden_bytes_per_token / (1.0 * 1e3)
    assert extra == pytest.approx(2 * one_crossing_ms)


@pytest.mark.parametrize(("link_mb_s", "expected"), [
    ([1000.0, 1000.0], 256),  # a fast LAN: the configured chunk
    ([12.0, 1000.0], 256),  # 100 Mbit/s: 260 tokens fit in 100 ms, still the chunk
    ([2.3, 1000.0], 32),  # 20 Mbit/s: 49 tokens fit; a power of two below
    ([0.1, 1000.0], 16),  # hopeless: never below the smallest chunk
    ([], 256),  # no device measured its link
])
def test_a_prefill_chunk_is_sized_for_the_slowest_link(link_mb_s: list[float], expected: int) -> None:
    from lime_mqtt.planning.cost import link_chunk_tokens

    assert link_chunk_tokens(256, 2304, link_mb_s, 100.0) == expected  # SmolLM2's float32 activations


def test_a_prefill_chunk_is_not_cut_when_asked_not_to() -> None:
    from lime_mqtt.planning.cost import link_chunk_tokens

    assert link_chunk_tokens(0, 2304, [0.5], 100.0) == 0  # --prefill-chunk 0: never cut
    assert link_chunk_tokens(256, 2304, [0.5], 0.0) == 256  # --prefill-link-ms 0: links do not matter
    assert link_chunk_tokens(8, 2304, [0.5], 100.0) == 8  # never above the configured chunk
    assert link_chunk_tokens(8, 2304, [0.1], 100.0) == 8  # not even to reach the smallest link chunk
