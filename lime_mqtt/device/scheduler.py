"""A device's scheduling: one ordered work queue, the steps it accepts, and batches.

Plan changes, activation steps and end-of-request messages all go through one queue and
are handled one after another, so a request's steps always meet the shard they were
planned for. A step is accepted only for a stage this device runs now, under the
current plan's epoch, from the sender the plan puts before that stage (the coordinator
for stage 0, else the device of the stage before: the topic says who sent it), and not
as a late copy of a step already run (duplicates). With
``max_batch`` > 1, the decode steps waiting right behind a decode step at the same stage
are gathered into one batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from lime_mqtt.core.errors import WireError
from lime_mqtt.core.plan import Plan, StagePlan
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.core.wire import Step, decode_envelope
from lime_mqtt.device.compute import Compute
from lime_mqtt.transport.base import Message

log = logging.getLogger(__name__)

WORK_QUEUE_SIZE = 256
# The largest step a device takes by default (``--max-activation-mb``): a 256-token
# prefill chunk of a model 16384 wide in float32 is 16 MiB.
MAX_ACTIVATION_BYTES = 64 * 1024 * 1024

Work = Message | Plan


@dataclass(frozen=True)
class Accepted:
    step: Step
    stage: StagePlan
    topic: str


class Scheduler:
    def __init__(self, name: str, compute: Compute, max_batch: int = 1, topics: Topics | None = None,
                 max_envelope_bytes: int = MAX_ACTIVATION_BYTES) -> None:
        self.name = name
        self.max_envelope_bytes = max_envelope_bytes  # larger steps are dropped unread
        self.me = Identity("device", name)
        self.topics = topics or Topics()
        self.compute = compute
        self.max_batch = max_batch  # >1: decode steps waiting at a stage run together
        self.queue: asyncio.Queue[Work] = asyncio.Queue(WORK_QUEUE_SIZE)
        self._stash: collections.deque[Work] = collections.deque()  # taken from the queue, not batched
        self._arrived = asyncio.Event()  # a message reached the work queue
        self.plan: Plan | None = None
        self.stages: dict[int, StagePlan] = {}  # the stages this device runs now, by number
        self.hidden_size: int | None = None  # what hidden states must measure, once the model is known
        self.duplicates = 0  # steps dropped as late copies of steps already run
        self.impostors = 0  # steps dropped because the plan does not put their sender before the stage

    def __repr__(self) -> str:
        return (f"Scheduler(queued={self.queue.qsize()}, stashed={len(self._stash)}, "
                f"stages={sorted(self.stages)}, duplicates={self.duplicates}, impostors={self.impostors})")

    async def put(self, item: Work) -> None:
        await self.queue.put(item)
        if not isinstance(item, Plan):
            self._arrived.set()

    async def next(self) -> Work:
        return self._stash.popleft() if self._stash else await self.queue.get()

    def follow(self, plan: Plan, stages: list[StagePlan]) -> None:
        """From now on accept steps of ``plan`` for these stages."""
        self.plan = plan
        self.stages = {s.stage: s for s in stages}

    def _stage_of(self, message: Message) -> tuple[StagePlan, Identity] | None:
        """The stage a step on this topic is for, and its sender, if the plan puts that sender
        before the stage (for stage 0: a coordinator, or the last device going on with a
        chained request); None (logged) otherwise."""
        route = self.topics.parse(message.topic)
        if route is None or route.kind != "stage" or route.to != self.me or route.arg is None \
                or not route.arg.isdigit() or self.plan is None:
            return None
        stage = self.stages.get(int(route.arg))
        if stage is None:
            return None
        if stage.stage == 0:
            expected = route.sender.role == "coordinator" or self._chained_from(route.sender)
        else:
            expected = route.sender == Identity("device", self.plan.stages[stage.stage - 1].device_id)
        if not expected:
            self.impostors += 1
            before = "a coordinator" if stage.stage == 0 else f"device {self.plan.stages[stage.stage - 1].device_id}"
            log.warning("%s: ignoring a step for stage %d from %s: plan %d puts %s before it", self.name,
                        stage.stage, route.sender, self.plan.epoch, before)
            return None
        return stage, route.sender

    def _follows_chain(self, step: Step, last: int | None) -> bool:
        """A step for stage 0 from the last device: it may only go on with a chained request
        whose cache is here, one decode step after the one this stage ran last; never start,
        skip or rewind one. An older one is a late copy (a duplicate)."""
        if last is not None and step.step <= last:
            self.duplicates += 1
            return False
        if last is None and step.chain is not None and step.pos > 0 and step.width == 1:
            log.debug("%s: dropping a chained step of %s, whose cache is gone", self.name, step.request_id)
            return False  # freed (an error, its time to live): the coordinator sends it again or replays
        if step.chain is None or step.tokens is None or step.width != 1 or last is None or step.step != last + 1:
            self.impostors += 1
            log.warning("%s: ignoring a step for stage 0 from the last device that does not go on with a "
                        "chained request here (%s step %d)", self.name, step.request_id, step.step)
            return False
        return True

    def _chained_from(self, sender: Identity) -> bool:
        """Whether ``sender`` is the plan's last device, which starts the next decode step of a
        chained request itself (wire.Chain)."""
        assert self.plan is not None
        return sender == Identity("device", self.plan.stages[-1].device_id)

    def accept(self, message: Message, ready: set[int]) -> Accepted | None:
        """A step this device should run now, with its stage; ``None`` (logged) otherwise.
        ``ready``: the stages whose shards are loaded."""
        found = self._stage_of(message)  # from the topic alone: an impostor's bytes are not even decoded
        if self.plan is None or found is None or found[0].stage not in ready:
            return None
        stage, sender = found
        chained = stage.stage == 0 and sender.role == "device"  # the last device going on with a request
        try:
            envelope = decode_envelope(message.payload, hidden_size=self.hidden_size,
                                       max_bytes=self.max_envelope_bytes)
        except WireError as exc:
            log.warning("%s: dropping a malformed message on %s: %s", self.name, message.topic, exc)
            return None
        if not isinstance(envelope, Step) or envelope.epoch != self.plan.epoch:
            log.debug("%s: dropping a %s of %s of epoch %d (current %d)", self.name, envelope.kind,
                      envelope.request_id, envelope.epoch, self.plan.epoch)
            return None
        if self.compute.ended(envelope.request_id):
            # Its End came first (it overtook this step at an earlier stage): no cache for it.
            log.debug("%s: dropping a step of %s, which has ended", self.name, envelope.request_id)
            return None
        last = self.compute.last_step(envelope.request_id, stage.stage)
        if chained and not self._follows_chain(envelope, last):
            return None
        if last is not None and envelope.step < last:
            # A late copy (a redelivery, or a retry overtaken by later steps): running it
            # would cut the cache back. The latest step itself may run again (a retry).
            log.debug("%s: dropping a duplicate of %s step %d", self.name, envelope.request_id, envelope.step)
            self.duplicates += 1
            return None
        return Accepted(envelope, stage, message.topic)

    def batchable(self, accepted: Accepted) -> bool:
        """A decode step (one new token) of a sequence whose cache is here."""
        step = accepted.step
        return step.width == 1 and step.pos > 0 and self.compute.holds(step.request_id, accepted.stage.stage)

    async def gather(self, first: Accepted, ready: set[int]) -> list[Step]:
        """``first`` and the decode steps of other sequences right behind it at its stage.

        Steps already waiting are taken at once; if fewer than this stage's live
        sequences are here, it waits a little for the rest (at most a quarter of a
        batch's recent compute time, and 20 ms), since they are usually a few messages
        behind. It stops at the first waiting item that is not such a step (order kept).
        """
        batch = [first.step]
        want = min(self.max_batch, self.compute.live_at(first.stage.stage))
        if want <= 1:
            return batch  # the only sequence at this stage: nothing to wait for
        deadline = time.monotonic() + min(0.02, self.compute.batch_compute_s / 4)
        await self._let_arrived_messages_in()
        while len(batch) < want:
            item = self._next_waiting()
            if item is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                except TimeoutError:
                    break
                await self._let_arrived_messages_in()
                continue
            if isinstance(item, Plan) or item.topic != first.topic:
                self._stash.appendleft(item)
                break
            more = self.accept(item, ready)
            if more is None:
                continue
            if not self.batchable(more) or any(s.request_id == more.step.request_id for s in batch):
                self._stash.appendleft(item)
                break
            batch.append(more.step)
        return batch

    async def _let_arrived_messages_in(self) -> None:
        """Give the event loop a few turns, so that messages already in the socket reach the
        work queue (the MQTT client reads one packet per turn, and the receiver needs a turn
        to pass each on); stop as soon as a pair of turns brings nothing new."""
        for _ in range(self.max_batch):
            size = self.queue.qsize()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if self.queue.qsize() == size:
                return

    def _next_waiting(self) -> Work | None:
        if self._stash:
            return self._stash.popleft()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
