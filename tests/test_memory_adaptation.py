"""Online memory adaptation: a device whose KV cache grows toward its budget streams more
layers from disk, says so, and holds them again when the cache is freed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from lime_mqtt.core.topics import Topics
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.planning.governor import HIGH, LOW, MemoryGovernor
from lime_mqtt.planning.plan import Plan, StagePlan
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import in_process_cluster, prompt_ids, reference_greedy, wait_until

MIB = 1024 * 1024


def test_the_governor_streams_from_the_tail_and_holds_again_with_hysteresis() -> None:
    governor = MemoryGovernor({0: 100, 1: 100, 2: 100, 3: 100}, fixed_bytes=50, budget_bytes=1000,
                              planned=frozenset())
    none: frozenset[int] = frozenset()
    assert governor.usage(none, 0) == 450
    assert governor.decide(none, 400) == none  # 850 <= 900
    more = governor.decide(none, 500)  # 950: stream 3 and 2 (one slot): 50 + 200 + 100 + 500 = 850 > 800
    assert more == {1, 2, 3} and governor.usage(more, 500) <= 0.8 * 1000
    assert governor.decide(more, 500) == more  # holding layer 1 again would make 850 > 800: stays
    assert governor.decide(more, 450) == {2, 3}  # 800: layer 1 held again, layer 2 not (900)
    assert governor.decide(more, 0) == none  # the cache is gone: everything held again
    # Streaming a single layer with a slot of its own frees nothing: not done.
    tight = MemoryGovernor({0: 100}, fixed_bytes=0, budget_bytes=100, planned=frozenset())
    assert tight.decide(none, 50) == none
    # Layers the plan streams stay streamed.
    planned = MemoryGovernor({0: 100, 1: 100}, 0, 1000, planned=frozenset({1}))
    assert planned.decide(frozenset({1}), 0) == {1}
    assert LOW < HIGH


async def test_a_device_near_its_budget_streams_layers_and_the_answer_stays_right(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    """Two devices of 3 layers each; their budgets hold the weights and about 160 tokens of
    KV cache. A 300-token answer: each device streams layers as its cache grows (its
    status and telemetry say so), the answer equals transformers', and once the request
    ends and its cache is freed the devices hold every layer again."""
    checkpoint = Checkpoint(tiny_model)
    kv_token = checkpoint.kv_bytes_per_token_per_layer() * 3
    weights = [sum(checkpoint.layer_bytes(i) for i in range(3)) + checkpoint.embed_bytes,
               sum(checkpoint.layer_bytes(i) for i in range(3, 6)) + checkpoint.head_bytes]
    budgets = [(w + 160 * kv_token) / HIGH / MIB for w in weights]
    prompt, max_tokens = "Valve V-17 is", 300
    stages = [StagePlan(stage=i, device_id=f"dev{i}", start=3 * i, stop=3 * i + 3, embed=i == 0, head=i == 1,
                        weight_bytes=0, kv_tokens=512) for i in range(2)]
    plan = Plan(epoch=1, model=tiny_model.name, num_layers=6, stages=stages, strategy="test")
    reports: list[dict] = []

    async def listen() -> None:
        async with connect(broker.url) as conn:
            await conn.subscribe(Topics(cluster_name).all_device_telemetry, qos=0)
            async for message in conn.messages():
                reports.append(json.loads(message.payload))

    listener = asyncio.create_task(listen())
    try:
        async with in_process_cluster(broker.url, cluster_name, tiny_model, budgets, plan=plan) as cluster:
            final = await cluster.final({"prompt": prompt, "max_tokens": max_tokens, "stream": False})
            # The request's end frees its cache; the devices then hold every layer again.
            await wait_until(lambda: all(d.last_adaptation and d.last_adaptation.action == "hold"
                                         and not d.host.streamed_now() for d in cluster.devices), timeout_s=10)
            changes = [d.adaptations for d in cluster.devices]
    finally:
        listener.cancel()
    assert final["type"] == "final", final
    expected = reference_greedy(tiny_model, prompt_ids(tiny_model, prompt), max_tokens)
    assert len(expected) > 200  # a long answer, or the test shows nothing
    assert final["token_ids"] == expected
    streamed_reports = [r for r in reports if r.get("last_adaptation", {}) and r["last_adaptation"]["action"] ==
                        "stream"]
    assert {r["device_id"] for r in streamed_reports} == {"dev0", "dev1"}, reports[-4:]
    for report in streamed_reports:
        event = report["last_adaptation"]
        assert event["held_mb_after"] < event["held_mb_before"]
        assert event["held_mb_after"] <= event["budget_mb"]
    assert all(count >= 2 for count in changes), changes  # at least one "stream" and one "hold" each
    print("adaptations:", [r["last_adaptation"] for r in streamed_reports])
