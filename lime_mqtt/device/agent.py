"""The device agent: registers, loads its shard when a plan names it, runs its layers.

Its rooms: :mod:`~lime_mqtt.device.shards` (model files, the plan's segments, shard
loading, what is streamed), :mod:`~lime_mqtt.device.scheduler` (the one ordered work
queue, accepted steps, duplicates, batches) and :mod:`~lime_mqtt.device.compute` (KV
caches and every forward pass: quick decode steps on the event loop, the rest on one
worker thread). This module holds its lifetime
and its word to the cluster: status, telemetry, leaving, and what each step's result
is sent on to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lime_mqtt.core.errors import LimeError, WireError
from lime_mqtt.core.heap import settle_heap
from lime_mqtt.core.messages import STATUS_VERSION, Adaptation, DeviceState, DeviceStatus, DeviceTelemetry
from lime_mqtt.core.plan import Plan, StagePlan
from lime_mqtt.core.progress import Bars, no_bars
from lime_mqtt.core.topics import STEP_QOS, Identity, Topics, valid_device_id
from lime_mqtt.core.wire import End, StageError, Step, Token, decode_envelope
from lime_mqtt.device.compute import Compute, Sequence
from lime_mqtt.device.link import LinkMonitor, link_changed
from lime_mqtt.device.memory import anon_rss_bytes, peak_rss_bytes, return_freed_memory_promptly, rss_bytes, trim_heap
from lime_mqtt.device.scheduler import MAX_ACTIVATION_BYTES, Accepted, Scheduler
from lime_mqtt.device.shards import ShardHost
from lime_mqtt.model.lean import KERNEL_ROWS
from lime_mqtt.model.sampling import choose_token
from lime_mqtt.planning.plan import MIB
from lime_mqtt.transport.base import LastWill, Message, Transport, check_identity

log = logging.getLogger(__name__)

# The broker keeps a device's subscriptions and QoS 1 messages (control) this long while it is away.
SESSION_EXPIRY_S = 120
# What makes a step fail on a device, as opposed to the device failing (a token id past
# the vocabulary, say): the request gets a stage error and the device serves on.
STEP_ERRORS = (LimeError, RuntimeError, ValueError, IndexError)
MAX_ERROR_CHARS = 4000  # an error text in a status or a stage error (their decoders allow 4096)


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
        max_batch: int = 16,
        fetch_weights: bool = False,
        serve_weights: bool = False,
        trusted: bool = False,
        max_activation_bytes: int = MAX_ACTIVATION_BYTES,
        bars: Bars = no_bars,
        link_interval_s: float = 30.0,
        freeze_heap: bool = False,
    ) -> None:
        if not valid_device_id(device_id):
            raise LimeError(f"device id {device_id!r} must be 1-64 characters without / + # or spaces")
        if memory_mb <= 0:
            raise LimeError("--memory-mb must be positive")
        if not 1 <= max_batch <= KERNEL_ROWS:
            raise LimeError(f"--max-batch must be between 1 and {KERNEL_ROWS} (the rows of one batched step)")
        if threads is not None and not 1 <= threads <= 4096:
            raise LimeError("--threads must be between 1 and 4096")
        check_identity(transport, "device", device_id)  # its credentials must be device/{device_id}'s
        self.topics = Topics(cluster)
        self.network = transport  # opens this agent's connection, and those of weight fetches
        self.device_id = device_id
        self.memory_mb = memory_mb
        self.serve_weights = serve_weights  # this device is a weight source for others
        self.freeze_heap = freeze_heap  # a process of its own: freeze its heap once a plan is loaded
        self.trusted = trusted  # may run the first and last stage under --trusted-ends
        self.kv_ttl_s = kv_ttl_s
        self.telemetry_s = telemetry_s
        self.threads = threads
        self.torch_device = torch_device
        self.measure = measure
        self.layer_delay_ms = layer_delay_ms
        self.max_batch = max_batch
        self.bars = bars  # progress of measuring and of fetching weights, drawn by the CLI
        self.host = ShardHost(device_id, model_folder, memory_mb, torch_device=torch_device,
                              layer_delay_ms=layer_delay_ms, fetch_weights=fetch_weights, bars=bars)
        self.model_id = self.host.model_id
        self.compute = Compute(device_id, threads)
        self.scheduler = Scheduler(device_id, self.compute, max_batch, self.topics, max_activation_bytes)
        self.me = Identity("device", device_id)
        self.state: DeviceState = "idle"
        self.leaving = False  # SIGTERM: waiting for a plan without this device before exiting
        self._left = asyncio.Event()  # a plan without this device has been applied
        self.error: str | None = None
        self.plan: Plan | None = None
        self.capabilities: dict[str, float] = {}
        self.link_interval_s = link_interval_s  # measure the link again this often while serving (0: never)
        self.link_monitor: LinkMonitor | None = None
        self.gone_coordinators: set[str] = set()  # whose status was cleared: their chains stop
        self.adaptations = 0  # changes of what is streamed, made by the governor
        self.last_adaptation: Adaptation | None = None
        will = LastWill(self.topics.device_status(device_id), self._status("offline").encode())
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

    # What tests and tools read of the rooms.
    @property
    def stages(self) -> list[StagePlan]:
        return self.host.stages

    @property
    def sequences(self) -> dict[tuple[str, int], Sequence]:
        return self.compute.sequences

    @property
    def steps_done(self) -> int:
        return self.compute.steps_done

    @property
    def peak_kv_tokens(self) -> int:
        return self.compute.peak_kv_tokens

    @property
    def duplicates(self) -> int:
        return self.scheduler.duplicates

    @property
    def stream(self) -> Any:
        return self.host.stream

    # ----- status and telemetry -----------------------------------------------------------------

    def _status(self, state: DeviceState) -> DeviceStatus:
        host = self.host
        fields: dict[str, Any] = {}
        if state != "offline":
            fields.update(peak_rss_mb=round(peak_rss_bytes() / MIB, 1), rss_mb=round(rss_bytes() / MIB, 1),
                          anon_mb=round(anon_rss_bytes() / MIB, 1))
        if self.plan is not None and host.stages:
            fields.update(plan_epoch=self.plan.epoch, stages=[s.stage for s in host.stages],
                          layers=[(s.start, s.stop) for s in host.stages], streamed=sorted(host.streamed_now()),
                          streamed_by_plan=sorted(i for s in host.stages for i in s.streamed))
        if host.shards:
            fields["param_count"] = sum(shard.param_count for shard in host.shards.values())
            fields["weight_bytes"] = sum(shard.weight_bytes for shard in host.shards.values())
            fields["formats"] = sorted({f for shard in host.shards.values() for f in shard.formats()})
            fields["loaded_anon_mb"] = round(host.load_anon / MIB, 2)
        return DeviceStatus(
            v=STATUS_VERSION, device_id=self.device_id, state=state, model=self.model_id, memory_mb=self.memory_mb,
            host=socket.gethostname(), pid=os.getpid(), torch_device=self.torch_device, threads=self.threads,
            baseline_rss_mb=round(host.baseline_rss / MIB, 1), baseline_anon_mb=round(host.baseline_anon / MIB, 1),
            ts=time.time(), capabilities=self.capabilities, error=self.error, trusted=self.trusted, **fields,
        )

    async def _publish_status(self, state: DeviceState) -> None:
        if self.leaving and state != "offline":
            state = "leaving"
        self.state = state
        await self.transport.publish(self.topics.device_status(self.device_id), self._status(state).encode(),
                                     qos=1, retain=True)

    async def _after_reconnect(self) -> None:
        if self.state != "offline":
            await self._publish_status(self.state)

    def _kv_bytes(self) -> int:
        return self.compute.kv_bytes(self.host.checkpoint.kv_bytes_per_token_per_layer(), self.host.layer_spans())

    def telemetry(self) -> DeviceTelemetry:
        stream = self.host.stream
        held = self.host.held_bytes(self._kv_bytes()) if self.host.shards else None
        return DeviceTelemetry(
            v=STATUS_VERSION, device_id=self.device_id, ts=time.time(), rss_mb=round(rss_bytes() / MIB, 1),
            peak_rss_mb=round(peak_rss_bytes() / MIB, 1), kv_sequences=len(self.sequences),
            kv_tokens=self.compute.kv_tokens(), peak_kv_tokens=self.compute.peak_kv_tokens,
            queue_depth=self.scheduler.queue.qsize(), steps_done=self.compute.steps_done,
            batches=self.compute.batches, inline_steps=self.compute.inline_steps,
            duplicates=self.scheduler.duplicates, impostors=self.scheduler.impostors,
            adaptations=self.adaptations,
            last_adaptation=self.last_adaptation, streamed=sorted(self.host.streamed_now()),
            held_mb=round(held / MIB, 2) if held is not None else None, compute_s=round(self.compute.compute_s, 4),
            streamed_mb=round(stream.bytes_read / 1e6, 1) if stream else 0.0,
            stream_wait_s=round(stream.wait_s, 4) if stream else 0.0,
        )

    async def _publish_telemetry(self) -> None:
        await self.transport.publish(self.topics.device_telemetry(self.device_id), self.telemetry().encode())

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

    # ----- lifetime -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; on the way out, say "offline" and drop the connection."""
        return_freed_memory_promptly()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if self.host.fetch_weights:
            await self.host.fetch_manifest(self.network, self.topics.cluster)
        self.scheduler.hidden_size = self.host.hidden_size
        async with self.transport:
            if self.measure:
                await self._publish_status("measuring")
                await self._measure()
            await self._publish_status("idle")
            # Every step sent to this device, for any stage: the scheduler accepts only
            # those from the sender the plan puts before the stage.
            await self.transport.subscribe(self.topics.all_plans, self.topics.all_control,
                                           self.topics.stage_inbox(self.device_id), self.topics.all_coordinator_status)
            if self.link_interval_s > 0:
                echo = self.topics.echo(self.device_id)
                self.link_monitor = LinkMonitor(self.transport, echo)
                self.compute.keep_loop_free = self.link_monitor.waiting
                await self.transport.subscribe(echo, qos=0)
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._receive(), name=f"{self.device_id}-receive")
                    tasks.create_task(self._work(), name=f"{self.device_id}-work")
                    tasks.create_task(self._housekeeping(), name=f"{self.device_id}-housekeeping")
                    if self.link_monitor is not None:
                        tasks.create_task(self._watch_link(self.link_monitor), name=f"{self.device_id}-link")
                    if self.serve_weights:
                        from lime_mqtt.weights.source import WeightSource

                        source = WeightSource(self.network, self.topics.cluster, self.host.model_folder,
                                              model_id=self.model_id, identity=self.me)
                        tasks.create_task(source.run(), name=f"{self.device_id}-weights")
            finally:
                await asyncio.shield(self._say_offline())
                await self.compute.close()
                self.host.drop()

    async def _measure(self) -> None:
        """Measure compute and disk (cached per device and model) and the link to the broker."""
        from lime_mqtt.device.link import measure_link
        from lime_mqtt.model.builtin import cache_dir
        from lime_mqtt.model.measure import measure_capabilities

        host = self.host
        measured = await self.compute.run(lambda: measure_capabilities(
            host.checkpoint, self.device_id, cache_dir().parent, self.torch_device, layer_delay_ms=self.layer_delay_ms,
            bars=self.bars,
        ))
        trim_heap()  # what measuring used is not this device's to keep
        echo = self.topics.echo(self.device_id)
        rtt_ms, mb_s = await measure_link(self.transport, echo)
        self.capabilities = {**measured.to_json(), "link_rtt_ms": round(rtt_ms, 3), "link_mb_s": round(mb_s, 1)}

    async def _say_offline(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self._publish_status("offline")
        except Exception:  # on the way out: whatever stops it, the rest of the cleanup must run
            log.exception("%s: could not publish the offline status", self.device_id)

    async def _receive(self) -> None:
        async for message in self.transport.messages():
            route = self.topics.parse(message.topic)
            if route is None:
                continue
            if route.kind == "plan" and route.sender.role == "planner":
                if not message.payload:
                    continue
                try:
                    plan = Plan.from_json(message.payload)
                except LimeError as exc:
                    log.warning("%s: ignoring a malformed plan: %s", self.device_id, exc)
                    continue
                await self.scheduler.put(plan)
            elif route.kind in ("control", "stage"):
                await self.scheduler.put(message)
            elif route.kind == "status" and route.sender.role == "coordinator":
                # Cleared (its last will, or a clean exit): the chains it started stop here.
                if message.payload:
                    self.gone_coordinators.discard(route.sender.name)
                else:
                    self.gone_coordinators.add(route.sender.name)
            elif route.kind == "echo" and route.to == self.me and self.link_monitor is not None:
                self.link_monitor.deliver(message.payload)

    async def _watch_link(self, monitor: LinkMonitor) -> None:
        """Measure the link to the broker again every ``link_interval_s``; when it changed
        (``link_changed``), say so in the status, so that the planner can plan around it."""
        while True:
            await asyncio.sleep(self.link_interval_s)
            try:
                rtt_ms, mb_s = await monitor.measure()
            except (TimeoutError, LimeError) as exc:
                log.warning("%s: could not measure the link again: %s", self.device_id, exc)
                continue
            if link_changed(self.capabilities, rtt_ms, mb_s):
                log.warning("%s: the link changed: round trip %.1f -> %.1f ms, %.1f -> %.1f MB/s", self.device_id,
                            self.capabilities.get("link_rtt_ms", 0), rtt_ms, self.capabilities.get("link_mb_s", 0),
                            mb_s)
                self.capabilities = {**self.capabilities, "link_rtt_ms": round(rtt_ms, 3),
                                     "link_mb_s": round(mb_s, 1)}
                await self._publish_status(self.state)

    async def _housekeeping(self) -> None:
        """Free KV caches of requests idle past their TTL; publish telemetry."""
        while True:
            await asyncio.sleep(min(self.telemetry_s, self.kv_ttl_s / 4))
            for rid in self.compute.expire(self.kv_ttl_s):
                log.info("%s: request %s idle for %.0f s, freeing its KV cache", self.device_id, rid, self.kv_ttl_s)
            await self._publish_telemetry()

    async def _work(self) -> None:
        while True:
            item = await self.scheduler.next()
            try:
                if isinstance(item, Plan):
                    await self._apply_plan(item)
                elif getattr(self.topics.parse(item.topic), "kind", None) == "control":
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
        stages = plan.stages_of(self.device_id)
        self.plan = plan
        self.compute.free_all()  # caches belong to the old split
        self.scheduler.follow(plan, stages)
        host = self.host
        if not stages:
            host.drop()
            host.use([])
            await self._publish_status("idle")
            self._left.set()
            return
        try:
            await host.prepare(stages, self.network, self.topics.cluster, say=self._publish_status,
                               run=self.compute.run)
            self.error = None
        except LimeError as exc:
            self.error = str(exc)[:MAX_ERROR_CHARS]
            await self._publish_status("error")
            raise
        if self.freeze_heap:
            settle_heap()  # what the shards loaded stays: no full collection scans it during a step
        log.info("%s: ready for plan %d as stage(s) %s: %s", self.device_id, plan.epoch,
                 [s.stage for s in stages], list(host.shards.values()))
        await self._publish_status("ready")

    async def _govern_memory(self) -> None:
        """After a step or a freed cache: let the governor stream more layers or hold them
        again (``ShardHost.govern``); publish each change in the status and telemetry."""
        event = await self.host.govern(self._kv_bytes(), self.compute.run)
        if event is not None:
            self.adaptations, self.last_adaptation = self.adaptations + 1, event
            await self._publish_status(self.state)
            await self._publish_telemetry()

    # ----- requests -----------------------------------------------------------------------------

    def _handle_control(self, message: Message) -> None:
        try:
            envelope = decode_envelope(message.payload)
        except WireError as exc:
            log.warning("%s: dropping a malformed control message: %s", self.device_id, exc)
            return
        if isinstance(envelope, End):
            self.compute.end(envelope.request_id)

    async def _handle_step(self, message: Message) -> None:
        ready = set(self.host.shards)
        accepted = self.scheduler.accept(message, ready)
        if accepted is None:
            return
        if self.max_batch > 1 and self.scheduler.batchable(accepted):
            await self._run_batch(await self.scheduler.gather(accepted, ready), accepted.stage)
            return
        try:
            output = await self.compute.step(self.host.shards[accepted.stage.stage], accepted.step, accepted.stage)
            await self._emit(accepted.step, accepted.stage, output)
        except STEP_ERRORS as exc:
            await self._fail(accepted, exc)

    async def _run_batch(self, batch: list[Step], stage: StagePlan) -> None:
        """Decode steps of several sequences as one batch of ``max_batch`` rows."""
        shard = self.host.shards[stage.stage]
        try:
            outputs = await self.compute.batch(shard, batch, stage, max(len(batch), shard.batch_rows(self.max_batch)))
        except STEP_ERRORS as exc:
            for step in batch:
                await self._fail(Accepted(step, stage, ""), exc)
            return
        for step, output in zip(batch, outputs, strict=True):
            await self._emit(step, stage, output)

    async def _fail(self, accepted: Accepted, exc: Exception) -> None:
        step = accepted.step
        log.error("%s: request %s step %d failed: %s", self.device_id, step.request_id, step.step, exc)
        self.compute.free(step.request_id, accepted.stage.stage)
        if step.reply:
            failure = StageError(step.request_id, step.step, step.epoch, self.device_id,
                                 (str(exc) or type(exc).__name__)[:MAX_ERROR_CHARS])
            await self.transport.publish(self.topics.result(self.device_id, step.reply), failure.encode(), qos=1)

    async def _emit(self, step: Step, stage: StagePlan, output: Any) -> None:
        """Pass a step's hidden state on to the next stage, or (last stage) the token back."""
        if not stage.head:
            onward = replace(step, tokens=None, hidden=output)  # the rest (sampling, reply, chain) goes on as it came
            assert self.plan is not None
            successor = self.plan.stages[stage.stage + 1].device_id
            await self.transport.publish(self.topics.stage_in(self.me, successor, stage.stage + 1), onward.encode(),
                                         qos=STEP_QOS)
            return
        if step.sampling is None or step.reply is None:
            raise WireError("the last stage needs sampling parameters and the coordinator to answer")
        if step.step < 0:  # a leading chunk of a prefill: the cache is filled, no token yet
            done = Token(step.request_id, step.step, step.epoch, step.pos)
            await self.transport.publish(self.topics.result(self.device_id, step.reply), done.encode(), qos=STEP_QOS)
            return
        token = choose_token(output, step.sampling, step.step)
        if step.chain is not None and step.chain.follows(step.step, token) and step.reply not in self.gone_coordinators:
            await self._chain(step, token)  # first: the next step is what the answer waits for
        result = Token(step.request_id, step.step, step.epoch, step.pos, token=token,
                       logits=output if step.want_logits else None)
        await self.transport.publish(self.topics.result(self.device_id, step.reply), result.encode(), qos=STEP_QOS)

    async def _chain(self, step: Step, token: int) -> None:
        """The last stage starts the next decode step itself: ``token`` at the next position,
        straight to the first stage (wire.Chain)."""
        assert self.plan is not None
        onward = replace(step, step=step.step + 1, pos=step.pos + step.width, tokens=[token], hidden=None)
        first = self.plan.stages[0].device_id
        await self.transport.publish(self.topics.stage_in(self.me, first, 0), onward.encode(), qos=STEP_QOS)
