"""What the coordinator knows of the cluster: the plan it serves, the planner's word and
each device's state (one :class:`~lime_mqtt.core.view.ClusterView`), and the waits that
depend on them: a plan whose devices are ready, the next plan after one broke.

Steps in flight wait on a *disturbance*: a future resolved (and replaced) when the plan
changes or one of its devices leaves (``plan``: replay on the next plan), or after a
reconnect (``resend``: send the step again now).
"""

from __future__ import annotations

import asyncio
import logging
import time

from lime_mqtt.core.errors import RequestError
from lime_mqtt.core.messages import GONE_STATES
from lime_mqtt.core.plan import Plan
from lime_mqtt.core.view import ClusterView, Update

log = logging.getLogger(__name__)


class PlanWatch:
    def __init__(self, view: ClusterView, *, ready_timeout_s: float, replan_timeout_s: float) -> None:
        self.view = view
        self.ready_timeout_s = ready_timeout_s
        self.replan_timeout_s = replan_timeout_s
        self.planner_error_at = 0.0  # when the planner last said it cannot plan (monotonic)
        self.plan_at = 0.0  # when the current plan arrived (monotonic)
        self.changed = asyncio.Condition()
        self._disturbance: asyncio.Future[str] | None = None

    def __repr__(self) -> str:
        return f"PlanWatch(plan_epoch={self.plan.epoch if self.plan else None}, ready={self.plan_ready()})"

    @property
    def plan(self) -> Plan | None:
        return self.view.plan

    @property
    def planner_message(self) -> str | None:
        """The planner's word on the plan (why there is none, say)."""
        said = self.view.planner
        return said.message if said and said.message else None

    async def take(self, topic: str, payload: bytes, retained: bool) -> Update | None:
        """Absorb a message of the cluster's state; wake whoever waits on it."""
        async with self.changed:
            alive = self.plan_alive()
            before = self.plan
            update = self.view.take(topic, payload, retained)  # MessageError: the caller logs it
            if update is None:
                return None
            if update.kind == "plan":
                if before is not None and self.plan is not None:
                    log.info("plan %d replaces plan %d", self.plan.epoch, before.epoch)
                self.plan_at = time.monotonic()
                self.disturb()
            elif update.kind == "planner" and self.view.planner is not None and self.view.planner.state == "error":
                self.planner_error_at = time.monotonic()
            elif update.kind == "device" and alive and not self.plan_alive():
                log.warning("device %s of plan %d is %s", update.key, self.plan.epoch if self.plan else 0,
                            self.view.state_of(update.key or ""))
                self.disturb()
            self.changed.notify_all()
            return update

    def plan_ready(self) -> bool:
        """Whether every stage device of the current plan has loaded it."""
        return self.view.plan_ready()

    def plan_alive(self) -> bool:
        """Whether no stage device of the current plan has left or failed."""
        return self.plan is not None and not any(self.view.state_of(s.device_id) in GONE_STATES
                                                 for s in self.plan.stages)

    def planner_gave_up(self) -> bool:
        """Whether the planner said it cannot plan after the current plan arrived."""
        return self.planner_error_at > self.plan_at

    def disturb(self, why: str = "plan") -> None:
        """Wake every step in flight: ``plan`` (replan or replay) or ``resend`` (send again now)."""
        if self._disturbance is not None and not self._disturbance.done():
            self._disturbance.set_result(why)
        self._disturbance = None

    def disturbance(self) -> asyncio.Future[str]:
        if self._disturbance is None:
            self._disturbance = asyncio.get_running_loop().create_future()
        return self._disturbance

    def lost_capacity(self) -> RequestError:
        gone = sorted(s.device_id for s in self.plan.stages
                      if self.view.state_of(s.device_id) in GONE_STATES) if self.plan else []
        return RequestError(
            "capacity_lost", f"device(s) {', '.join(gone) or '?'} left and the devices still online cannot hold "
            f"the model: {self.planner_message or 'the planner made no new plan'}"
        )

    async def next_plan(self, lost: Plan) -> Plan:
        """After plan ``lost`` broke: the next plan once its devices are ready, or a clear error."""
        async with self.changed:
            try:
                async with asyncio.timeout(self.replan_timeout_s):
                    await self.changed.wait_for(
                        lambda: self.planner_gave_up() or (  # a new plan, or the old one whole again
                            self.plan is not None and (self.plan.epoch > lost.epoch or self.plan_alive())
                            and self.plan_ready()
                        )
                    )
            except TimeoutError:
                raise self.lost_capacity() from None
            if self.planner_gave_up() or self.plan is None:
                raise self.lost_capacity()
            return self.plan

    async def wait_ready(self) -> Plan:
        """The current plan once its devices are ready; a clear error if there is none."""
        async with self.changed:
            if self.plan is None:
                why = self.planner_message or "no planner has reported yet"
                raise RequestError("no_plan", f"no plan yet: {why}")
            try:
                async with asyncio.timeout(self.ready_timeout_s):
                    await self.changed.wait_for(lambda: self.plan_ready() or self.planner_gave_up())
            except TimeoutError:
                raise RequestError(
                    "not_ready", f"the devices of plan {self.plan.epoch} did not become ready in "
                    f"{self.ready_timeout_s:.0f} s"
                ) from None
            if self.planner_gave_up() and not self.plan_ready():
                raise RequestError("no_capacity", f"the devices online cannot hold the model: "
                                   f"{self.planner_message or 'no plan'}")
            assert self.plan is not None
            return self.plan
