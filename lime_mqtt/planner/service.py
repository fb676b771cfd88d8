"""The planner service: watches device registrations and publishes the retained plan."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

from lime_mqtt.core.errors import MessageError, PlanError
from lime_mqtt.core.messages import ONLINE_STATES, STATUS_VERSION, DeviceStatus, PlannerStatus
from lime_mqtt.core.topics import Topics
from lime_mqtt.core.view import ClusterView
from lime_mqtt.model.checkpoint import Checkpoint, model_size
from lime_mqtt.planning.cost import DeviceProfile, Objective, Workload, link_ms
from lime_mqtt.planning.plan import Plan, Strategy, make_plan
from lime_mqtt.transport.base import LastWill, Transport, own_name

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 16384  # what a planner status may carry (core/messages.py)
# A device that joins is adopted only if the plan with it is predicted this much faster.
JOIN_GAIN = 0.05
# A planned device's link counts as degraded past this many times what the plan counted per token.
LINK_DEGRADED = 1.5
# After the planner's own reconnect (a broker restart), devices take a moment to reconnect
# and say "ready" again (their last wills said "offline"): no replanning for a loss meanwhile.
RECONNECT_GRACE_S = 5.0


class PlannerService:
    """Waits for ``quorum`` devices of its model, then plans; replans when a planned device
    leaves (with whatever devices are left), and when a device joins if the plan with it is
    predicted at least ``JOIN_GAIN`` faster (always, for the baseline strategies).

    Plans are made only after membership has been quiet for ``settle_s`` seconds, so a
    cluster that starts together gets one plan, not one per device.
    """

    def __init__(
        self,
        transport: Transport,
        cluster: str,
        model_folder: Path,
        *,
        quorum: int = 1,
        settle_s: float = 1.0,
        context_tokens: int = 512,
        sequences: int = 1,
        objective: Objective = "latency",
        strategy: Strategy = "optimal",
        reserve_mb: float = 32.0,
        interleaving: bool = True,
        heartbeat_timeout_s: float = 15.0,
        trusted_ends: bool = False,
        name: str | None = None,
        standby: bool = False,
    ) -> None:
        if quorum < 1:
            raise PlanError("quorum must be at least 1")
        self.topics = Topics(cluster)
        self.name = own_name(transport, "planner", name, "main")  # it publishes the plan as planner/{name}
        self.checkpoint = Checkpoint(model_folder)
        self.model_id = self.checkpoint.folder.name
        self.size = model_size(self.checkpoint, self.model_id)
        self.quorum = quorum
        self.settle_s = settle_s
        self.workload = Workload(context_tokens=context_tokens, sequences=sequences, objective=objective,
                                 reserve_bytes=int(reserve_mb * 1024 * 1024), trusted_ends=trusted_ends)
        self.strategy: Strategy = strategy
        self.interleaving = interleaving
        self.view = ClusterView(self.topics)  # the devices as they say they are, and the retained plan
        self.plan: Plan | None = None
        self.considered: set[str] = set()  # the devices online when the current plan was made
        self.link_basis: dict[str, float] = {}  # link ms per token a kept plan was checked against
        self.planned_here = False  # whether this planner has published a plan (not only read one back)
        # A device of the plan not heard from (status or telemetry) for this long is taken
        # for lost, as if its last will had come (a hung process, a link that died silently).
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heard: dict[str, float] = {}  # device id -> when it was last heard from (monotonic)
        self.silent: set[str] = set()  # devices of the plan that missed their heartbeats
        self.last_error: str | None = None
        self._changed = asyncio.Event()
        # With ``standby``, it plans only once no other planner's status is there (their
        # last wills clear it): one active planner, the others waiting to take over.
        self.standby = standby
        self.others: set[str] = set()  # other planners whose status says they are there
        self._others_changed = asyncio.Event()
        self._said: str | None = None  # the state of the last status it published
        self.transport = transport.connection(
            f"lime-planner-{cluster}-{uuid.uuid4().hex[:6]}", reconnect=True, on_reconnect=self._after_reconnect,
            will=LastWill(self.topics.planner_status(self.name), b""),
        )
        self._grace_until = 0.0

    def __repr__(self) -> str:
        epoch = self.plan.epoch if self.plan else None
        return f"PlannerService(model={self.model_id!r}, devices={sorted(self.online())}, epoch={epoch})"

    @property
    def devices(self) -> dict[str, DeviceStatus]:
        return self.view.devices

    def online(self) -> dict[str, DeviceStatus]:
        return {
            d: s for d, s in self.devices.items()
            if s.state in ONLINE_STATES and s.model == self.model_id and d not in self.silent
        }

    def needs_plan(self) -> str | None:
        """Why a new plan is due (``first``, ``lost`` or ``joined``), or ``None``."""
        online = self.online()
        if self.plan is None or self.plan.model != self.model_id:
            return "first" if len(online) >= self.quorum else None
        if any(stage.device_id not in online for stage in self.plan.stages):
            # A planner (re)started with a retained plan whose devices are not all back yet
            # (a cluster starting again, one by one): wait for its quorum, as for a first
            # plan, rather than plan for the first few back and again for each one after.
            if not self.planned_here and len(online) < self.quorum:
                return None
            return "lost" if online else None
        if set(online) - self.considered - {s.device_id for s in self.plan.stages}:
            return "joined"
        if self._degraded_links(online):
            return "link"
        return None

    def _degraded_links(self, online: dict[str, DeviceStatus]) -> list[str]:
        """The plan's devices whose link now costs a token much more than the plan counted
        (their status has a new measurement): past ``LINK_DEGRADED`` times and 2 ms more."""
        assert self.plan is not None
        worse = []
        for stage in self.plan.stages:
            if stage.link_ms is None or stage.device_id not in online:
                continue
            profile = DeviceProfile.from_status(stage.device_id, online[stage.device_id].model_dump())
            now = link_ms(self.size, profile)
            basis = max(stage.link_ms, self.link_basis.get(stage.device_id, 0.0))
            if now > LINK_DEGRADED * basis and now > basis + 2.0:
                worse.append(stage.device_id)
        return worse

    def worth_adopting(self, candidate: Plan) -> bool:
        """Whether a plan that includes a device that joined should replace the current one."""
        assert self.plan is not None
        if [(s.device_id, s.start, s.stop) for s in candidate.stages] == [
            (s.device_id, s.start, s.stop) for s in self.plan.stages
        ]:
            return False
        if self.strategy != "optimal" or not self.plan.predicted_ms_per_token:
            return True
        return (candidate.predicted_ms_per_token or 0) < (1 - JOIN_GAIN) * self.plan.predicted_ms_per_token

    def make_plan(self) -> Plan:
        profiles = [DeviceProfile.from_status(device_id, status.model_dump())
                    for device_id, status in self.online().items()]
        epoch = (self.plan.epoch if self.plan else 0) + 1
        return make_plan(self.size, profiles, epoch, self.workload, self.strategy, interleaving=self.interleaving)

    async def run(self) -> None:
        async with self.transport:
            await self.transport.subscribe(self.topics.all_plans, self.topics.all_device_status,
                                           self.topics.all_planner_status)
            if self.heartbeat_timeout_s:
                await self.transport.subscribe(self.topics.all_device_telemetry, qos=0)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive(), name="planner-receive")
                if self.standby:
                    await self._wait_for_the_active_planner_to_go()
                # A first look once things settle, devices or none: its status (what a standby
                # planner waits on) is out within ``settle_s`` of its start.
                self._changed.set()
                tasks.create_task(self._plan_when_settled(), name="planner-plan")
                if self.heartbeat_timeout_s:
                    tasks.create_task(self._watch_heartbeats(), name="planner-heartbeats")

    async def _wait_for_the_active_planner_to_go(self) -> None:
        """Until no other planner's status is there (a moment after start, for the retained
        ones to arrive): then this one takes over, from the retained plan."""
        log.info("planner %s stands by", self.name)
        while True:
            self._others_changed.clear()
            try:
                async with asyncio.timeout(max(self.settle_s, 1.0)):
                    await self._others_changed.wait()
                continue  # something changed: look again after a quiet moment
            except TimeoutError:
                pass
            if not self.others:
                break
            await self._others_changed.wait()
        log.warning("planner %s takes over (no other planner is there)", self.name)

    async def _after_reconnect(self) -> None:
        self._grace_until = time.monotonic() + RECONNECT_GRACE_S
        self.heard = dict.fromkeys(self.heard, self._grace_until)  # no heartbeats came while away
        self._changed.set()  # look again once the grace is over

    async def _publish_status(self, state: Literal["waiting", "planned", "error"], message: str) -> None:
        """Retained, so an operator or a coordinator can tell why there is no plan. A message
        past what the status may carry is cut (the log has it whole)."""
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 16] + " ... (cut short)"
        status = PlannerStatus(v=STATUS_VERSION, state=state, message=message, model=self.model_id,
                               devices=sorted(self.online())[:4096], ts=time.time())
        await self.transport.publish(self.topics.planner_status(self.name), status.encode(), qos=1, retain=True)
        self._said = state

    def _heard_from(self, device_id: str) -> None:
        self.heard[device_id] = time.monotonic()
        if device_id in self.silent:
            self.silent.discard(device_id)
            log.warning("device %s is heard from again", device_id)
            self._changed.set()

    async def _watch_heartbeats(self) -> None:
        """Take a device of the plan that has gone silent for lost."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_timeout_s / 4))
            if self.plan is None or not self.transport.connected:
                continue
            now = time.monotonic()
            for stage in self.plan.stages:
                device = stage.device_id
                if device in self.silent or device not in self.online():
                    continue
                if now - self.heard.get(device, now) > self.heartbeat_timeout_s:
                    log.warning("device %s of plan %d missed its heartbeats (silent for %.1f s): taken for lost",
                                device, self.plan.epoch, now - self.heard[device])
                    self.silent.add(device)
                    self._changed.set()

    async def _receive(self) -> None:
        async for message in self.transport.messages():
            try:
                update = self.view.take(message.topic, message.payload, message.retain)
            except MessageError as exc:
                log.warning("ignoring a message on %s: %s", message.topic, exc)
                continue
            route = self.topics.parse(message.topic)
            if route is not None and route.sender.role == "planner" and route.kind == "status" \
                    and route.sender.name != self.name:
                (self.others.add if message.payload else self.others.discard)(route.sender.name)
                self._others_changed.set()
                continue
            if update is None:
                continue
            if update.kind == "telemetry" and update.key is not None:
                if update.key in self.devices:
                    self._heard_from(update.key)
            elif update.kind == "plan" and self.view.plan is not None:
                if self.plan is None or self.view.plan.epoch > self.plan.epoch:
                    self.plan = self.view.plan  # continue the epoch count of an earlier planner
            elif update.kind == "device" and update.key is not None:
                status = self.devices[update.key]
                before = update.before is not None and update.before.state in ONLINE_STATES
                if not update.retained:
                    self._heard_from(update.key)
                if before != (status.state in ONLINE_STATES):
                    log.info("device %s is %s", update.key, status.state)
                self._changed.set()

    async def _plan_when_settled(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            # Debounce: wait until nothing has changed for settle_s.
            while True:
                try:
                    async with asyncio.timeout(self.settle_s):
                        await self._changed.wait()
                    self._changed.clear()
                except TimeoutError:
                    break
            if not self.transport.connected:
                # What it saw last may be the broker going down (it sends every last will
                # then): look again once reconnected, after the grace below.
                await self.transport.wait_connected()
                self._changed.set()
                continue
            reason = self.needs_plan()
            if reason == "lost" and (grace := self._grace_until - time.monotonic()) > 0:
                log.info("a device of plan %d is offline just after a reconnect; looking again in %.1f s",
                         self.plan.epoch if self.plan else 0, grace)
                await asyncio.sleep(grace)
                self._changed.set()
                continue
            if reason is None:
                if self.plan is None:
                    await self._publish_status("waiting", f"{len(self.online())} of {self.quorum} devices "
                                               f"of model {self.model_id} have registered")
                elif self._said != "planned":  # it took over (or restarted) with the retained plan
                    await self._publish_status("planned", f"plan {self.plan.epoch} with {len(self.plan.stages)} "
                                               "stages (retained)")
                continue
            try:
                plan = self.make_plan()
                if reason == "link":
                    slow = self._degraded_links(self.online())
                    log.warning("the link of %s got slower than plan %d counted; planning again", ", ".join(slow),
                                self.plan.epoch if self.plan else 0)
                    if self.plan is not None and [(x.device_id, x.start, x.stop) for x in plan.stages] == [
                            (x.device_id, x.start, x.stop) for x in self.plan.stages]:
                        # Still the best split: keep it, and measure further changes from here.
                        for stage in plan.stages:
                            self.link_basis[stage.device_id] = stage.link_ms or 0.0
                        log.info("plan %d stays the best split with the slower link", self.plan.epoch)
                        continue
                if reason == "joined" and not self.worth_adopting(plan):
                    log.info("device(s) %s joined; keeping plan %d (predicted %.1f against %.1f ms per token)",
                             sorted(set(self.online()) - self.considered), self.plan.epoch if self.plan else 0,
                             self.plan.predicted_ms_per_token or 0 if self.plan else 0,
                             plan.predicted_ms_per_token or 0)
                    self.considered = set(self.online())
                    continue
            except PlanError as exc:
                if str(exc) != self.last_error:
                    log.error("cannot plan: %s", exc)
                await self._publish_status("error", str(exc))  # every time: a coordinator waits for it
                self.last_error = str(exc)
                continue
            self.last_error = None
            left_out = "".join(f"; left out {d}: {why}" for d, why in sorted(plan.left_out.items()))
            await self._publish_status(
                "planned", f"plan {plan.epoch} with {len(plan.stages)} stages, predicted "
                f"{plan.predicted_ms_per_token:.1f} ms per token{left_out}"
            )
            self.plan, self.considered = plan, set(self.online())
            self.link_basis = {}
            self.planned_here = True
            log.info("publishing plan %d (%s): %s", plan.epoch, reason,
                     ", ".join(f"{s.device_id}[{s.start},{s.stop})" for s in plan.stages))
            await self.transport.publish(self.topics.plan(self.name), plan.to_json(), qos=1, retain=True)
