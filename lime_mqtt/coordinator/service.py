"""The coordinator: the request gateway of a cluster.

Its rooms: :mod:`~lime_mqtt.coordinator.intake` (request, cancel and resume messages in,
replies out), :mod:`~lime_mqtt.coordinator.generation` (prefill, decode, retries and
replays through the stages), :mod:`~lime_mqtt.coordinator.plans` (the plan and device
states it follows), :mod:`~lime_mqtt.coordinator.admission` (KV-cache room) and
:mod:`~lime_mqtt.coordinator.textstream` (incremental detokenization). This module owns
the connection and the lifetime, and routes each message to its room. It holds every
request's token history, so the answer is whole even though the devices only ever see
activations.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from pathlib import Path

from lime_mqtt.coordinator.admission import KvAdmission
from lime_mqtt.coordinator.generation import Generation, Timing
from lime_mqtt.coordinator.intake import Intake
from lime_mqtt.coordinator.plans import PlanWatch
from lime_mqtt.core import protocol
from lime_mqtt.core.errors import LimeError, MessageError
from lime_mqtt.core.heap import settle_heap
from lime_mqtt.core.messages import CoordinatorStatus, CoordinatorTelemetry
from lime_mqtt.core.plan import Plan
from lime_mqtt.core.topics import Identity, Route, Topics
from lime_mqtt.core.view import ClusterView
from lime_mqtt.model.adapter import adapter_for
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.planning.cost import PREFILL_LINK_BUDGET_MS
from lime_mqtt.transport.base import LastWill, Message, Transport, own_name
from lime_mqtt.weights.source import WeightSource

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 600


class Coordinator:
    def __init__(
        self,
        transport: Transport,
        cluster: str,
        model_folder: Path,
        *,
        step_timeout_s: float = 60.0,
        step_retry_s: float = 5.0,
        ready_timeout_s: float = 30.0,
        replan_timeout_s: float = 60.0,
        max_concurrent: int = 8,
        max_waiting: int = 1024,
        prefill_chunk: int = 256,
        prefill_link_ms: float = PREFILL_LINK_BUDGET_MS,
        serve_weights: bool = False,
        name: str | None = None,
        limits: protocol.Limits | None = None,
        telemetry_s: float = 5.0,
        chain: bool = True,
        freeze_heap: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        self.topics = Topics(cluster)
        self.freeze_heap = freeze_heap  # a process of its own: freeze its heap before serving
        self.checkpoint = Checkpoint(model_folder)
        self.model_id = self.checkpoint.folder.name
        # A model whose family no device can run: say so now, not on every request.
        adapter_for(self.checkpoint.config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint.folder)
        # Its identity (coordinator/{name}, the MQTT user name where the broker checks
        # one): every message it sends is under that name.
        self.name = own_name(transport, "coordinator", name, f"coord-{uuid.uuid4().hex[:8]}")
        self.me = Identity("coordinator", self.name)
        self.weight_source: WeightSource | None = None
        if serve_weights:
            self.weight_source = WeightSource(transport, cluster, self.checkpoint.folder, model_id=self.model_id,
                                              identity=self.me)
        self.telemetry_s = telemetry_s  # how often it publishes its figures (CoordinatorTelemetry)
        self.serving = asyncio.Event()  # set once requests are subscribed to
        # Retained while serving; a clean exit or the last will (empty, retained) clears it.
        will = LastWill(self.topics.coordinator_status(self.name), b"")
        # Reconnects by itself; its session keeps the request subscription, so requests
        # accepted by the broker (QoS 1) while it is away wait for it.
        self.transport = transport.connection(
            f"lime-{self.name}", will=will,
            reconnect=True, session_expiry_s=SESSION_EXPIRY_S, on_reconnect=self._after_reconnect,
        )
        self.watch = PlanWatch(ClusterView(self.topics, model=self.model_id),
                               ready_timeout_s=ready_timeout_s, replan_timeout_s=replan_timeout_s)
        self.generation = Generation(
            self.transport, self.topics, self.name, self.watch, self.checkpoint, self.tokenizer,
            timing=Timing(step_timeout_s, step_retry_s), prefill_chunk=prefill_chunk,
            prefill_link_ms=prefill_link_ms, max_prompt_tokens=(limits or protocol.Limits()).max_prompt_tokens,
            chain=chain,
        )
        self.intake = Intake(self.transport, self.topics, self.name, self.generation, max_concurrent=max_concurrent,
                             max_waiting=max_waiting, limits=limits, owns=self.owns)

    def __repr__(self) -> str:
        epoch = self.plan.epoch if self.plan else None
        return (f"Coordinator({self.name!r}, plan_epoch={epoch}, active={len(self.generation.active)}, "
                f"served={self.intake.served})")

    @property
    def plan(self) -> Plan | None:
        return self.watch.plan

    @property
    def admission(self) -> KvAdmission:
        return self.generation.admission

    @property
    def peak_active(self) -> int:
        return self.generation.peak_active

    async def run(self) -> None:
        async with self.transport:
            await self.transport.subscribe(*self.watch.view.subscriptions(), self.topics.results_inbox(self.name),
                                           self.topics.all_requests)
            await self._publish_status()
            if self.freeze_heap:
                settle_heap()  # the tokenizer and the model's objects: no full collection scans them per token
            self.serving.set()
            log.info("coordinator %s serving %s on %s", self.name, self.model_id, self.topics.all_requests)
            try:
                async with asyncio.TaskGroup() as tasks:
                    if self.weight_source is not None:
                        tasks.create_task(self._serve_weights(self.weight_source), name=f"{self.name}-weights")
                    tasks.create_task(self._report(), name=f"{self.name}-telemetry")
                    async for message in self.transport.messages():
                        route = self.topics.parse(message.topic)
                        if route is not None and route.kind == "requests":
                            client = route.sender.name
                            tasks.create_task(self._serve_request(message, client), name=f"{self.name}-request")
                        else:
                            await self._route(message, route)
            finally:
                self.serving.clear()
                await asyncio.shield(self._say_offline())

    async def _serve_request(self, message: Message, client: str) -> None:
        """One request message of ``client`` (the topic it came on says who), supervised:
        whatever it does, the coordinator serves on (``Intake.serve`` answers every error
        it can name to its client)."""
        try:
            await self.intake.serve(message, client)
        except Exception:
            log.exception("%s: a request message failed outside its own error handling", self.name)

    async def _serve_weights(self, source: WeightSource) -> None:
        """The weight source, supervised: if it fails, requests are still served (devices
        that fetch weights then wait for another source)."""
        try:
            await source.run()
        except Exception:
            log.exception("%s: the weight source stopped; serving requests without it", self.name)

    async def _route(self, message: Message, route: Route | None) -> None:
        try:
            if route is not None and route.kind == "result" and route.to == self.me:
                self.generation.deliver(message.payload, route.sender.name)
                return
            update = await self.watch.take(message.topic, message.payload, message.retain)
        except MessageError as exc:
            log.warning("ignoring a message on %s: %s", message.topic, exc)
            return
        if update is not None and update.kind == "plan" and self.plan is not None:
            self.generation.admission.set_capacity(self.plan.kv_token_capacity)

    async def _after_reconnect(self) -> None:
        """Say again that this coordinator serves (its last will cleared that), and send the
        steps in flight again now: ones sent while the broker was away are lost."""
        if self.serving.is_set():
            await self._publish_status()
        self.watch.disturb("resend")

    def owns(self, key: str) -> bool:
        """Whether this coordinator serves the request of ``key`` (``client/id``). Every
        coordinator of the cluster receives every request; of those serving this model now
        (their retained status), the one a hash of the key picks serves it, so each request
        has one, and when that one goes, the others' pick moves its requests to them
        (docs/faults.md#two-coordinators)."""
        live = set(self.watch.view.serving_coordinators(self.model_id)) | {self.name}
        ordered = sorted(live)
        pick = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % len(ordered)
        return ordered[pick] == self.name

    def telemetry(self) -> CoordinatorTelemetry:
        """Its figures now: requests generating and waiting, and its counters."""
        waiting = self.intake.waiting + self.generation.admission.waiting
        return self.generation.stats.telemetry(self.name, len(self.generation.active), waiting)

    async def _report(self) -> None:
        """Publish its telemetry every ``telemetry_s``; a failed publish is logged, not fatal."""
        while True:
            try:
                await self.transport.publish(self.topics.coordinator_telemetry(self.name), self.telemetry().encode())
            except LimeError as exc:
                log.warning("could not publish the coordinator's telemetry: %s", exc)
            await asyncio.sleep(self.telemetry_s)

    async def _publish_status(self) -> None:
        status = CoordinatorStatus(v=1, name=self.name, state="online", model=self.model_id)
        await self.transport.publish(self.topics.coordinator_status(self.name), status.encode(), qos=1, retain=True)

    async def _say_offline(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self.transport.publish(
                    self.topics.coordinator_status(self.name), b"", qos=1, retain=True  # clear, not keep
                )
        except (LimeError, TimeoutError):
            log.warning("could not clear the coordinator status")
