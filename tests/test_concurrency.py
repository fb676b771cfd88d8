"""Many requests at once: answers independent of the traffic, cancel, deadlines, bounded memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask, ask_final, cancel
from lime_mqtt.core.topics import Topics
from lime_mqtt.planning.plan import Plan, StagePlan
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import AnonPeakSampler, in_process_cluster, prompt_ids, reference_greedy, wait_until

REQUESTS = [
    {"id": "r0", "prompt": "Valve V-17 is", "max_tokens": 40},
    {"id": "r1", "prompt": "The compressor on line 2", "max_tokens": 8},
    {"id": "r2", "prompt": "Shift report:", "max_tokens": 24, "temperature": 0.8, "seed": 11},
    {"id": "r3", "prompt": "Pump P-3 pressure reading", "max_tokens": 16, "temperature": 1.2, "top_k": 20,
     "seed": 5},
    {"id": "r4", "prompt": "Alarm", "max_tokens": 32, "temperature": 0.7, "top_p": 0.8, "seed": 99},
    {"id": "r5", "prompt": "Maintenance window for conveyor belt C is scheduled", "max_tokens": 12},
    {"id": "r6", "prompt": "Temperature sensor T-9 drifted by", "max_tokens": 28, "temperature": 1.0, "seed": 3},
    {"id": "r7", "prompt": "Close", "max_tokens": 20},
]


async def test_eight_concurrent_requests_answer_as_they_do_alone(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10, 10], max_concurrent=8) as cluster:
        alone = {r["id"]: await cluster.final(r) for r in REQUESTS}
        steps_before = sum(d.steps_done for d in cluster.devices)
        together = await asyncio.gather(*[cluster.final(r) for r in REQUESTS])
        overlap = cluster.coordinator.peak_active
    check_alone_and_together(tiny_model, alone, together)
    assert steps_before > 0 and overlap >= 4  # they really were in flight together


def check_alone_and_together(model: Path, alone: dict[str, dict], together: list[dict]) -> None:
    for request, answer in zip(REQUESTS, together, strict=True):
        assert answer["type"] == "final", answer
        assert answer["token_ids"] == alone[request["id"]]["token_ids"], request
        assert answer["text"] == alone[request["id"]]["text"]
        if "temperature" not in request:  # greedy: also what transformers says
            ids = prompt_ids(model, request["prompt"])
            assert answer["token_ids"] == reference_greedy(model, ids, request["max_tokens"])


@pytest.mark.e2e
def test_devices_batch_concurrent_decode_steps_and_answers_stay_the_same(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    """Devices as processes with --max-batch 8 (and 5 ms slower layers, as a small
    device.s, so that steps of other sequences wait while one runs): the 8 requests run
    in batches, and each answer is the one it gets alone (greedy: transformers' too)."""
    devices = [DeviceSpec(f"b{i}", 10, 1, ("--max-batch", "8", "--emulate-layer-delay-ms", "5")) for i in range(3)]
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path / "logs",
                        planner_args=("--strategy", "equal", "--reserve-mb", "0", "--sequences", "8"),
                        coordinator_args=("--max-concurrent", "8")) as procs:
        procs.wait_ready(timeout_s=60)

        async def run() -> tuple[dict[str, dict], list[dict], dict[str, dict]]:
            alone = {r["id"]: await ask_final(broker.url, cluster_name, r) for r in REQUESTS}
            before = await _telemetry(broker.url, cluster_name, [d.device_id for d in devices])
            together = await asyncio.gather(*[ask_final(broker.url, cluster_name, r) for r in REQUESTS])
            after = await _telemetry(broker.url, cluster_name, [d.device_id for d in devices], newer_than=before)
            return alone, list(together), {d: {k: after[d][k] - before[d][k] for k in ("steps_done", "batches")}
                                           for d in after}

        alone, together, counts = asyncio.run(run())
        codes = procs.stop()
    check_alone_and_together(tiny_model, alone, together)
    steps = sum(c["steps_done"] for c in counts.values())
    batches = sum(c["batches"] for c in counts.values())
    assert steps / batches > 1.2, counts  # they really ran in batches (measured 1.36 to 1.6 here)
    assert all(code == 0 for code in codes.values()), codes


