"""The coordinator: takes requests, drives prefill and decode through the stages, streams answers.

It holds every request's token history, so the answer is whole even though the
devices only ever see activations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lime_mqtt import protocol
from lime_mqtt.admission import KvAdmission
from lime_mqtt.errors import LimeError, RequestError, WireError
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.plan import Plan
from lime_mqtt.protocol import Request
from lime_mqtt.textstream import TextStream
from lime_mqtt.topics import STEP_QOS, Topics, device_id_from_status_topic, parse_status
from lime_mqtt.transport import LastWill, Message, MqttTransport
from lime_mqtt.weights import WeightSource
from lime_mqtt.wire import Envelope, Sampling

log = logging.getLogger(__name__)

# A prefill of many tokens legitimately takes longer: add this much retry patience per token.
PREFILL_RETRY_S_PER_TOKEN = 0.02


@dataclass(frozen=True)
class ReplyTarget:
    topic: str
    correlation_data: bytes | None = None


@dataclass
class _Running:
    """A request being served, as a task a client's cancel message can stop."""

    task: asyncio.Task[Any]
    cancelled: bool = False


@dataclass
class _Active:
    """A request being answered, and the futures of its steps waiting for their token."""

    request: Request
    pending: dict[int, asyncio.Future[Envelope]] = field(default_factory=dict)


class Coordinator:
    def __init__(
        self,
        broker: str,
        cluster: str,
        model_folder: Path,
        *,
        step_timeout_s: float = 60.0,
        step_retry_s: float = 5.0,
        ready_timeout_s: float = 30.0,
        max_concurrent: int = 8,
        max_waiting: int = 1024,
        prefill_chunk: int = 256,
        serve_weights: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.topics = Topics(cluster)
        self.checkpoint = Checkpoint(model_folder)
        self.model_id = self.checkpoint.folder.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint.folder)
        self.admission = KvAdmission()
        self.weight_source: WeightSource | None = None
        if serve_weights:
            self.weight_source = WeightSource(broker, cluster, self.checkpoint.folder, model_id=self.model_id,
                                              username=username, password=password)
        self.context_length = int(self.checkpoint.config_dict.get("max_position_embeddings", 2048))
        self.eos_ids = self._eos_ids()
        self.step_timeout_s = step_timeout_s
        self.step_retry_s = step_retry_s
        self.ready_timeout_s = ready_timeout_s
        self.name = f"coord-{uuid.uuid4().hex[:8]}"
        self.results_topic = f"{self.topics.results}/{self.name}"
        self.plan: Plan | None = None
        self.device_status: dict[str, dict[str, Any]] = {}
        self.planner_message: str | None = None  # the planner's word on why there is no plan
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
        self.serving = asyncio.Event()  # set once requests are subscribed to
        # Retained while serving; a clean exit or the last will (empty, retained) clears it.
        will = LastWill(self.topics.coordinator_status(self.name), b"")
        self.transport = MqttTransport(
            broker, client_id=f"lime-{self.name}", will=will, username=username, password=password
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
            async with self._changed:
                self.plan = plan
                self.admission.set_capacity(plan.kv_token_capacity)
                self._changed.notify_all()
        elif message.topic == self.topics.planner_status:
            try:
                self.planner_message = str(json.loads(message.payload).get("message")) if message.payload else None
            except (ValueError, AttributeError):
                log.warning("ignoring a malformed planner status")
        elif (device_id := device_id_from_status_topic(message.topic)) is not None:
            status = parse_status(message.payload)
            if status is None:
                log.warning("ignoring a malformed status of %s", device_id)
                return
            async with self._changed:
                self.device_status[device_id] = status
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

    async def _wait_ready(self) -> Plan:
        async with self._changed:
            if self.plan is None:
                why = self.planner_message or "no planner has reported yet"
                raise RequestError("no_plan", f"no plan yet: {why}")
            try:
                async with asyncio.timeout(self.ready_timeout_s):
                    await self._changed.wait_for(self.plan_ready)
            except TimeoutError:
                raise RequestError(
                    "not_ready", f"the devices of plan {self.plan.epoch} did not become ready in "
                    f"{self.ready_timeout_s:.0f} s"
                ) from None
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
        await self.transport.publish(
            target.topic, protocol.dumps(message), qos=1, correlation_data=target.correlation_data
        )

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
        client_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        request_id = client_id or uuid.uuid4().hex
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
                raise RequestError(
                    "deadline_exceeded", f"no complete answer within the request's deadline of {request.deadline_s} s"
                ) from None
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
        rid = uuid.uuid4().hex
        active = self.active[rid] = _Active(request)
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
        try:
            pos = await self._prefill_leading_chunks(active, rid, plan, prompt_ids, sampling)
            inputs = prompt_ids[pos:]
            for step in range(max_new):
                result = await self._step(active, rid, plan, step, pos, inputs, sampling)
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
                pos += len(inputs)
                inputs = [token]
            tail = stream.finish()
            if request.stream and (tail or sent_tokens < len(stream.token_ids)):
                await self._send(target, protocol.chunk_message(client_id, chunks, tail,
                                                                stream.token_ids[sent_tokens:]))
        finally:
            del self.active[rid]
            end = Envelope(kind="end", request_id=rid, step=0, epoch=plan.epoch)
            await self.transport.publish(self.topics.control, end.encode(), qos=1)
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

    async def _prefill_leading_chunks(
        self, active: _Active, rid: str, plan: Plan, prompt_ids: list[int], sampling: Sampling
    ) -> int:
        """Send all but the last chunk of a long prompt, one after the other, so that the
        decode steps of other requests pass between them; returns where the last one starts."""
        if not self.prefill_chunk or len(prompt_ids) <= self.prefill_chunk:
            return 0
        starts = list(range(0, len(prompt_ids), self.prefill_chunk))[:-1]
        for number, start in enumerate(starts):
            step = number - len(starts)  # -n .. -1: no token comes of these
            await self._step(active, rid, plan, step, start, prompt_ids[start : start + self.prefill_chunk], sampling)
        return starts[-1] + self.prefill_chunk

    async def _step(
        self, active: _Active, rid: str, plan: Plan, step: int, pos: int, inputs: list[int], sampling: Sampling
    ) -> Envelope:
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        active.pending[step] = future
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
                    await self.transport.publish(self.topics.stage_in(0), payload, qos=STEP_QOS)
                    done, _ = await asyncio.wait({future}, timeout=retry_s)
                    if done:
                        result = future.result()
                        break
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
