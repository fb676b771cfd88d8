"""Where a device runs a forward pass: quick decode steps on the event loop's thread,
everything else on the worker thread, and the same bits either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lime_mqtt.core.plan import StagePlan
from lime_mqtt.core.wire import Step
from lime_mqtt.device.compute import Compute
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.model.shard import Shard, ShardSpec

PROMPT = [5, 6, 7, 8, 9, 10]


async def _generate(compute: Compute, shard: Shard, tokens: int) -> list[torch.Tensor]:
    """Greedy logits of a prompt and ``tokens`` decode steps through ``compute``."""
    stage = StagePlan(stage=0, device_id="d", start=0, stop=6, embed=True, head=True, weight_bytes=0, kv_tokens=64)
    logits = [await compute.step(shard, Step("r", 0, 1, 0, tokens=PROMPT), stage)]
    pos = len(PROMPT)
    for n in range(1, tokens + 1):
        logits.append(await compute.step(shard, Step("r", n, 1, pos, tokens=[int(logits[-1].argmax())]), stage))
        pos += 1
    return logits


@pytest.fixture
def shard(tiny_model: Path) -> Shard:
    return Shard(Checkpoint(tiny_model), ShardSpec(0, 6, True, True))


async def test_quick_decode_steps_run_inline_with_the_same_bits(shard: Shard) -> None:
    inline, worker = Compute("a"), Compute("b", inline=False)
    try:
        fast = await _generate(inline, shard, 8)
        slow = await _generate(worker, shard, 8)
    finally:
        await inline.close()
        await worker.close()
    # The prefill and the first decode step (no time known yet) go to the worker thread;
    # the rest run inline unless one of them took 50 ms (a very loaded machine).
    assert 1 <= inline.inline_steps <= 7
    assert worker.inline_steps == 0
    assert inline.steps_done == worker.steps_done == 9
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


async def test_one_slow_step_sends_the_next_to_the_worker_and_a_new_plan_starts_over(shard: Shard) -> None:
    compute = Compute("a")
    try:
        await _generate(compute, shard, 3)
        compute._note_decode(0, 0.2)  # one step of 200 ms
        assert not compute._quick(shard, 0)
        compute._note_decode(0, 0.001)
        assert not compute._quick(shard, 0)  # fast steps bring it down only gradually
        compute.free_all()
        assert compute.decode_s == {}
    finally:
        await compute.close()


async def test_steps_go_to_the_worker_while_the_loop_must_stay_free(shard: Shard) -> None:
    compute = Compute("a")
    compute.keep_loop_free = lambda: True  # the link monitor waits for an echo
    try:
        await _generate(compute, shard, 5)
    finally:
        await compute.close()
    assert compute.inline_steps == 0


async def test_slow_or_streamed_steps_go_to_the_worker(tiny_model: Path) -> None:
    delayed = Shard(Checkpoint(tiny_model), ShardSpec(0, 6, True, True), layer_delay_ms=0.01)
    streamed = Shard(Checkpoint(tiny_model), ShardSpec(0, 6, True, True, streamed=(2, 3)))
    slow = Compute("slow")
    slow.decode_s[0] = 10.0  # as if its recent decode steps had taken 10 s
    try:
        for shard in (delayed, streamed):
            compute = Compute("c")
            try:
                await _generate(compute, shard, 4)
            finally:
                await compute.close()
            assert compute.inline_steps == 0, shard
        shard = Shard(Checkpoint(tiny_model), ShardSpec(0, 6, True, True))
        stage = StagePlan(stage=0, device_id="d", start=0, stop=6, embed=True, head=True, weight_bytes=0,
                          kv_tokens=64)
        first = await slow.step(shard, Step("r", 0, 1, 0, tokens=PROMPT), stage)
        await slow.step(shard, Step("r", 1, 1, len(PROMPT), tokens=[int(first.argmax())]), stage)
        assert slow.inline_steps == 0
    finally:
        streamed.close()
        await slow.close()


def test_a_settled_heap_leaves_a_full_collection_nothing_loaded_to_scan() -> None:
    # In a process of its own (freezing the test runner's heap would outlive the test):
    # after settle_heap, what torch and a shard loaded is in the permanent generation.
    import subprocess
    import sys

    code = (
        "import gc, torch\n"
        "from lime_mqtt.core.heap import settle_heap\n"
        "loaded = len(gc.get_objects())\n"
        "settle_heap()\n"
        "print(loaded, gc.get_freeze_count(), len(gc.get_objects()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded, frozen, left = map(int, out.stdout.split())
    assert loaded > 10_000 and frozen >= loaded // 2 and left < loaded // 100, out.stdout