async def _telemetry(broker: str, cluster: str, ids: list[str],
                     newer_than: dict[str, dict] | None = None) -> dict[str, dict]:
    """Each device's next telemetry report (after ``newer_than``'s, if given)."""
    found: dict[str, dict] = {}
    async with connect(broker) as conn:
        await conn.subscribe(Topics(cluster).all_device_telemetry, qos=0)
        async with asyncio.timeout(30):
            async for message in conn.messages():
                data = json.loads(message.payload)
                if newer_than and data["ts"] <= newer_than[data["device_id"]]["ts"]:
                    continue
                found[data["device_id"]] = data
                if set(ids) <= set(found):
                    return found
    return found


async def test_a_cancelled_request_frees_its_kv_cache_on_every_device(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    # Each layer 2 ms slower: the 400 tokens take seconds, so the cancel, sent at the third
    # message, surely comes before the end (at full speed all 400 came first, once).
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10],
                                  device_options={"layer_delay_ms": 2.0}) as cluster:
        messages = []
        held_at_cancel = 0
        async for message in ask(broker.url, cluster_name, {"id": "long-one", "prompt": "Report", "max_tokens": 400}):
            messages.append(message)
            if message["type"] == "chunk" and len(messages) == 3:
                held_at_cancel = sum(d.telemetry().kv_tokens for d in cluster.devices)
                await cancel(broker.url, cluster_name, "long-one")
        await wait_until(lambda: all(d.telemetry().kv_tokens == 0 and not d.sequences for d in cluster.devices))
        after = await cluster.final({"prompt": "Report", "max_tokens": 4})
    assert held_at_cancel > 0
    assert messages[-1]["type"] == "error" and messages[-1]["error"]["code"] == "cancelled"
    assert sum(1 for m in messages if m["type"] == "chunk") < 400
    assert after["type"] == "final"  # the cluster serves on


