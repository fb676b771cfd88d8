"""The device agent: registers, loads its shard when a plan names it, runs its layers.

Everything a device does happens in one ordered work queue: plan changes, activation
steps and end-of-request messages are handled one after another, so a request's steps
always meet the shard they were planned for. Tensor work runs in a single worker
thread so the MQTT connection stays responsive during a long prefill.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lime_mqtt.core.errors import LimeError, WireError
from lime_mqtt.core.topics import STEP_QOS, Topics, valid_device_id
from lime_mqtt.core.wire import Envelope
from lime_mqtt.device.memory import (
    anon_rss_bytes,
    peak_rss_bytes,
    return_freed_memory_promptly,
    rss_bytes,
    trim_heap,
)
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.model.sampling import choose_token
from lime_mqtt.model.shard import LayerStream, Shard, ShardSpec, import_runtime
from lime_mqtt.planning.governor import MemoryGovernor
from lime_mqtt.planning.plan import MIB, Plan, StagePlan
from lime_mqtt.transport.base import LastWill, Message, Transport

log = logging.getLogger(__name__)

STATUS_VERSION = 1
WORK_QUEUE_SIZE = 256
# Steps of at most this many tokens run on the event loop; longer prefills in a worker thread.
INLINE_MAX_TOKENS = 16
# The broker keeps a device's subscriptions and QoS 1 messages (control) this long while it is away.
SESSION_EXPIRY_S = 120


@dataclass
class _Sequence:
    """One request's state on this device: its KV cache and when it was last used."""

    cache: Any
    last_used: float
    start: int  # the first layer of the segment it belongs to
    last_step: int = -(2**31)  # the latest step run: an older one arriving now is a duplicate


