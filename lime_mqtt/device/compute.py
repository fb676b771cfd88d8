"""A device's compute: the KV caches of its sequences and every forward pass.

Loading or re-streaming layers, measuring, prefills and any step that may take long run
on the one thread of :attr:`Compute.executor`, one thing at a time, so the event loop
never blocks on a layer, a streamed read or an emulated delay, and the connection stays
responsive. A *quick* decode step (one token per sequence, on a shard whose layers are
all in memory, whose recent decode steps took under :data:`INLINE_STEP_S`; one slower
step sends the next to the worker at once, and a new plan starts over) runs on the
event loop's own thread instead: handing a step to the worker thread and back costs
about 0.25 ms per stage on SmolLM2 (4 stages: 43.1 ms per token through the worker, 42.1
inline, every one of 7 rounds of ``bench/tpot.py --compare-tree``; docs/benchmarks.md). While the link monitor
waits for an echo (:attr:`Compute.keep_loop_free`), every step goes to the worker, so
that a round trip is not stretched by a step. Both threads are given the device's torch
thread count (OpenMP keeps it per thread). (The event loop also does the small tensor
work around a step: decoding and encoding the wire tensors and choosing the token.)
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from lime_mqtt.core.plan import StagePlan
from lime_mqtt.core.wire import Step
from lime_mqtt.model.shard import Shard

log = logging.getLogger(__name__)

T = TypeVar("T")

# Request ids (on the devices) that have ended, remembered so that a step of theirs still on
# its way (an End can overtake a prefill at an earlier stage) builds no cache. Ids are
# never reused: a replay runs under a new one.
ENDED_REMEMBERED = 4096

# A decode step whose stage's recent decode steps took less than this runs on the event
# loop's thread (the module's docstring says why); anything slower on the worker thread.
INLINE_STEP_S = 0.05


@dataclass
class Sequence:
    """One request's state on this device, for one of its segments: its KV cache and when it
    was last used."""

    cache: Any  # lime_mqtt.model.lean.KVCache
    last_used: float
    start: int  # the first layer of the segment it belongs to
    last_step: int = -(2**31)  # the latest step run: an older one arriving now is a duplicate


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class Compute:
    """KV caches by (request id, stage) and the forward passes that use them."""

    def __init__(self, name: str, threads: int | None = None, inline: bool = True) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lime-{name}",
                                           initializer=_set_threads, initargs=(threads,))
        self.inline = inline  # quick decode steps may run on the event loop's thread
        if inline:
            _set_threads(threads)  # the event loop's thread: built here, on it
        # True while something must not wait behind a step on the event loop (the link
        # monitor's echo): then every step goes to the worker thread.
        self.keep_loop_free: Callable[[], bool] = lambda: False
        self.decode_s: dict[int, float] = {}  # recent time of one decode forward, by stage
        self.inline_steps = 0  # forward passes run on the event loop's thread
        self.sequences: dict[tuple[str, int], Sequence] = {}
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.steps_done = 0
        self.batches = 0  # forward passes: steps_done / batches is the mean batch size
        self.compute_s = 0.0  # time spent in this device's layers, all steps together
        self.peak_kv_tokens = 0
        self.batch_compute_s = 0.0  # recent time of one batched forward (moving average)

    def __repr__(self) -> str:
        return f"Compute(sequences={len(self.sequences)}, steps={self.steps_done}, batches={self.batches})"

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    def _quick(self, shard: Shard, stage: int) -> bool:
        """May this stage's next decode step run on the event loop's thread?"""
        recent = self.decode_s.get(stage)
        return (self.inline and recent is not None and recent < INLINE_STEP_S and shard.resident
                and not self.keep_loop_free())

    async def _forward(self, work: Callable[[], T], shard: Shard, stage: int, decode: bool) -> tuple[T, float]:
        """``work()`` and its time (s): inline when it is a quick decode step, else on the
        worker thread; a decode step's time is remembered for the next choice."""
        inline = decode and self._quick(shard, stage)
        started = time.perf_counter()
        output = work() if inline else await self.run(work)
        elapsed = time.perf_counter() - started
        if decode:
            self._note_decode(stage, elapsed)
        self.inline_steps += inline
        return output, elapsed

    def _note_decode(self, stage: int, elapsed_s: float) -> None:
        """A slower step counts at once (the next one goes to the worker thread); faster
        ones bring the figure down gradually."""
        recent = self.decode_s.get(stage)
        self.decode_s[stage] = elapsed_s if recent is None or elapsed_s > recent else 0.8 * recent + 0.2 * elapsed_s

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking work; wait (at most ``timeout_s``) for a forward pass still running,
        so that the shards it uses are not dropped under it."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.to_thread(self.executor.shutdown, True)
        except TimeoutError:
            log.warning("a forward pass still runs after %.0f s; going without it", timeout_s)

    # ----- KV caches ----------------------------------------------------------------------------

    def kv_tokens(self) -> int:
        """Tokens of KV cache this device holds now, all sequences together."""
        return sum(seq.cache.get_seq_length(seq.start) for seq in self.sequences.values())

    def kv_bytes(self, per_token_per_layer: int, spans: dict[int, int]) -> int:
        """Bytes of KV cache held, with ``spans`` the number of layers of each stage."""
        return sum(seq.cache.get_seq_length(seq.start) * spans.get(stage, 0) * per_token_per_layer
                   for (_, stage), seq in self.sequences.items())

    def last_step(self, request_id: str, stage: int) -> int | None:
        sequence = self.sequences.get((request_id, stage))
        return sequence.last_step if sequence is not None else None

    def holds(self, request_id: str, stage: int) -> bool:
        return (request_id, stage) in self.sequences

    def free(self, request_id: str, stage: int | None = None) -> None:
        """Forget a request's caches (on one stage, or all of them)."""
        for key in [k for k in self.sequences if k[0] == request_id and (stage is None or k[1] == stage)]:
            del self.sequences[key]

    def end(self, request_id: str) -> None:
        """The request is over (its ``End``): free its caches and run none of its steps again."""
        self.free(request_id)
        self._ended[request_id] = None
        self._ended.move_to_end(request_id)
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def ended(self, request_id: str) -> bool:
        return request_id in self._ended

    def free_all(self) -> None:
        """A new plan: no cache is kept, and its stages' step times are learnt anew."""
        self.sequences.clear()
        self.decode_s.clear()

    def expire(self, ttl_s: float) -> list[tuple[str, int]]:
        """Free the caches idle for more than ``ttl_s``; returns which."""
        now = time.monotonic()
        idle = [key for key, seq in self.sequences.items() if now - seq.last_used > ttl_s]
        for key in idle:
            del self.sequences[key]
        return idle

    def live_at(self, stage: int) -> int:
        return sum(1 for _, n in self.sequences if n == stage)

    # ----- forward passes -----------------------------------------------------------------------

    async def step(self, shard: Shard, step: Step, stage: StagePlan) -> Any:
        """One step of one request: a prefill (from position 0, a new cache) or the next
        tokens on its cache. Returns hidden states, logits, or None (a leading chunk)."""
        key = (step.request_id, stage.stage)
        sequence = self.sequences.get(key)
        if sequence is None or step.pos == 0:
            sequence = self.sequences[key] = Sequence(shard.new_cache(), time.monotonic(), stage.start)
        sequence.last_used, sequence.last_step = time.monotonic(), step.step
        work = functools.partial(shard.forward, sequence.cache, step.pos, step.tokens, step.hidden,
                                 logits=step.step >= 0)  # a leading prefill chunk needs no logits
        output, elapsed = await self._forward(work, shard, stage.stage, decode=step.width == 1 and step.pos > 0)
        self._count(1, elapsed)
        return output

    async def batch(self, shard: Shard, steps: list[Step], stage: StagePlan, rows: int) -> list[Any]:
        """Decode steps of several sequences as one forward pass of ``rows`` rows."""
        sequences = [self.sequences[(s.request_id, stage.stage)] for s in steps]
        work = functools.partial(
            shard.forward_batch, [s.cache for s in sequences], [s.pos for s in steps], rows,
            tokens=[s.tokens[0] for s in steps if s.tokens] if stage.embed else None,
            hidden=[s.hidden for s in steps if s.hidden is not None] if not stage.embed else None,
        )
        outputs, elapsed = await self._forward(work, shard, stage.stage, decode=True)
        now = time.monotonic()
        for sequence, step in zip(sequences, steps, strict=True):
            sequence.last_used, sequence.last_step = now, step.step
        self.batch_compute_s = 0.8 * self.batch_compute_s + 0.2 * elapsed if self.batch_compute_s else elapsed
        self._count(len(steps), elapsed)
        return list(outputs)

    def _count(self, steps: int, elapsed_s: float) -> None:
        self.steps_done += steps
        self.batches += 1
        self.compute_s += elapsed_s
        self.peak_kv_tokens = max(self.peak_kv_tokens, self.kv_tokens())