async def test_a_tiny_deadline_gets_a_timeout_error(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        late = await cluster.final({"prompt": "Report", "max_tokens": 200, "deadline_s": 0.05})
        await wait_until(lambda: all(not d.sequences for d in cluster.devices))
        in_time = await cluster.final({"prompt": "Report", "max_tokens": 4, "deadline_s": 60})
    assert late["type"] == "error" and late["error"]["code"] == "deadline_exceeded", late
    assert "0.05 s" in late["error"]["message"]
    assert in_time["type"] == "final"


@pytest.mark.e2e
def test_a_burst_of_200_is_answered_in_order_with_flat_memory(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The plan's KV owners hold 8 requests at once (8 x (prompt + max_tokens) tokens);
    200 requests arrive together. All are answered, they start in the order they were
    sent, and no process's memory keeps growing once the first 8 are answered."""
    topics = Topics(cluster_name)
    prompt, max_tokens = "Status of line 4:", 12
    footprint = len(prompt_ids(tiny_model, prompt)) + max_tokens
    stages = [StagePlan(stage=i, device_id=f"d{i}", start=3 * i, stop=3 * i + 3, embed=i == 0, head=i == 1,
                        weight_bytes=0, kv_tokens=8 * footprint) for i in range(2)]
    plan = Plan(epoch=1, model=tiny_model.name, num_layers=6, stages=stages, strategy="test")
    devices = [DeviceSpec("d0", 10), DeviceSpec("d1", 10)]

    async def publish_plan() -> None:
        async with connect(broker.url) as conn:
            await conn.publish(topics.plan(), plan.to_json(), qos=1, retain=True)

    asyncio.run(publish_plan())
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path / "logs", planner=False,
                        coordinator_args=("--max-concurrent", "32")) as procs:
        procs.wait_ready(timeout_s=60)
        pids = {name: p.pid for name, p in procs.processes.items()}
        sampler = AnonPeakSampler(list(pids.values()))

        async def burst() -> tuple[list[str], dict[str, dict], dict[int, int]]:
            first_seen: list[str] = []
            finals: dict[str, dict] = {}
            after_eight: dict[int, int] = {}
            async with connect(broker.url) as conn:
                await conn.subscribe(topics.answers_inbox("default"))
                for n in range(200):
                    request = {"id": f"q{n:03d}", "prompt": prompt, "max_tokens": max_tokens}
                    await conn.publish(topics.requests("default"), json.dumps(request).encode(), qos=1)
                async with asyncio.timeout(240):
                    async for message in conn.messages():
                        answer = json.loads(message.payload)
                        if answer["type"] == "chunk" and answer["id"] not in first_seen:
                            first_seen.append(answer["id"])
                        if answer["type"] in ("final", "error"):
                            finals[answer["id"]] = answer
                            if len(finals) == 8:
                                after_eight = dict(sampler.peaks)
                            if len(finals) == 200:
                                break
            return first_seen, finals, after_eight

        first_seen, finals, after_eight = asyncio.run(burst())
        peaks = sampler.stop()
        codes = procs.stop()
    assert all(a["type"] == "final" for a in finals.values()), [a for a in finals.values() if a["type"] != "final"]
    assert len(finals) == 200
    assert first_seen == [f"q{n:03d}" for n in range(200)]  # served in the order they were sent
    expected = reference_greedy(tiny_model, prompt_ids(tiny_model, prompt), max_tokens)
    assert all(a["token_ids"] == expected for a in finals.values())
    for name, pid in pids.items():
        growth = peaks[pid] - after_eight[pid]
        print(f"{name}: peak anonymous memory {after_eight[pid] / 2**20:.1f} MiB after 8 answers, "
              f"{peaks[pid] / 2**20:.1f} MiB after 200")
        assert growth < 6 * 2**20, (name, growth / 2**20)
    assert all(code == 0 for code in codes.values()), codes


@pytest.mark.parametrize("bad", [b'{"cancel": 5}', b'{"cancel": ""}', b'{"cancel": "nobody"}'])
async def test_a_cancel_for_nothing_harms_nothing(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, bad: bytes
) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10]) as cluster:
        async with connect(broker.url) as conn:
            await conn.publish(Topics(cluster_name).requests("default"), bad, qos=1)
        answer = await cluster.final({"prompt": "Report", "max_tokens": 3})
    assert answer["type"] == "final"


@pytest.mark.parametrize("streamed", [(), (2, 3)])
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(tiny_model: Path, streamed: tuple[int, ...]) -> None:
    """Shard.forward_batch: each sequence's logits are bit-identical whether it runs alone
    or with others of different lengths, and to the one-sequence path (Shard.forward):
    the engine's kernels sum each output in one order whatever the rows."""
    import copy

    import torch

    from lime_mqtt.model.checkpoint import Checkpoint
    from lime_mqtt.model.shard import Shard, ShardSpec

    shard = Shard(Checkpoint(tiny_model), ShardSpec(0, 6, True, True, streamed=streamed))
    try:
        prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27], [30]]
        caches, tokens, positions = [], [], []
        for prompt in prompts:
            cache = shard.new_cache()
            tokens.append(int(shard.forward(cache, 0, prompt).argmax()))
            caches.append(cache)
            positions.append(len(prompt))
        rows = shard.batch_rows(8)
        alone = [shard.forward_batch([copy.deepcopy(c)], [p], rows, tokens=[t])[0]
                 for c, p, t in zip(caches, positions, tokens, strict=True)]
        together = shard.forward_batch([copy.deepcopy(c) for c in caches], positions, 8, tokens=tokens)
        one_row = [shard.forward(copy.deepcopy(c), p, [t]) for c, p, t in zip(caches, positions, tokens, strict=True)]
    finally:
        shard.close()
    assert rows == 1  # no padding rows are needed
    for a, b, c in zip(alone, together, one_row, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