class DeviceAgent:
    """One device of the cluster, as an async context manager around its connection."""

    def __init__(
        self,
        transport: Transport,
        cluster: str,
        device_id: str,
        memory_mb: int,
        model_folder: Path,
        *,
        kv_ttl_s: float = 600.0,
        telemetry_s: float = 5.0,
        threads: int | None = None,
        torch_device: str = "cpu",
        measure: bool = True,
        layer_delay_ms: float = 0.0,
        max_batch: int = 1,
        fetch_weights: bool = False,
        serve_weights: bool = False,
    ) -> None:
        if not valid_device_id(device_id):
            raise LimeError(f"device id {device_id!r} must be 1-64 characters without / + # or spaces")
        if memory_mb <= 0:
            raise LimeError("--memory-mb must be positive")
        self.topics = Topics(cluster)
        self.network = transport  # opens this agent's connection, and those of weight fetches
        self.device_id = device_id
        self.memory_mb = memory_mb
        self.model_folder = Path(model_folder)
        self.model_id = self.model_folder.name
        self.fetch_weights = fetch_weights  # model files come over MQTT from a weight source
        self.serve_weights = serve_weights  # this device is a weight source for others
        self.manifest: dict[str, Any] | None = None
        if not 1 <= max_batch <= 256:
            raise LimeError("--max-batch must be between 1 and 256")
        self.max_batch = max_batch  # >1: decode steps waiting at a stage run together (Shard.forward_batch)
        self._stash: collections.deque[Message | Plan] = collections.deque()  # taken from the queue, not batched
        self._arrived = asyncio.Event()  # a message reached the work queue
        self._batch_compute_s = 0.0  # recent time of one batched forward (moving average)
        self.kv_ttl_s = kv_ttl_s
        self.telemetry_s = telemetry_s
        self.threads = threads
        self.torch_device = torch_device
        self.baseline_rss = self.baseline_anon = 0
        if (self.model_folder / "config.json").is_file():
            self._open_model()
        elif not fetch_weights:
            raise LimeError(f"{self.model_folder} has no config.json (use --weights-from-broker to fetch it)")
        self.state = "idle"
        self.leaving = False  # SIGTERM: waiting for a plan without this device before exiting
        self._left = asyncio.Event()  # a plan without this device has been applied
        self.error: str | None = None
        self.plan: Plan | None = None
        self.stages: list[StagePlan] = []  # this device's segments of the plan (several if interleaved)
        self.shards: dict[int, Shard] = {}  # by stage number
        self.stream: LayerStream | None = None  # reads the streamed layers of all its segments
        self._stage_by_topic: dict[str, StagePlan] = {}
        self.sequences: dict[tuple[str, int], _Sequence] = {}  # by (request id, stage number)
        self.measure = measure
        self.layer_delay_ms = layer_delay_ms
        self.capabilities: dict[str, Any] = {}
        self.steps_done = 0
        self.batches = 0  # forward passes: steps_done / batches is the mean batch size
        self.duplicates = 0  # steps dropped as late copies of steps already run
        self.governor: MemoryGovernor | None = None  # streams more layers when KV caches grow
        self.adaptations = 0  # changes of what is streamed, made by the governor
        self.last_adaptation: dict[str, Any] | None = None
        self._over_budget_said = False
        self.peak_kv_tokens = 0
        self.compute_s = 0.0  # time spent in this device's layers, all steps together
        self._queue: asyncio.Queue[Message | Plan] = asyncio.Queue(WORK_QUEUE_SIZE)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lime-{device_id}")
        will = LastWill(self.topics.device_status(device_id), self._status_payload("offline"))
        # Reconnects by itself (broker restart, Wi-Fi drop) and then says its state again,
        # since its last will may have said "offline" meanwhile.
        self.transport = transport.connection(
            f"lime-device-{cluster}-{device_id}", will=will,
            reconnect=True, session_expiry_s=SESSION_EXPIRY_S, on_reconnect=self._after_reconnect,
        )

    def __repr__(self) -> str:
        return (
            f"DeviceAgent({self.device_id!r}, state={self.state}, stages={[s.stage for s in self.stages]}, "
            f"sequences={len(self.sequences)})"
        )

    def _open_model(self) -> None:
        """Open the model folder and import the code its layers run; then the baseline."""
        self.checkpoint = Checkpoint(self.model_folder)
        import_runtime(self.checkpoint)
        self.baseline_rss = rss_bytes()  # code loaded, no weights yet
        self.baseline_anon = anon_rss_bytes()

    async def _fetch_manifest(self) -> None:
        """The model's config and tensor list from a weight source (waits for one)."""
        from lime_mqtt.weights.service import WeightsError, fetch_manifest, write_config

        while True:
            try:
                self.manifest = await fetch_manifest(
                    self.network, self.topics.cluster, self.model_id, timeout_s=3,
                    client=f"{self.device_id}-{uuid.uuid4().hex[:8]}",
                )
                break
            except WeightsError as exc:
                log.warning("%s: %s; asking again", self.device_id, exc)
        write_config(self.model_folder, self.manifest)
        if self.baseline_rss == 0:
            self._open_model()

    def _tensor_names(self, stages: list[StagePlan]) -> list[str]:
        """Exactly the tensors these segments need, by the manifest's names."""
        assert self.manifest is not None
        from lime_mqtt.model.adapter import adapter_for

        names = set(self.manifest["tensors"])
        adapter = adapter_for(self.checkpoint.config)
        prefixes = [adapter.layer_prefix(i) for stage in stages for i in stage.layers]
        if any(stage.head for stage in stages):
            prefixes.append(adapter.norm_prefix)
        wanted = [n for n in sorted(names) if n.startswith(tuple(prefixes))]
        if any(stage.embed for stage in stages):
            wanted.append(adapter.embed_key)
        if any(stage.head for stage in stages):
            wanted.append(adapter.head_source_key(self.checkpoint.config, names))
        return list(dict.fromkeys(wanted))

    async def _fetch_stages(self, stages: list[StagePlan]) -> None:
        from lime_mqtt.weights.service import fetch_tensors

        await self._publish_status("fetching")
        started = time.perf_counter()
        stats = await fetch_tensors(
            self.network, self.topics.cluster, self.manifest or {}, self._tensor_names(stages), self.model_folder,
            client=f"{self.device_id}-{uuid.uuid4().hex[:8]}",
        )
        log.info("%s: %d tensors (%.1f MB) over MQTT in %.1f s, %d already here, resumed %s", self.device_id,
                 stats.tensors_fetched, stats.bytes_received / 1e6, time.perf_counter() - started,
                 stats.tensors_skipped, stats.resumed_from or "nothing")
        self.checkpoint = Checkpoint(self.model_folder)  # read the new files' headers

    # ----- status -------------------------------------------------------------------------------

    def _status_payload(self, state: str) -> bytes:
        status: dict[str, Any] = {
            "v": STATUS_VERSION,
            "device_id": self.device_id,
            "state": state,
            "model": self.model_id,
            "memory_mb": self.memory_mb,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "torch_device": self.torch_device,
            "threads": self.threads,
            "baseline_rss_mb": round(self.baseline_rss / MIB, 1),
            "baseline_anon_mb": round(self.baseline_anon / MIB, 1),
            "ts": time.time(),
        }
        if state != "offline":
            status["peak_rss_mb"] = round(peak_rss_bytes() / MIB, 1)
            status["rss_mb"] = round(rss_bytes() / MIB, 1)
            status["anon_mb"] = round(anon_rss_bytes() / MIB, 1)
        if self.plan is not None and self.stages:
            status["plan_epoch"] = self.plan.epoch
            status["stages"] = [s.stage for s in self.stages]
            status["layers"] = [[s.start, s.stop] for s in self.stages]
            status["streamed"] = sorted(i for shard in self.shards.values() for i in shard.spec.streamed)
            status["streamed_by_plan"] = sorted(i for s in self.stages for i in s.streamed)
        if self.shards:
            status["param_count"] = sum(shard.param_count for shard in self.shards.values())
        if self.capabilities:
            status["capabilities"] = self.capabilities
        if self.error:
            status["error"] = self.error
        return json.dumps(status).encode()

    async def _after_reconnect(self) -> None:
        if self.state != "offline":
            await self._publish_status(self.state)

    async def leave(self, timeout_s: float = 30.0) -> None:
        """A clean shutdown (SIGTERM): say "leaving", so that the planner plans without this
        device and the coordinator moves the requests it serves onto that plan; serve on
        until a plan without this device arrives (at most ``timeout_s``). With no request
        in flight here it goes at once. The caller then stops :meth:`run`, which says
        "offline"."""
        self.leaving = True
        if not self.stages or not self.sequences:
            return  # no work in flight to hand over
        log.warning("%s: leaving; serving on until the cluster has a plan without this device", self.device_id)
        await self._publish_status("leaving")
        try:
            async with asyncio.timeout(timeout_s):
                await self._left.wait()
            log.info("%s: plan %d does without this device; going", self.device_id,
                     self.plan.epoch if self.plan else 0)
        except TimeoutError:
            log.warning("%s: no plan without this device after %.0f s; going anyway", self.device_id, timeout_s)

    async def _publish_status(self, state: str) -> None:
        if self.leaving and state != "offline":
            state = "leaving"
        self.state = state
        await self.transport.publish(
            self.topics.device_status(self.device_id), self._status_payload(state), qos=1, retain=True
        )

    def _kv_tokens(self) -> int:
        """Tokens of KV cache this device holds now, all sequences together."""
        return sum(seq.cache.get_seq_length(seq.start) for seq in self.sequences.values())

    def telemetry(self) -> dict[str, Any]:
        stream = self.stream
        kv_tokens = self._kv_tokens()
        return {
            "device_id": self.device_id,
            "ts": time.time(),
            "rss_mb": round(rss_bytes() / MIB, 1),
            "peak_rss_mb": round(peak_rss_bytes() / MIB, 1),
            "kv_sequences": len(self.sequences),
            "kv_tokens": kv_tokens,
            "peak_kv_tokens": self.peak_kv_tokens,
            "queue_depth": self._queue.qsize(),
            "steps_done": self.steps_done,
            "batches": self.batches,
            "duplicates": self.duplicates,
            "adaptations": self.adaptations,
            "last_adaptation": self.last_adaptation,
            "streamed": sorted(self._streamed_now()),
            "held_mb": round(self.governor.usage(self._streamed_now(), self._kv_bytes()) / MIB, 2)
            if self.governor and self.shards else None,
            "compute_s": round(self.compute_s, 4),
            "streamed_mb": round(stream.bytes_read / 1e6, 1) if stream else 0.0,
            "stream_wait_s": round(stream.wait_s, 4) if stream else 0.0,
        }

    # ----- lifetime -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; on the way out, say "offline" and drop the connection."""
        return_freed_memory_promptly()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if self.fetch_weights:
            await self._fetch_manifest()
        async with self.transport:
            if self.measure:
                await self._publish_status("measuring")
                await self._measure()
            await self._publish_status("idle")
            await self.transport.subscribe(self.topics.plan, self.topics.control)
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._receive(), name=f"{self.device_id}-receive")
                    tasks.create_task(self._work(), name=f"{self.device_id}-work")
                    tasks.create_task(self._housekeeping(), name=f"{self.device_id}-housekeeping")
                    if self.serve_weights:
                        from lime_mqtt.weights.service import WeightSource

                        source = WeightSource(self.network, self.topics.cluster, self.model_folder,
                                              model_id=self.model_id)
                        tasks.create_task(source.run(), name=f"{self.device_id}-weights")
            finally:
                await asyncio.shield(self._say_offline())
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._drop_shards()

    async def _measure(self) -> None:
        """Measure compute and disk (cached per device and model) and the link to the broker."""
        from lime_mqtt.model.builtin import cache_dir
        from lime_mqtt.model.measure import measure_capabilities, measure_link

        loop = asyncio.get_running_loop()
        measured = await loop.run_in_executor(
            self._executor, lambda: measure_capabilities(
                self.checkpoint, self.device_id, cache_dir().parent, self.torch_device,
                layer_delay_ms=self.layer_delay_ms,
            ),
        )
        trim_heap()  # what measuring used is not this device's to keep
        echo = f"{self.topics.root}/devices/{self.device_id}/echo"
        rtt_ms, mb_s = await measure_link(self.transport, echo)
        self.capabilities = {**measured.to_json(), "link_rtt_ms": round(rtt_ms, 3), "link_mb_s": round(mb_s, 1)}

    async def _say_offline(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self._publish_status("offline")
        except (LimeError, TimeoutError):
            log.warning("%s: could not publish the offline status", self.device_id)

    async def _receive(self) -> None:
        async for message in self.transport.messages():
            if message.topic == self.topics.plan:
                try:
                    plan = Plan.from_json(message.payload)
                except ValueError as exc:
                    log.warning("%s: ignoring a malformed plan: %s", self.device_id, exc)
                    continue
                await self._queue.put(plan)
            else:
                await self._queue.put(message)
                self._arrived.set()

    async def _housekeeping(self) -> None:
        """Free KV caches of requests idle past their TTL; publish telemetry."""
        while True:
            await asyncio.sleep(min(self.telemetry_s, self.kv_ttl_s / 4))
            now = time.monotonic()
            for rid in [r for r, seq in self.sequences.items() if now - seq.last_used > self.kv_ttl_s]:
                log.info("%s: request %s idle for %.0f s, freeing its KV cache", self.device_id, rid, self.kv_ttl_s)
                del self.sequences[rid]
            await self.transport.publish(
                self.topics.device_telemetry(self.device_id), json.dumps(self.telemetry()).encode()
            )

    async def _work(self) -> None:
        while True:
            item = self._stash.popleft() if self._stash else await self._queue.get()
            try:
                if isinstance(item, Plan):
                    await self._apply_plan(item)
                elif item.topic == self.topics.control:
                    self._handle_control(item)
                    await self._govern_memory()  # a cache freed: perhaps hold layers again
                else:
                    await self._handle_step(item)
                    await self._govern_memory()
            except LimeError as exc:
                log.error("%s: %s", self.device_id, exc)
            except Exception:  # the supervisor of this device's work: log and keep serving
                log.exception("%s: unexpected error", self.device_id)

    # ----- plans --------------------------------------------------------------------------------

    async def _apply_plan(self, plan: Plan) -> None:
        if self.plan is not None and plan.epoch <= self.plan.epoch:
            return
        if plan.model != self.model_id:
            log.warning("%s: plan %d is for model %s, this device serves %s", self.device_id, plan.epoch,
                        plan.model, self.model_id)
            return
        old_topics = set(self._stage_by_topic)
        self.plan = plan
        self.stages = plan.stages_of(self.device_id)
        self.sequences.clear()  # caches belong to the old split
        self._stage_by_topic = {self.topics.stage_in(s.stage): s for s in self.stages}
        if old_topics - set(self._stage_by_topic):
            await self.transport.unsubscribe(*sorted(old_topics - set(self._stage_by_topic)))
        if not self.stages:
            self._drop_shards()
            await self._publish_status("idle")
            self._left.set()
            return
        specs = {s.stage: ShardSpec(s.start, s.stop, s.embed, s.head, tuple(s.streamed), max(1, s.slots))
                 for s in self.stages}
        if {n: shard.spec for n, shard in self.shards.items()} != specs:
            self._drop_shards()
            loop = asyncio.get_running_loop()
            layers = ", ".join(f"[{s.start}, {s.stop})" for s in self.stages)
            try:
                if self.fetch_weights:
                    await self._fetch_stages(self.stages)
                await self._publish_status("loading")
                self.shards = await loop.run_in_executor(self._executor, self._load_shards, specs)
            except (LimeError, OSError, RuntimeError) as exc:
                self.error = f"cannot load layers {layers}: {exc}"
                await self._publish_status("error")
                raise LimeError(self.error) from exc
            self.error = None
        if set(self._stage_by_topic) - old_topics:
            await self.transport.subscribe(*sorted(set(self._stage_by_topic) - old_topics))
        self.governor = self._new_governor()
        log.info("%s: ready for plan %d as stage(s) %s: %s", self.device_id, plan.epoch,
                 [s.stage for s in self.stages], list(self.shards.values()))
        await self._publish_status("ready")

    def _new_governor(self) -> MemoryGovernor:
        layers = {i: self.checkpoint.layer_bytes(i) for s in self.stages for i in range(s.start, s.stop)}
        fixed = sum((self.checkpoint.embed_bytes if s.embed else 0) + (self.checkpoint.head_bytes if s.head else 0)
                    for s in self.stages)
        planned = frozenset(i for s in self.stages for i in s.streamed)
        return MemoryGovernor(layers, fixed, int(self.memory_mb * MIB), planned,
                              slots=max([s.slots for s in self.stages if s.streamed], default=1))

    def _kv_bytes(self) -> int:
        per_layer = self.checkpoint.kv_bytes_per_token_per_layer()
        spans = {s.stage: s.stop - s.start for s in self.stages}
        return sum(seq.cache.get_seq_length(seq.start) * spans.get(stage, 0) * per_layer
                   for (_, stage), seq in self.sequences.items())

    def _streamed_now(self) -> frozenset[int]:
        return frozenset(i for shard in self.shards.values() for i in shard.spec.streamed)

    async def _govern_memory(self) -> None:
        """After a step: as KV caches grow toward the budget, stream more layers from disk;
        as they shrink, hold them again (lime_mqtt/planning/governor.py). Each change is logged,
        counted in the telemetry and published in the status."""
        if self.governor is None or not self.shards:
            return
        kv = self._kv_bytes()
        now = self._streamed_now()
        wanted = self.governor.decide(now, kv)
        if wanted == now:
            if self.governor.usage(now, kv) > self.governor.budget_bytes and not self._over_budget_said:
                log.error("%s: %.1f MiB of KV cache: over the %.0f MiB budget with every layer streamed",
                          self.device_id, kv / MIB, self.memory_mb)
                self._over_budget_said = True
            return
        self._over_budget_said = False
        before = self.governor.usage(now, kv)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._restream, wanted)
        event = {"ts": time.time(), "kv_mb": round(kv / MIB, 2), "budget_mb": self.memory_mb,
                 "held_mb_before": round(before / MIB, 2),
                 "held_mb_after": round(self.governor.usage(wanted, kv) / MIB, 2),
                 "streamed": sorted(wanted), "action": "stream" if wanted > now else "hold"}
        self.adaptations, self.last_adaptation = self.adaptations + 1, event
        log.warning("%s: memory: %s layers %s: %.2f MiB of KV cache, %.2f -> %.2f MiB of %.2f MiB", self.device_id,
                    "streaming" if wanted > now else "holding again", sorted(wanted ^ now), kv / MIB,
                    before / MIB, event["held_mb_after"], self.memory_mb)
        await self._publish_status(self.state)
        telemetry = json.dumps(self.telemetry()).encode()
        await self.transport.publish(self.topics.device_telemetry(self.device_id), telemetry)

    def _restream(self, streamed: frozenset[int]) -> None:
        """Read ``streamed`` from disk from now on (one reader for all segments, ring order)."""
        if self.stream is not None:
            self.stream.close()
        order = [(i, self.checkpoint.keys_with_prefix(f"model.layers.{i}."))
                 for s in self.stages for i in range(s.start, s.stop) if i in streamed]
        slots = self.governor.slots if self.governor else 1
        self.stream = LayerStream(self.checkpoint, order, slots) if order else None
        for shard in self.shards.values():
            shard.set_streamed(tuple(i for i in streamed if shard.spec.start <= i < shard.spec.stop), self.stream,
                               slots)
        trim_heap()

    def _load_shards(self, specs: dict[int, ShardSpec]) -> dict[int, Shard]:
        """One shard per segment; the streamed layers of all segments share one reader, in
        ring order, so a segment's next layers are read while the other devices work."""
        streamed = [(i, self.checkpoint.keys_with_prefix(f"model.layers.{i}."))
                    for spec in specs.values() for i in spec.streamed]
        slots = max(spec.slots for spec in specs.values())
        self.stream = LayerStream(self.checkpoint, streamed, slots) if streamed else None
        return {n: Shard(self.checkpoint, spec, self.torch_device, self.layer_delay_ms, stream=self.stream)
                for n, spec in specs.items()}

    def _drop_shards(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream = None
        self.shards = {}
        trim_heap()

    # ----- requests -----------------------------------------------------------------------------

    def _handle_control(self, message: Message) -> None:
        try:
            envelope = Envelope.decode(message.payload)
        except WireError as exc:
            log.warning("%s: dropping a malformed control message: %s", self.device_id, exc)
            return
        if envelope.kind == "end":
            for key in [k for k in self.sequences if k[0] == envelope.request_id]:
                del self.sequences[key]

    def _accept_step(self, message: Message) -> tuple[Envelope, StagePlan] | None:
        """A step this device should run now, with its stage; ``None`` (logged) otherwise."""
        try:
            envelope = Envelope.decode(message.payload)
        except WireError as exc:
            log.warning("%s: dropping a malformed message on %s: %s", self.device_id, message.topic, exc)
            return None
        stage = self._stage_by_topic.get(message.topic)
        if self.plan is None or stage is None or stage.stage not in self.shards:
            return None
        if envelope.epoch != self.plan.epoch or envelope.kind != "step":
            log.debug("%s: dropping %s of epoch %d (current %d)", self.device_id, envelope.request_id,
                      envelope.epoch, self.plan.epoch)
            return None
        sequence = self.sequences.get((envelope.request_id, stage.stage))
        if sequence is not None and envelope.step < sequence.last_step:
            # A late copy (a redelivery, or a retry overtaken by later steps): running it
            # would cut the cache back. The latest step itself may run again (a retry).
            log.debug("%s: dropping a duplicate of %s step %d", self.device_id, envelope.request_id, envelope.step)
            self.duplicates += 1
            return None
        return envelope, stage

    def _batchable(self, envelope: Envelope, stage: StagePlan) -> bool:
        """A decode step (one new token) of a sequence whose cache is here."""
        one = (envelope.tokens is not None and len(envelope.tokens) == 1) or (
            envelope.hidden is not None and envelope.hidden.dim() == 3 and envelope.hidden.shape[:2] == (1, 1)
        )
        return one and envelope.pos > 0 and (envelope.request_id, stage.stage) in self.sequences

    async def _gather_batch(self, first: Envelope, stage: StagePlan, topic: str) -> list[Envelope]:
        """``first`` and the decode steps of other sequences right behind it at this stage.

        Steps already waiting are taken at once; if fewer than this stage's live
        sequences are here, it waits a little for the rest (at most a quarter of a
        batch's recent compute time, and 20 ms), since they are usually a few messages
        behind. It stops at the first waiting item that is not such a step (order kept).
        """
        batch = [first]
        live = sum(1 for _, n in self.sequences if n == stage.stage)
        want = min(self.max_batch, live)
        deadline = time.monotonic() + min(0.02, self._batch_compute_s / 4)
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
            if isinstance(item, Plan) or item.topic != topic:
                self._stash.appendleft(item)
                break
            more = self._accept_step(item)
            if more is None:
                continue
            if not self._batchable(*more) or any(e.request_id == more[0].request_id for e in batch):
                self._stash.appendleft(item)
                break
            batch.append(more[0])
        return batch

    async def _let_arrived_messages_in(self) -> None:
        """Give the event loop a few turns, so that messages already in the socket reach the
        work queue (the MQTT client reads one packet per turn, and the receiver needs a turn
        to pass each on); stop as soon as a pair of turns brings nothing new."""
        for _ in range(self.max_batch):
            size = self._queue.qsize()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if self._queue.qsize() == size:
                return

    def _next_waiting(self) -> Message | Plan | None:
        if self._stash:
            return self._stash.popleft()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _handle_step(self, message: Message) -> None:
        accepted = self._accept_step(message)
        if accepted is None:
            return
        envelope, stage = accepted
        if self.max_batch > 1 and self._batchable(envelope, stage):
            await self._run_batch(await self._gather_batch(envelope, stage, message.topic), stage)
            return
        try:
            await self._run_step(envelope, stage)
        except (LimeError, RuntimeError, ValueError, IndexError) as exc:  # e.g. a token id past the vocabulary
            await self._fail(envelope, stage, exc)

    async def _fail(self, envelope: Envelope, stage: StagePlan, exc: Exception) -> None:
        log.error("%s: request %s step %d failed: %s", self.device_id, envelope.request_id, envelope.step, exc)
        self.sequences.pop((envelope.request_id, stage.stage), None)
        if envelope.reply:
            failure = Envelope(
                kind="token", request_id=envelope.request_id, step=envelope.step, epoch=envelope.epoch,
                meta={"error": {"code": "stage_error", "device_id": self.device_id, "message": str(exc)}},
            )
            await self.transport.publish(envelope.reply, failure.encode(), qos=1)

    async def _run_batch(self, batch: list[Envelope], stage: StagePlan) -> None:
        """Decode steps of several sequences as one batch of ``max_batch`` rows."""
        shard = self.shards[stage.stage]
        sequences = [self.sequences[(e.request_id, stage.stage)] for e in batch]
        started = time.perf_counter()
        try:
            outputs = shard.forward_batch(
                [s.cache for s in sequences], [e.pos for e in batch],
                max(len(batch), shard.batch_rows(self.max_batch)),
                tokens=[e.tokens[0] for e in batch if e.tokens] if stage.embed else None,
                hidden=[e.hidden for e in batch if e.hidden is not None] if not stage.embed else None,
            )
        except (LimeError, RuntimeError, ValueError, IndexError) as exc:
            for envelope in batch:
                await self._fail(envelope, stage, exc)
            return
        now = time.monotonic()
        for sequence, envelope in zip(sequences, batch, strict=True):
            sequence.last_used, sequence.last_step = now, envelope.step
        elapsed = time.perf_counter() - started
        self._batch_compute_s = 0.8 * self._batch_compute_s + 0.2 * elapsed if self._batch_compute_s else elapsed
        self.steps_done += len(batch)
        self.batches += 1
        self.compute_s += elapsed
        self.peak_kv_tokens = max(self.peak_kv_tokens, self._kv_tokens())
        for envelope, output in zip(batch, outputs, strict=True):
            await self._emit(envelope, stage, output)

    async def _run_step(self, envelope: Envelope, stage: StagePlan) -> None:
        shard = self.shards[stage.stage]
        key = (envelope.request_id, stage.stage)
        sequence = self.sequences.get(key)
        if sequence is None or envelope.pos == 0:
            sequence = self.sequences[key] = _Sequence(shard.new_cache(), time.monotonic(), stage.start)
        sequence.last_used, sequence.last_step = time.monotonic(), envelope.step
        width = len(envelope.tokens) if envelope.tokens is not None else (
            envelope.hidden.shape[1] if envelope.hidden is not None and envelope.hidden.dim() == 3 else 1
        )
        started = time.perf_counter()
        run = functools.partial(shard.forward, sequence.cache, envelope.pos, envelope.tokens, envelope.hidden,
                                logits=envelope.step >= 0)  # a leading prefill chunk needs no logits
        if width <= INLINE_MAX_TOKENS:
            # A decode step is a few milliseconds: handing it to a thread costs more than it saves.
            output = run()
        else:
            output = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        self.steps_done += 1
        self.batches += 1
        self.compute_s += time.perf_counter() - started
        self.peak_kv_tokens = max(self.peak_kv_tokens, self._kv_tokens())
        await self._emit(envelope, stage, output)

    async def _emit(self, envelope: Envelope, stage: StagePlan, output: Any) -> None:
        """Pass a step's hidden state on to the next stage, or (last stage) the token back."""
        if not stage.head:
            onward = Envelope(
                kind="step", request_id=envelope.request_id, step=envelope.step, epoch=envelope.epoch,
                pos=envelope.pos, hidden=output, sampling=envelope.sampling, want_logits=envelope.want_logits,
                reply=envelope.reply,
            )
            await self.transport.publish(self.topics.stage_in(stage.stage + 1), onward.encode(), qos=STEP_QOS)
            return
        if envelope.sampling is None or envelope.reply is None:
            raise WireError("the last stage needs sampling parameters and a reply topic")
        if envelope.step < 0:  # a leading chunk of a prefill: the cache is filled, no token yet
            done = Envelope(kind="token", request_id=envelope.request_id, step=envelope.step, epoch=envelope.epoch,
                            pos=envelope.pos)
            await self.transport.publish(envelope.reply, done.encode(), qos=STEP_QOS)
            return
        token = choose_token(output, envelope.sampling, envelope.step)
        result = Envelope(
            kind="token", request_id=envelope.request_id, step=envelope.step, epoch=envelope.epoch,
            pos=envelope.pos, token=token, logits=output if envelope.want_logits else None,
        )
        await self.transport.publish(envelope.reply, result.encode(), qos=STEP_QOS)
