"""The coordinator: takes requests, drives prefill and decode through the stages, streams answers.

It holds every request's token history, so the answer is whole even though the
devices only ever see activations.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lime_mqtt.coordinator.admission import KvAdmission
from lime_mqtt.coordinator.textstream import TextStream
from lime_mqtt.core import protocol
from lime_mqtt.core.errors import LimeError, RequestError, WireError
from lime_mqtt.core.protocol import Request
from lime_mqtt.core.topics import STEP_QOS, Topics, device_id_from_status_topic, parse_status
from lime_mqtt.core.wire import Envelope, Sampling
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.planning.plan import Plan
from lime_mqtt.transport.base import LastWill, Message, Transport
from lime_mqtt.weights.service import WeightSource

log = logging.getLogger(__name__)

# A prefill of many tokens legitimately takes longer: add this much retry patience per token.
PREFILL_RETRY_S_PER_TOKEN = 0.02
# Device states that mean a plan's stage will not answer. ("leaving" is not one: such a
# device serves on until the plan without it is out.)
GONE_STATES = ("offline", "error")


SESSION_EXPIRY_S = 600
# Answers kept for clients that reconnect and ask again (resume): the most recent ones.
KEPT_ANSWERS = 32


def _deadline_exceeded(request: Request) -> RequestError:
    return RequestError("deadline_exceeded",
                        f"no complete answer within the request's deadline of {request.deadline_s} s")


class _PlanLost(Exception):
    """The plan a step was sent under changed, or one of its devices left: replay on the next."""


@dataclass(frozen=True)
class ReplyTarget:
    topic: str
    correlation_data: bytes | None = None


@dataclass
class _Sent:
    """What a client was sent about one request, kept so that it can be sent again to a
    client that lost its connection (a ``resume`` message)."""

    target: ReplyTarget
    messages: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False


@dataclass
class _Running:
    """A request being served, as a task a client's cancel message can stop."""

    task: asyncio.Task[Any]
    cancelled: bool = False


