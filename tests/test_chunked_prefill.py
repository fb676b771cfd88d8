"""Chunked prefill: a long prompt goes through the stages in chunks, losslessly, and the
decode steps of other requests run between its chunks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from lime_mqtt.client import ask
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import in_process_cluster, prompt_ids, reference_greedy, reference_logits, wait_until

LONG_PROMPT = (
    "Shift report for line 2: pump P-3 ran hot after the filter change, valve V-17 was closed for "
    "maintenance, the conveyor stopped twice because of a jammed roller, and the compressor cycled "
    "on and off every few minutes until the pressure switch was replaced by the night crew"
)
CHUNK = 7


@pytest.mark.parametrize("memory", [[10], [2, 10], [10, 10, 10], [10, 10, 10, 10]],
                         ids=["1 stage", "2 uneven", "3 stages", "4 stages"])
async def test_a_chunked_prefill_answers_as_transformers_does(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, memory: list[int]
) -> None:
    ids = prompt_ids(tiny_model, LONG_PROMPT)
    assert len(ids) > 4 * CHUNK and len(ids) % CHUNK  # several chunks, the last one shorter
    async with in_process_cluster(broker.url, cluster_name, tiny_model, memory, prefill_chunk=CHUNK) as cluster:
        final = await cluster.final({"prompt": LONG_PROMPT, "max_tokens": 12, "return_logits": True})
        steps = sum(d.steps_done for d in cluster.devices)
    assert final["type"] == "final", final
    assert final["token_ids"] == reference_greedy(tiny_model, ids, 12)
    # Not the same bits as one whole prefill (chunks attend through a mask to the cache, a
    # different kernel path), but close; a prompt within one chunk stays bit-identical.
    reference = reference_logits(tiny_model, ids, len(final["logits"]))
    gap = max(float((torch.tensor(got) - want).abs().max())
              for got, want in zip(final["logits"], reference, strict=True))
    print(f"largest logit difference from one whole prefill: {gap:.2e}")
    assert gap < 5e-4
    chunks = -(-len(ids) // CHUNK)
    assert steps == len(memory) * (chunks + len(final["token_ids"]) - 1 + (final["finish_reason"] == "stop"))


async def test_decode_steps_of_other_requests_run_between_the_chunks(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    """While a long prompt is prefilled in chunks, a request already answering keeps getting tokens."""
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10], prefill_chunk=4) as cluster:
        arrivals: list[float] = []
        running = {"id": "running", "prompt": "Valve V-17 is", "max_tokens": 200, "stream": True}

        async def answering() -> dict:
            async for message in ask(cluster.broker, cluster.name, running, timeout_s=120):
                if message["type"] == "chunk":
                    arrivals.extend(time.perf_counter() for _ in message["token_ids"])
                else:
                    return message
            raise AssertionError("no final message")

        first = asyncio.create_task(answering())
        await wait_until(lambda: len(arrivals) >= 3, timeout_s=60)  # it is decoding
        sent = time.perf_counter()
        long = await cluster.final({"prompt": LONG_PROMPT, "max_tokens": 1, "stream": False})
        prefilled = time.perf_counter()
        during = sum(1 for t in arrivals if sent < t < prefilled)
        final = await first
    assert long["type"] == "final" and final["type"] == "final"
    chunks = -(-len(prompt_ids(tiny_model, LONG_PROMPT)) // 4)
    assert arrivals[-1] > prefilled  # it was answering the whole time
    # Each chunk is a step of its own: the running request's steps pass between them.
    assert during >= chunks // 2, (during, chunks)
