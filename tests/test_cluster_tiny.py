"""Integration: the whole request path on a real Mosquitto, tiny random model, in-process roles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from lime_mqtt.core.topics import Topics
from lime_mqtt.core.wire import Sampling, StageError, Step, Token, decode_envelope
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.planning.plan import Plan, StagePlan
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import (
    TEST_COORDINATOR,
    in_process_cluster,
    prompt_ids,
    reference_greedy,
    reference_logits,
    stage_topic,
    wait_until,
)

PROMPT = "Close valve V-17 before starting the maintenance"

# memory budgets (MB) -> the layer split the planner must produce for the 6-layer tiny model
SPLITS = {
    "1 stage": ([10], [(0, 6)]),
    "2 even": ([10, 10], [(0, 3), (3, 6)]),
    "2 uneven": ([2, 10], [(0, 1), (1, 6)]),
    "3 stages": ([10, 10, 10], [(0, 2), (2, 4), (4, 6)]),
    "3 uneven": ([30, 10, 20], [(0, 3), (3, 4), (4, 6)]),
    "4 stages": ([10, 10, 10, 10], None),
    "4 uneven": ([10, 30, 10, 10], [(0, 1), (1, 4), (4, 5), (5, 6)]),
}


@pytest.mark.parametrize("name", list(SPLITS))
async def test_greedy_matches_transformers_for_every_split(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, name: str
) -> None:
    memory, expected_split = SPLITS[name]
    async with in_process_cluster(broker.url, cluster_name, tiny_model, memory) as cluster:
        split = [(s.start, s.stop) for s in cluster.plan.stages]
        assert len(split) == len(memory)
        if expected_split is not None:
            assert split == expected_split
        messages = await cluster.ask({"prompt": PROMPT, "max_tokens": 24})
    final = messages[-1]
    assert final["type"] == "final", final
    expected = reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 24)
    assert final["token_ids"] == expected
    # The stream is the answer, in order, with nothing missing or repeated.
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert [t for c in chunks for t in c["token_ids"]] == final["token_ids"]
    assert final["usage"]["prompt_tokens"] == len(prompt_ids(tiny_model, PROMPT))
    assert final["usage"]["completion_tokens"] == len(expected)
    assert final["finish_reason"] in ("length", "stop")


async def test_last_stage_logits_match_single_process(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 20, 10]) as cluster:
        final = await cluster.final({"prompt": PROMPT, "max_tokens": 5, "return_logits": True, "stream": False})
    ids = prompt_ids(tiny_model, PROMPT)
    expected = reference_logits(tiny_model, ids, len(final["logits"]))
    assert len(final["logits"]) >= 1
    # Within 1e-4: the engine's kernels sum each product in another order than torch's.
    for got, want in zip(final["logits"], expected, strict=True):
        assert torch.allclose(torch.tensor(got), want, atol=1e-4, rtol=0)


async def test_chat_request_uses_the_chat_template(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Pump status?"}]
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        final = await cluster.final({"messages": chat, "max_tokens": 16})
    ids = prompt_ids(tiny_model, messages=chat)
    assert final["usage"]["prompt_tokens"] == len(ids)
    assert final["token_ids"] == reference_greedy(tiny_model, ids, 16)


async def test_seeded_sampling_is_reproducible(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    request = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 7}
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        first = await cluster.final(request)
        again = await cluster.final(request)
        other = await cluster.final({**request, "seed": 8})
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]


async def test_stop_string_ends_the_answer(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10]) as cluster:
        full = await cluster.final({"prompt": PROMPT, "max_tokens": 24})
        assert len(full["text"]) > 6
        stop = full["text"][3:6]
        cut = await cluster.ask({"prompt": PROMPT, "max_tokens": 24, "stop": [stop]})
    final = cut[-1]
    assert final["finish_reason"] == "stop"
    assert final["text"] == full["text"][: full["text"].find(stop)]
    assert "".join(m["text"] for m in cut if m["type"] == "chunk") == final["text"]


async def test_kv_cache_is_freed_when_a_request_ends(broker: LocalBroker, cluster_name: str, tiny_model: Path) -> None:
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10, 10]) as cluster:
        final = await cluster.final({"prompt": PROMPT, "max_tokens": 6})
        assert final["type"] == "final"
        assert sum(d.steps_done for d in cluster.devices) > 0
        await wait_until(lambda: all(not d.sequences for d in cluster.devices))


async def test_kv_cache_of_an_abandoned_request_expires(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    """A step whose request never ends (its coordinator died) is freed after the TTL."""
    short_ttl = {"kv_ttl_s": 0.5}
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10], device_options=short_ttl) as cluster:
        device = cluster.devices[0]
        step = Step("orphan", 0, cluster.plan.epoch, 0, tokens=[5, 6, 7], sampling=Sampling(),
                    reply="nowhere")
        async with connect(broker.url) as conn:
            await conn.publish(stage_topic(Topics(cluster_name), cluster.plan, 0), step.encode(), qos=1)
        await wait_until(lambda: ("orphan", 0) in device.sequences)
        await wait_until(lambda: ("orphan", 0) not in device.sequences, timeout_s=5)


async def test_a_step_a_device_cannot_run_comes_back_as_an_error(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    """A token id past the vocabulary: the device answers with a stage error and keeps serving."""
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        topics = Topics(cluster_name)
        reply = TEST_COORDINATOR
        bad = Step("bad", 0, cluster.plan.epoch, 0, tokens=[10**6], sampling=Sampling(), reply=reply)
        async with connect(broker.url) as conn:
            await conn.subscribe(topics.results_inbox(reply))
            await conn.publish(stage_topic(topics, cluster.plan, 0), bad.encode(), qos=1)
            async with asyncio.timeout(10):
                answer = decode_envelope((await anext(conn.messages())).payload)
        assert isinstance(answer, StageError) and answer.kind == "error"  # a kind of its own, not a token
        assert answer.request_id == "bad" and answer.device_id == "dev0" and answer.message
        final = await cluster.final({"prompt": PROMPT, "max_tokens": 4})
    assert final["type"] == "final"


async def test_late_copies_and_old_epochs_are_dropped_and_the_retried_step_is_rerun(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    """A device runs each step once: a late copy of an older step (a QoS 1 redelivery)
    would cut the sequence's cache back, so it is dropped, as is a step of another epoch;
    the latest step sent again (a retry) runs again and gives the same token."""
    ids = prompt_ids(tiny_model, PROMPT)
    expected = reference_greedy(tiny_model, ids, 3)
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10]) as cluster:
        topics = Topics(cluster_name)
        reply = TEST_COORDINATOR
        epoch = cluster.plan.epoch

        def step(number: int, pos: int, tokens: list[int], epoch: int = epoch) -> bytes:
            return Step("dup", number, epoch, pos, tokens=tokens, sampling=Sampling(), reply=reply).encode()

        async with connect(broker.url) as conn:
            await conn.subscribe(topics.results_inbox(reply))
            messages = conn.messages()

            async def token_of(payload: bytes) -> int | None:
                await conn.publish(stage_topic(topics, cluster.plan, 0), payload, qos=1)
                async with asyncio.timeout(10):
                    answer = decode_envelope((await anext(messages)).payload)
                    assert isinstance(answer, Token)
                    return answer.token

            first = await token_of(step(0, 0, ids))
            second = await token_of(step(1, len(ids), [first]))
            assert await token_of(step(1, len(ids), [first])) == second  # a retry: run again, same token
            device = cluster.devices[0]
            dropped = device.duplicates
            await conn.publish(stage_topic(topics, cluster.plan, 0), step(0, 0, ids), qos=1)  # late copy of the prefill
            await conn.publish(stage_topic(topics, cluster.plan, 0), step(2, len(ids) + 1, [second],
                               epoch=epoch + 7), qos=1)
            third = await token_of(step(2, len(ids) + 1, [second]))
    assert [first, second, third] == expected
    assert device.duplicates == dropped + 1


# stage layer ranges, the layers each stage streams from disk, its slots, and (for an
# interleaved plan, where a device has several segments) the device of each stage
STREAMED_SPLITS = {
    "1 stage, middle layers streamed, 2 slots": [((0, 6), [2, 3, 4], 2)],
    "1 stage, every layer streamed, 1 slot": [((0, 6), [0, 1, 2, 3, 4, 5], 1)],
    "2 stages, both stream their tails": [((0, 3), [1, 2], 2), ((3, 6), [5], 1)],
    "3 stages, only the middle streams": [((0, 2), [], 0), ((2, 5), [2, 3, 4], 2), ((5, 6), [], 0)],
    "interleaved, 2 devices x 2 rounds, streaming in both segments": [
        ((0, 2), [1], 2, 0), ((2, 3), [], 0, 1), ((3, 5), [4], 2, 0), ((5, 6), [5], 1, 1)],
    "interleaved, 3 devices, the middle one twice": [
        ((0, 1), [], 0, 0), ((1, 3), [2], 2, 1), ((3, 4), [], 0, 2), ((4, 6), [4, 5], 2, 1)],
}


@pytest.mark.parametrize("name", list(STREAMED_SPLITS))
async def test_streamed_layers_keep_greedy_output_identical(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, name: str
) -> None:
    """Layers read from disk for every token (through the device's read-ahead thread,
    shared by all segments of a device in an interleaved plan) give the same tokens as
    transformers, for each way the planner can stream and interleave."""
    layout = [(*entry, i) if len(entry) == 3 else entry for i, entry in enumerate(STREAMED_SPLITS[name])]
    stages = [
        StagePlan(stage=i, device_id=f"dev{device}", start=start, stop=stop, embed=i == 0, head=i == len(layout) - 1,
                  weight_bytes=0, kv_tokens=4096, streamed=streamed, slots=slots)
        for i, ((start, stop), streamed, slots, device) in enumerate(layout)
    ]
    plan = Plan(epoch=1, model=tiny_model.name, num_layers=6, stages=stages, strategy="test")
    devices = sorted({s.device_id for s in stages})
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10] * len(devices), plan=plan) as cluster:
        final = await cluster.final({"prompt": PROMPT, "max_tokens": 16})
        read = {d.device_id: (d.stream.bytes_read if d.stream else 0, d.steps_done) for d in cluster.devices}
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 16)
    # Every streaming device read its streamed layers from disk once per token (plus what
    # it read ahead), and resident layers never.
    checkpoint = Checkpoint(tiny_model)
    for device_id, (device_read, steps) in read.items():
        mine = plan.stages_of(device_id)
        tokens = steps // len(mine)
        per_token = sum(checkpoint.layer_bytes(i) for s in mine for i in s.streamed)
        assert tokens >= final["usage"]["completion_tokens"]
        assert tokens * per_token <= device_read <= (tokens + 2) * per_token


async def test_requests_beyond_the_kv_capacity_wait_in_a_queue(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    """The plan lets each device hold 80 tokens of KV cache. Three requests that may need
    up to 48 tokens each arrive together: one runs, the others wait in line (told their
    place), all finish with the right answer, and no device ever held more than 80."""
    stages = [
        StagePlan(stage=i, device_id=f"dev{i}", start=start, stop=stop, embed=i == 0, head=i == 1,
                  weight_bytes=0, kv_tokens=80)
        for i, (start, stop) in enumerate([(0, 3), (3, 6)])
    ]
    plan = Plan(epoch=1, model=tiny_model.name, num_layers=6, stages=stages, strategy="test")
    prompts = ["Valve V-1 is", "Pump P-22 reads", "Line 3 pressure"]
    lengths = [len(prompt_ids(tiny_model, p)) for p in prompts]
    max_tokens = 48 - max(lengths)
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10], plan=plan) as cluster:
        answers = await asyncio.gather(*[cluster.ask({"prompt": p, "max_tokens": max_tokens}) for p in prompts])
        too_big = await cluster.final({"prompt": prompts[0], "max_tokens": 100})
        peaks = [d.peak_kv_tokens for d in cluster.devices]
        admission = cluster.coordinator.admission
    places = [[m["position"] for m in messages if m["type"] == "queued"] for messages in answers]
    assert sorted(p[:1] for p in places) == [[], [1], [2]]  # one ran at once, two waited in line
    for prompt, messages in zip(prompts, answers, strict=True):
        assert messages[-1]["type"] == "final"
        assert messages[-1]["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, prompt), max_tokens)
    assert admission.peak <= 80 and admission.used == 0
    assert max(peaks) <= 80
    assert too_big["type"] == "error" and too_big["error"]["code"] == "kv_capacity"