@dataclass
class _Active:
    """A request being answered: the plan it runs under, its id on the devices (a new one
    each time it is replayed on another plan), and the futures of its steps in flight."""

    request: Request
    rid: str
    plan: Plan
    pending: dict[int, asyncio.Future[Envelope]] = field(default_factory=dict)


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
        serve_weights: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        self.topics = Topics(cluster)
        self.checkpoint = Checkpoint(model_folder)
        self.model_id = self.checkpoint.folder.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint.folder)
        self.admission = KvAdmission()
        self.weight_source: WeightSource | None = None
        if serve_weights:
            self.weight_source = WeightSource(transport, cluster, self.checkpoint.folder, model_id=self.model_id)
        self.context_length = int(self.checkpoint.config_dict.get("max_position_embeddings", 2048))
        self.eos_ids = self._eos_ids()
        self.step_timeout_s = step_timeout_s
        self.step_retry_s = step_retry_s
        self.ready_timeout_s = ready_timeout_s
        self.replan_timeout_s = replan_timeout_s
        self.name = f"coord-{uuid.uuid4().hex[:8]}"
        self.results_topic = f"{self.topics.results}/{self.name}"
        self.plan: Plan | None = None
        self.device_status: dict[str, dict[str, Any]] = {}
        self.planner_message: str | None = None  # the planner's word on why there is no plan
        self.planner_error_at = 0.0  # when the planner last said it cannot plan (monotonic)
        self.plan_at = 0.0  # when the current plan arrived (monotonic)
        # Resolved (and replaced) when the plan changes or one of its devices leaves.
        self._disturbance: asyncio.Future[str] | None = None
        self.active: dict[str, _Active] = {}
        self.peak_active = 0  # the most requests generating at once
        self.served = 0
        self._changed = asyncio.Condition()
        self._slots = asyncio.Semaphore(max_concurrent)  # wakes waiters first come, first served
        self.max_waiting = max_waiting
        if prefill_chunk < 0:
            raise ValueError("prefill_chunk must be 0 (never cut) or a number of tokens")
        self.prefill_chunk = prefill_chunk  # prompts longer than this go in chunks of this size
        self.waiting = 0  # requests received and not yet generating
        self.by_client_id: dict[str, _Running] = {}  # for cancelling
        self.sent: collections.OrderedDict[str, _Sent] = collections.OrderedDict()  # for resuming
        self.serving = asyncio.Event()  # set once requests are subscribed to
        # Retained while serving; a clean exit or the last will (empty, retained) clears it.
        will = LastWill(self.topics.coordinator_status(self.name), b"")
        # Reconnects by itself; its session keeps the request subscription, so requests
        # accepted by the broker (QoS 1) while it is away wait for it.
        self.transport = transport.connection(
            f"lime-{self.name}", will=will,
            reconnect=True, session_expiry_s=SESSION_EXPIRY_S, on_reconnect=self._after_reconnect,
        )

    def __repr__(self) -> str:
        epoch = self.plan.epoch if self.plan else None
        return f"Coordinator({self.name!r}, plan_epoch={epoch}, active={len(self.active)}, served={self.served})"

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.checkpoint.config_dict.get("eos_token_id"), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        gen_config = self.checkpoint.folder / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return ids

    # ----- lifetime -----------------------------------------------------------------------------

    async def run(self) -> None:
        async with self.transport:
            await self.transport.subscribe(
                self.topics.plan, self.topics.all_device_status, self.topics.planner_status,
                self.results_topic, self.topics.requests
            )
            await self.transport.publish(
                self.topics.coordinator_status(self.name), self._status_payload("online"), qos=1, retain=True
            )
            self.serving.set()
            log.info("coordinator %s serving %s on %s", self.name, self.model_id, self.topics.requests)
            source = asyncio.create_task(self.weight_source.run(), name="weights") if self.weight_source else None
            try:
                await self._serve_all()
            finally:
                if source is not None:
                    source.cancel()
                    await asyncio.gather(source, return_exceptions=True)
                self.serving.clear()
                await asyncio.shield(self._say_offline())

    async def _after_reconnect(self) -> None:
        """Say again that this coordinator serves (its last will cleared that), and send the
        steps in flight again now: ones sent while the broker was away are lost."""
        if self.serving.is_set():
            await self.transport.publish(
                self.topics.coordinator_status(self.name), self._status_payload("online"), qos=1, retain=True
            )
        self._disturb("resend")

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"v": 1, "name": self.name, "state": state, "model": self.model_id}).encode()

    async def _say_offline(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self.transport.publish(
                    self.topics.coordinator_status(self.name), b"", qos=1, retain=True  # clear, not keep
                )
        except (LimeError, TimeoutError):
            log.warning("could not clear the coordinator status")

    async def _serve_all(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            async for message in self.transport.messages():
                if message.topic == self.topics.requests:
                    tasks.create_task(self._serve(message), name=f"{self.name}-request")
                else:
                    await self._route(message)

    async def _route(self, message: Message) -> None:
        if message.topic == self.results_topic:
            self._deliver(message)
        elif message.topic == self.topics.plan:
            try:
                plan = Plan.from_json(message.payload)
            except ValueError as exc:
                log.warning("ignoring a malformed plan: %s", exc)
                return
            if plan.model != self.model_id:
                log.warning("plan %d is for model %s, this coordinator serves %s", plan.epoch, plan.model,
                            self.model_id)
                return
            if self.plan is not None and plan.epoch <= self.plan.epoch:
                return  # a stale or repeated plan
            async with self._changed:
                if self.plan is not None:
                    log.info("plan %d replaces plan %d", plan.epoch, self.plan.epoch)
                self.plan, self.plan_at = plan, time.monotonic()
                self.admission.set_capacity(plan.kv_token_capacity)
                self._disturb()
                self._changed.notify_all()
        elif message.topic == self.topics.planner_status:
            try:
                status = json.loads(message.payload) if message.payload else {}
                self.planner_message = str(status["message"]) if status.get("message") else None
                failed = status.get("state") == "error"
            except (ValueError, AttributeError, TypeError):
                log.warning("ignoring a malformed planner status")
                return
            async with self._changed:
                if failed:
                    self.planner_error_at = time.monotonic()
                self._changed.notify_all()
        elif (device_id := device_id_from_status_topic(message.topic)) is not None:
            status = parse_status(message.payload)
            if status is None:
                log.warning("ignoring a malformed status of %s", device_id)
                return
            async with self._changed:
                alive = self.plan_alive()
                self.device_status[device_id] = status
                if alive and not self.plan_alive():
                    log.warning("device %s of plan %d is %s", device_id, self.plan.epoch if self.plan else 0,
                                status.get("state"))
                    self._disturb()
                self._changed.notify_all()

    def _deliver(self, message: Message) -> None:
        try:
            envelope = Envelope.decode(message.payload)
        except WireError as exc:
            log.warning("dropping a malformed result: %s", exc)
            return
        active = self.active.get(envelope.request_id)
        future = active.pending.get(envelope.step) if active else None
        if future is not None and not future.done():
            future.set_result(envelope)

    def plan_ready(self) -> bool:
        """Whether every stage device of the current plan has loaded it."""
        return self.plan is not None and self.plan.ready(self.device_status)

    def plan_alive(self) -> bool:
        """Whether no stage device of the current plan has left or failed."""
        return self.plan is not None and not any(
            self.device_status.get(s.device_id, {}).get("state") in GONE_STATES for s in self.plan.stages
        )

    def planner_gave_up(self) -> bool:
        """Whether the planner said it cannot plan after the current plan arrived."""
        return self.planner_error_at > self.plan_at

    def _disturb(self, why: str = "plan") -> None:
        """Wake every step in flight: ``plan`` (replan or replay) or ``resend`` (send again now)."""
        if self._disturbance is not None and not self._disturbance.done():
            self._disturbance.set_result(why)
        self._disturbance = None

    def _disturbance_future(self) -> asyncio.Future[str]:
        if self._disturbance is None:
            self._disturbance = asyncio.get_running_loop().create_future()
        return self._disturbance

    def _lost_capacity(self) -> RequestError:
        gone = sorted(s.device_id for s in self.plan.stages
                      if self.device_status.get(s.device_id, {}).get("state") in GONE_STATES) if self.plan else []
        return RequestError(
            "capacity_lost", f"device(s) {', '.join(gone) or '?'} left and the devices still online cannot hold "
            f"the model: {self.planner_message or 'the planner made no new plan'}"
        )

    async def _next_plan(self, lost: Plan) -> Plan:
        """After plan ``lost`` broke: the next plan once its devices are ready, or a clear error."""
        async with self._changed:
            try:
                async with asyncio.timeout(self.replan_timeout_s):
                    await self._changed.wait_for(
                        lambda: self.planner_gave_up() or (  # a new plan, or the old one whole again
                            self.plan is not None and (self.plan.epoch > lost.epoch or self.plan_alive())
                            and self.plan_ready()
                        )
                    )
            except TimeoutError:
                raise self._lost_capacity() from None
            if self.planner_gave_up() or self.plan is None:
                raise self._lost_capacity()
            return self.plan

    async def _wait_ready(self) -> Plan:
        async with self._changed:
            if self.plan is None:
                why = self.planner_message or "no planner has reported yet"
                raise RequestError("no_plan", f"no plan yet: {why}")
            try:
                async with asyncio.timeout(self.ready_timeout_s):
                    await self._changed.wait_for(lambda: self.plan_ready() or self.planner_gave_up())
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

    # ----- one request --------------------------------------------------------------------------

    def _reply_target(self, message: Message, raw: Any, request_id: str) -> ReplyTarget:
        if message.response_topic:
            return ReplyTarget(message.response_topic, message.correlation_data)
        reply_to = raw.get("reply_to") if isinstance(raw, dict) else None
        if isinstance(reply_to, str) and reply_to and "+" not in reply_to and "#" not in reply_to:
            return ReplyTarget(reply_to)
        client = raw.get("client") if isinstance(raw, dict) and isinstance(raw.get("client"), str) else "default"
        if not client or any(c in client for c in "/+#"):
            client = "default"
        return ReplyTarget(self.topics.responses(client, request_id))

    async def _send(self, target: ReplyTarget, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if isinstance(request_id, str):
            sent = self.sent.get(request_id)
            if sent is None or sent.target != target:
                sent = self.sent[request_id] = _Sent(target)
            sent.messages.append(message)
            if message["type"] in ("final", "error"):
                sent.done = True
                self.sent.move_to_end(request_id)
                while len(self.sent) > KEPT_ANSWERS and next(iter(self.sent.values())).done:
                    self.sent.popitem(last=False)
        await self.transport.publish(
            target.topic, protocol.dumps(message), qos=1, correlation_data=target.correlation_data
        )

    async def _resume(self, resume: protocol.Resume) -> bool:
        """Send a reconnected client what it missed of a request; ``False`` if this
        coordinator never heard of the request (then the caller may serve it as new)."""
        sent = self.sent.get(resume.request_id)
        if sent is None:
            return resume.request_id in self.by_client_id  # running, nothing sent yet: nothing missed
        again = [m for m in list(sent.messages) if m["type"] != "chunk" or m["index"] > resume.after]
        log.info("request %s: a client asks again after chunk %d: %d messages", resume.request_id, resume.after,
                 len(again))
        for message in again:
            await self.transport.publish(sent.target.topic, protocol.dumps(message), qos=1,
                                         correlation_data=sent.target.correlation_data)
        return True

    async def _serve(self, message: Message) -> None:
        """Answer one request message: a whole answer or one error, never silence."""
        received_at = time.perf_counter()
        try:
            raw = json.loads(message.payload)
        except ValueError:
            raw = None
        if (victim := protocol.cancel_target(message.payload)) is not None:
            self._cancel(victim)
            return
        if (resume := protocol.resume_target(message.payload)) is not None:
            if await self._resume(resume) or resume.request is None:
                return
            # The broker took the request, then lost it (a restart before it was delivered).
            log.info("request %s: first heard of in a resume; serving it", resume.request_id)
            raw = {**resume.request, "id": resume.request_id}
            message = Message(message.topic, json.dumps(raw).encode(), response_topic=message.response_topic,
                              correlation_data=message.correlation_data)
        client_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        request_id = client_id or uuid.uuid4().hex
        if request_id in self.by_client_id:
            log.info("request %s is already being served; ignoring a second copy", request_id)
            return
        target = self._reply_target(message, raw, request_id)
        task = asyncio.current_task()
        assert task is not None
        running = self.by_client_id[request_id] = _Running(task)
        try:
            request = protocol.parse_request(message.payload)
            waiting = self.waiting + self.admission.waiting
            if waiting >= self.max_waiting:
                raise RequestError("overloaded", f"{waiting} requests are already waiting; try again later")
            try:
                async with asyncio.timeout(request.deadline_s):
                    self.waiting += 1
                    try:
                        await self._slots.acquire()
                    finally:
                        self.waiting -= 1
                    try:
                        await self._generate(request, request_id, target, received_at)
                    finally:
                        self._slots.release()
            except TimeoutError:
                raise _deadline_exceeded(request) from None
        except asyncio.CancelledError:
            if not running.cancelled:
                raise  # the coordinator is stopping
            log.info("request %s cancelled by its client", request_id)
            await self._send(target, protocol.error_message(request_id, "cancelled", "cancelled by the client"))
        except RequestError as exc:
            log.info("request %s: %s: %s", request_id, exc.code, exc.message)
            await self._send(target, protocol.error_message(request_id, exc.code, exc.message))
        except LimeError as exc:
            log.error("request %s failed: %s", request_id, exc)
            await self._send(target, protocol.error_message(request_id, exc.code, str(exc)))
        except Exception as exc:  # the supervisor of one request: the client still gets an answer
            log.exception("request %s failed", request_id)
            await self._send(target, protocol.error_message(request_id, "internal_error", str(exc)))
        finally:
            self.served += 1
            if self.by_client_id.get(request_id) is running:
                del self.by_client_id[request_id]

    def _cancel(self, request_id: str) -> None:
        """A client's cancel: stop its request wherever it is (waiting, queued, generating);
        the request's own cleanup frees its KV cache on every device."""
        running = self.by_client_id.get(request_id)
        if running is None or running.cancelled:
            log.info("cancel for %s, which is not running here", request_id)
            return
        running.cancelled = True
        running.task.cancel()

    def _prompt_ids(self, request: Request) -> list[int]:
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("invalid_request", "this model has no chat template; send 'prompt'")
            text = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        return [int(i) for i in ids]

    async def _generate(self, request: Request, client_id: str, target: ReplyTarget, started: float) -> None:
        """Prefill and decode one request; ``client_id`` is echoed in every message."""
        prompt_ids = self._prompt_ids(request)
        if len(prompt_ids) >= self.context_length:
            raise RequestError(
                "prompt_too_long",
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context_length}",
            )
        plan = await self._wait_ready()
        max_new = min(request.max_tokens, self.context_length - len(prompt_ids))
        kv_tokens = len(prompt_ids) + max_new  # the most this request can hold in every KV owner

        async def queued(position: int) -> None:
            log.info("request %s waits for %d tokens of KV cache, place %d", client_id, kv_tokens, position)
            await self._send(target, protocol.queued_message(client_id, position, kv_tokens, self.admission.capacity))

        async with self.admission.reserve(kv_tokens, queued):
            plan = await self._wait_ready()  # the plan may have changed while it waited
            await self._decode(request, client_id, target, started, prompt_ids, max_new, plan)

    async def _decode(
        self, request: Request, client_id: str, target: ReplyTarget, started: float, prompt_ids: list[int],
        max_new: int, plan: Plan,
    ) -> None:
        active = _Active(request, uuid.uuid4().hex, plan)
        self.active[active.rid] = active
        self.peak_active = max(self.peak_active, len(self.active))
        sampling = Sampling(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed if request.seed is not None else random.getrandbits(62),
        )
        stream = TextStream(self.tokenizer, request.stop)
        logits: list[list[float]] = []
        first_at = last_at = started
        steps = 0
        finish_reason = "length"
        chunks = sent_tokens = 0  # chunks sent, and how many token ids they carried
        pos = 0
        try:
            for step in range(max_new):
                if request.deadline_s is not None and time.perf_counter() - started > request.deadline_s:
                    # Also checked here: on Python 3.11 a cancellation that lands just as an
                    # awaited publish completes can be lost, and with it the deadline's.
                    raise _deadline_exceeded(request)
                result = await self._advance(active, step, pos, stream.token_ids[-1:],
                                             lambda: prompt_ids + stream.token_ids, sampling)
                last_at, steps = time.perf_counter(), steps + 1
                if step == 0:
                    first_at = last_at
                if request.return_logits and result.logits is not None:
                    logits.append([float(v) for v in result.logits.tolist()])
                token = int(result.token)  # type: ignore[arg-type]
                if token in self.eos_ids:
                    finish_reason = "stop"
                    break
                piece = stream.add(token)
                if request.stream and piece:
                    await self._send(target, protocol.chunk_message(client_id, chunks, piece,
                                                                    stream.token_ids[sent_tokens:]))
                    chunks, sent_tokens = chunks + 1, len(stream.token_ids)
                if stream.stopped:
                    finish_reason = "stop"
                    break
                pos = len(prompt_ids) + len(stream.token_ids) - 1  # where the token just chosen goes
            tail = stream.finish()
            if request.stream and (tail or sent_tokens < len(stream.token_ids)):
                await self._send(target, protocol.chunk_message(client_id, chunks, tail,
                                                                stream.token_ids[sent_tokens:]))
        finally:
            self.active.pop(active.rid, None)
            await self._end_on_devices(active)
        timings = {  # from the request's arrival; tpot: mean time of the steps after the first
            "ttft_ms": round((first_at - started) * 1000, 3),
            "tpot_ms": round((last_at - first_at) * 1000 / max(1, steps - 1), 3),
            "total_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        await self._send(
            target,
            protocol.final_message(client_id, stream.text, stream.token_ids, finish_reason, len(prompt_ids),
                                   timings, logits if request.return_logits else None),
        )

    async def _advance(
        self, active: _Active, step: int, pos: int, inputs: list[int], history: Callable[[], list[int]],
        sampling: Sampling,
    ) -> Envelope:
        """Run step ``step`` and return its result: with ``pos`` 0 a prefill of ``history()``
        (every token id of the sequence so far), else a decode step of ``inputs`` at ``pos``.

        If the plan breaks on the way (a device left, a new plan came), the whole history is
        replayed as a prefill on the next plan, under a new id on the devices and the same
        step number, so the token chosen is the one the old plan would have given."""
        while True:
            try:
                if pos:
                    return await self._step(active, step, pos, inputs, sampling)
                ids = history()
                start = await self._prefill_leading_chunks(active, ids, sampling)
                return await self._step(active, step, start, ids[start:], sampling)
            except _PlanLost:
                lost = active.plan
                active.plan = await self._next_plan(lost)
                await self._end_on_devices(active, lost)  # whatever is left of it there
                self.active.pop(active.rid, None)
                active.rid = uuid.uuid4().hex
                self.active[active.rid] = active
                pos = 0
                log.warning("plan %d broke at step %d of a request; replaying its %d tokens on plan %d as %s",
                            lost.epoch, step, len(history()), active.plan.epoch, active.rid)

    async def _end_on_devices(self, active: _Active, plan: Plan | None = None) -> None:
        """Tell every device to free this request's state (its KV cache)."""
        end = Envelope(kind="end", request_id=active.rid, step=0, epoch=(plan or active.plan).epoch)
        await self.transport.publish(self.topics.control, end.encode(), qos=1)

    async def _prefill_leading_chunks(self, active: _Active, ids: list[int], sampling: Sampling) -> int:
        """Send all but the last chunk of a long prefill, one after the other, so that the
        decode steps of other requests pass between them; returns where the last one starts."""
        if not self.prefill_chunk or len(ids) <= self.prefill_chunk:
            return 0
        starts = list(range(0, len(ids), self.prefill_chunk))[:-1]
        for number, start in enumerate(starts):
            step = number - len(starts)  # -n .. -1: no token comes of these
            await self._step(active, step, start, ids[start : start + self.prefill_chunk], sampling)
        return starts[-1] + self.prefill_chunk

    async def _step(self, active: _Active, step: int, pos: int, inputs: list[int], sampling: Sampling) -> Envelope:
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        active.pending[step] = future
        rid, plan = active.rid, active.plan
        envelope = Envelope(
            kind="step", request_id=rid, step=step, epoch=plan.epoch, pos=pos, tokens=inputs,
            sampling=sampling, want_logits=active.request.return_logits, reply=self.results_topic,
        )
        # A step may be lost (QoS 0): send it again, under the same identity, when no answer
        # comes in time. Devices recompute a repeated step from the same cache position.
        retry_s = self.step_retry_s + PREFILL_RETRY_S_PER_TOKEN * len(inputs)
        deadline = asyncio.get_running_loop().time() + self.step_timeout_s
        payload = envelope.encode()
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if self.plan is not plan or not self.plan_alive():
                        raise _PlanLost()
                    await self.transport.publish(self.topics.stage_in(0), payload, qos=STEP_QOS)
                    disturbance = self._disturbance_future()
                    waits: set[asyncio.Future[Any]] = {future, disturbance}
                    await asyncio.wait(waits, timeout=retry_s, return_when=asyncio.FIRST_COMPLETED)
                    if future.done():
                        result = future.result()
                        break
                    if disturbance.done():
                        if disturbance.result() == "resend":
                            log.info("request %s step %d: sending it again after a reconnect", rid, step)
                            continue
                        raise _PlanLost()
                    log.warning("request %s step %d: no answer in %.1f s, sending it again", rid, step, retry_s)
        except TimeoutError:
            raise RequestError(
                "stage_timeout", f"step {step} got no answer from the stages in {self.step_timeout_s:.0f} s"
            ) from None
        finally:
            active.pending.pop(step, None)
        error = result.meta.get("error") if result.meta else None
        if error:
            raise RequestError("stage_error", f"device {error.get('device_id')}: {error.get('message')}")
        if result.token is None and step >= 0:
            raise RequestError("stage_error", f"step {step} came back without a token")
        return result
