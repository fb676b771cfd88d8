"""Generation: one request's prefill and decode through the stages of the plan.

A step is sent to the first stage and its answer (a token from the last stage) awaited;
a step whose answer does not come is sent again under the same identity (devices rerun
the latest step from the same cache position). Chained (the default, ``wire.Chain``), the
coordinator sends only a request's first step: the last stage starts each next decode
step itself, straight to the first stage, and the coordinator awaits its token; a chain
that broke (a token that came after a later one, a reconnect, a step answered by none of
two sends) is replayed under a new id, and a request whose chain broke for want of an
answer goes on unchained. When the plan breaks on the way (a
device left, a new plan came), the request's whole token history is replayed as a
prefill on the next plan, under a new id on the devices and the same step number, so
the token chosen is the one the old plan would have given. Long prompts go in chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lime_mqtt.coordinator.admission import KvAdmission
from lime_mqtt.coordinator.plans import PlanWatch
from lime_mqtt.coordinator.stats import RequestStats
from lime_mqtt.coordinator.textstream import TextStream
from lime_mqtt.core import protocol
from lime_mqtt.core.errors import RequestError
from lime_mqtt.core.plan import Plan
from lime_mqtt.core.protocol import Request
from lime_mqtt.core.topics import STEP_QOS, Identity, Topics
from lime_mqtt.core.wire import MAX_CHAIN_STOP, Chain, End, Sampling, StageError, Step, Token, decode_envelope
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.planning.cost import PREFILL_LINK_BUDGET_MS, link_chunk_tokens
from lime_mqtt.transport.base import Connection

log = logging.getLogger(__name__)

# A prefill of many tokens legitimately takes longer: add this much retry patience per token.
PREFILL_RETRY_S_PER_TOKEN = 0.02

Send = Callable[[dict[str, Any]], Awaitable[None]]  # one message to the request's client


def deadline_exceeded(request: Request) -> RequestError:
    return RequestError("deadline_exceeded",
                        f"no complete answer within the request's deadline of {request.deadline_s} s")


class _PlanLost(Exception):
    """The plan a step was sent under changed, or one of its devices left: replay on the next."""


class _ChainBroken(Exception):
    """A chained request's steps went astray: replay it on the same plan."""


@dataclass
class Active:
    """A request being answered: the plan it runs under, its id on the devices (a new one
    each time it is replayed on another plan), and the futures of its steps in flight."""

    request: Request
    rid: str
    plan: Plan
    pending: dict[int, asyncio.Future[Token | StageError]] = field(default_factory=dict)
    chain: Chain | None = None  # the last stage starts each next decode step (wire.Chain)
    chained: int | None = None  # the step the chain has started (the coordinator sends none)
    early: dict[int, Token | StageError] = field(default_factory=dict)  # chained answers before their turn

    def replayed(self, rid: str) -> None:
        """Under a new id on the devices: what the old one had on its way is forgotten."""
        self.rid, self.chained = rid, None
        self.early.clear()


@dataclass(frozen=True)
class Timing:
    """How long steps may take before they are sent again, and before the request fails."""

    step_timeout_s: float = 60.0
    step_retry_s: float = 5.0


class Generation:
    """Runs requests on the plan of a :class:`PlanWatch`, one task per request."""

    def __init__(
        self, connection: Connection, topics: Topics, name: str, watch: PlanWatch, checkpoint: Checkpoint,
        tokenizer: Any, *, timing: Timing, prefill_chunk: int, max_prompt_tokens: int | None = None,
        prefill_link_ms: float = PREFILL_LINK_BUDGET_MS, chain: bool = True,
    ) -> None:
        if prefill_chunk < 0:
            raise ValueError("prefill_chunk must be 0 (never cut) or a number of tokens")
        if not math.isfinite(prefill_link_ms) or prefill_link_ms < 0:
            raise ValueError("prefill_link_ms must be 0 (links do not matter) or a number of milliseconds")
        self.connection = connection
        self.topics = topics
        self.name = name  # the coordinator's: the last stage answers to it
        self.me = Identity("coordinator", name)
        self.watch = watch
        self.tokenizer = tokenizer
        self.timing = timing
        self.prefill_chunk = prefill_chunk  # prompts longer than this go in chunks of this size
        self.prefill_link_ms = prefill_link_ms  # or smaller, so that a chunk crosses the slowest link in this time
        self.hidden_bytes_per_token = int(checkpoint.config_dict["hidden_size"]) * checkpoint.itemsize
        self.context_length = int(checkpoint.config_dict.get("max_position_embeddings", 2048))
        self.max_prompt_tokens = max_prompt_tokens  # a limit below the context, if set
        self.eos_ids = _eos_ids(checkpoint, tokenizer)
        self.chain = chain  # the last stage starts each next decode step itself (wire.Chain)
        stop = tuple(sorted(self.eos_ids))  # where a chain ends by itself (else at the request's End)
        self.chain_stop = stop if len(stop) <= MAX_CHAIN_STOP else ()
        self.admission = KvAdmission()
        self.active: dict[str, Active] = {}  # by the request's id on the devices
        self.peak_active = 0  # the most requests generating at once
        self.stats = RequestStats()  # what it answered, how fast, what it replayed (its telemetry)

    def __repr__(self) -> str:
        return f"Generation(active={len(self.active)}, peak={self.peak_active}, {self.admission!r})"

    def deliver(self, payload: bytes, sender: str) -> None:
        """A result from the last stage (or a device's stage error), sent by device
        ``sender``: wake the step that waits for it. A token counts only from the device
        that the request's plan puts last, an error only from a device of that plan (and
        naming itself). Malformed results raise :class:`WireError` for the caller to log."""
        envelope = decode_envelope(payload)
        if not isinstance(envelope, Token | StageError):
            return
        active = self.active.get(envelope.request_id)
        if active is not None and not _sent_by_plan(envelope, sender, active.plan):
            log.warning("ignoring a %s for request %s from device %s, which the plan of epoch %d does not "
                        "put there", envelope.kind, envelope.request_id, sender, active.plan.epoch)
            return
        if active is None:
            return
        future = active.pending.get(envelope.step)
        if future is not None:
            if not future.done():
                future.set_result(envelope)
        elif active.chain is not None and 0 <= envelope.step < active.chain.until:
            active.early[envelope.step] = envelope  # a chained step answered before its turn here

    def prompt_ids(self, request: Request) -> list[int]:
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

    async def generate(self, request: Request, client_id: str, send: Send, started: float,
                       resumed: list[int] | None = None, first_chunk: int = 0) -> None:
        """Prefill and decode one request; ``client_id`` is echoed in every message. With
        ``resumed`` (the tokens a client already has of this answer, from a coordinator that
        went away), the history of the prompt and those tokens is replayed and the answer
        goes on after them, its chunks numbered from ``first_chunk``."""
        prompt_ids = self.prompt_ids(request)
        if not prompt_ids:
            raise RequestError("invalid_request", "the prompt gives no tokens")
        if len(prompt_ids) >= self.context_length:
            raise RequestError(
                "prompt_too_long",
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context_length}",
            )
        if self.max_prompt_tokens is not None and len(prompt_ids) > self.max_prompt_tokens:
            raise RequestError(
                "prompt_too_long",
                f"the prompt has {len(prompt_ids)} tokens; this coordinator takes at most {self.max_prompt_tokens}",
            )
        plan = await self.watch.wait_ready()
        max_new = min(request.max_tokens, self.context_length - len(prompt_ids))
        kv_tokens = len(prompt_ids) + max_new  # the most this request can hold in every KV owner

        async def queued(position: int) -> None:
            log.info("request %s waits for %d tokens of KV cache, place %d", client_id, kv_tokens, position)
            await send(protocol.queued_message(client_id, position, kv_tokens, self.admission.capacity))

        async with self.admission.reserve(kv_tokens, queued):
            plan = await self.watch.wait_ready()  # the plan may have changed while it waited
            await self._decode(request, client_id, send, started, prompt_ids, max_new, plan, resumed or [],
                               first_chunk)

    async def _decode(
        self, request: Request, client_id: str, send: Send, started: float, prompt_ids: list[int],
        max_new: int, plan: Plan, resumed: list[int], first_chunk: int,
    ) -> None:
        chain = Chain(max_new, self.chain_stop) if self.chain else None
        active = Active(request, uuid.uuid4().hex, plan, chain=chain)
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
        for token in resumed[:max_new]:  # what the client has: its text was sent already
            stream.add(token)
        # chunks sent (the next one's index), and how many token ids they carried
        chunks, sent_tokens = first_chunk, len(stream.token_ids)
        pos = 0  # the first step prefills the whole history: the prompt and the resumed tokens
        try:
            for step in range(len(stream.token_ids), max_new if not stream.stopped else 0):
                if request.deadline_s is not None and time.perf_counter() - started > request.deadline_s:
                    # Also checked here: on Python 3.11 a cancellation that lands just as an
                    # awaited publish completes can be lost, and with it the deadline's.
                    raise deadline_exceeded(request)
                result = await self._advance(active, step, pos, stream.token_ids[-1:],
                                             lambda: prompt_ids + stream.token_ids, sampling)
                last_at, steps = time.perf_counter(), steps + 1
                if steps == 1:
                    first_at = last_at
                if request.return_logits and result.logits is not None:
                    logits.append([float(v) for v in result.logits.tolist()])
                token = int(result.token)  # type: ignore[arg-type]  # checked in _step
                if token in self.eos_ids:
                    finish_reason = "stop"
                    break
                piece = stream.add(token)
                if request.stream and piece:
                    await send(protocol.chunk_message(client_id, chunks, piece, stream.token_ids[sent_tokens:]))
                    chunks, sent_tokens = chunks + 1, len(stream.token_ids)
                if stream.stopped:
                    finish_reason = "stop"
                    break
                pos = len(prompt_ids) + len(stream.token_ids) - 1  # where the token just chosen goes
            tail = stream.finish()
            if request.stream and (tail or sent_tokens < len(stream.token_ids)):
                await send(protocol.chunk_message(client_id, chunks, tail, stream.token_ids[sent_tokens:]))
        finally:
            self.active.pop(active.rid, None)
            await self._end_on_devices(active)
        timings = {  # from the request's arrival; tpot: mean time of the steps after the first
            "ttft_ms": round((first_at - started) * 1000, 3),
            "tpot_ms": round((last_at - first_at) * 1000 / max(1, steps - 1), 3),
            "total_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        await send(protocol.final_message(client_id, stream.text, stream.token_ids, finish_reason, len(prompt_ids),
                                          timings, logits if request.return_logits else None))
        self.stats.answer(len(prompt_ids), len(stream.token_ids), timings["ttft_ms"], timings["tpot_ms"])

    async def _advance(
        self, active: Active, step: int, pos: int, inputs: list[int], history: Callable[[], list[int]],
        sampling: Sampling,
    ) -> Token:
        """Run step ``step`` and return its result: with ``pos`` 0 a prefill of ``history()``
        (every token id of the sequence so far), else a decode step of ``inputs`` at ``pos``.
        If the plan breaks on the way, the whole history is replayed on the next plan."""
        while True:
            try:
                if pos:
                    return await self._step(active, step, pos, inputs, sampling)
                ids = history()
                start = await self._prefill_leading_chunks(active, ids, sampling)
                return await self._step(active, step, start, ids[start:], sampling)
            except (_PlanLost, _ChainBroken) as exc:
                lost = active.plan
                if isinstance(exc, _PlanLost):
                    active.plan = await self.watch.next_plan(lost)
                await self._end_on_devices(active, lost)  # whatever is left of it there
                self.active.pop(active.rid, None)
                active.replayed(uuid.uuid4().hex)
                self.active[active.rid] = active
                pos = 0
                self.stats.replays += 1
                why = f"plan {lost.epoch} broke" if isinstance(exc, _PlanLost) else "the chain of steps broke"
                log.warning("%s at step %d of a request; replaying its %d tokens on plan %d as %s", why, step,
                            len(history()), active.plan.epoch, active.rid)

    async def _end_on_devices(self, active: Active, plan: Plan | None = None) -> None:
        """Tell every device to free this request's state (its KV cache)."""
        end = End(active.rid, (plan or active.plan).epoch)
        await self.connection.publish(self.topics.control(self.name), end.encode(), qos=1)

    def chunk_tokens(self, plan: Plan) -> int:
        """The prefill chunk under ``plan``: ``--prefill-chunk``, or fewer tokens when the
        hidden states of that many would take longer than ``--prefill-link-ms`` to cross
        the slowest link of the plan's devices, as they measured it
        (:func:`~lime_mqtt.planning.cost.link_chunk_tokens`). With one stage only token
        ids cross a link, and nothing is cut for it."""
        if len(plan.stages) < 2:
            return self.prefill_chunk
        links = []
        for device_id in {s.device_id for s in plan.stages}:
            status = self.watch.view.devices.get(device_id)
            mb_s = status.capabilities.get("link_mb_s") if status is not None else None
            if mb_s is not None:
                links.append(float(mb_s))
        return link_chunk_tokens(self.prefill_chunk, self.hidden_bytes_per_token, links, self.prefill_link_ms)

    async def _prefill_leading_chunks(self, active: Active, ids: list[int], sampling: Sampling) -> int:
        """Send all but the last chunk of a long prefill, one after the other, so that the
        decode steps of other requests pass between them; returns where the last one starts."""
        chunk = self.chunk_tokens(active.plan)
        if not chunk or len(ids) <= chunk:
            return 0
        starts = list(range(0, len(ids), chunk))[:-1]
        if chunk < self.prefill_chunk:
            log.info("a prompt of %d tokens goes in chunks of %d for the links of plan %d", len(ids), chunk,
                     active.plan.epoch)
        for number, start in enumerate(starts):
            step = number - len(starts)  # -n .. -1: no token comes of these
            await self._step(active, step, start, ids[start : start + chunk], sampling)
            self.stats.prefill_chunks += 1
        return starts[-1] + chunk

    async def _step(self, active: Active, step: int, pos: int, inputs: list[int], sampling: Sampling) -> Token:
        future: asyncio.Future[Token | StageError] = asyncio.get_running_loop().create_future()
        active.pending[step] = future
        early = active.early.pop(step, None)
        if early is not None:
            future.set_result(early)
        for stale in [s for s in active.early if s < step]:  # second answers of steps done
            del active.early[stale]
        rid, plan = active.rid, active.plan
        chain = active.chain if step >= 0 else None
        envelope = Step(rid, step, plan.epoch, pos, tokens=inputs, sampling=sampling,
                        want_logits=active.request.return_logits, reply=self.name, chain=chain)
        # A step may be lost (QoS 0): send it again, under the same identity, when no answer
        # comes in time. Devices recompute a repeated step from the same cache position.
        retry_s = self.timing.step_retry_s + PREFILL_RETRY_S_PER_TOKEN * len(inputs)
        deadline = asyncio.get_running_loop().time() + self.timing.step_timeout_s
        payload = envelope.encode()
        topic = self.topics.stage_in(self.me, plan.stages[0].device_id, 0)
        send = active.chained != step and not future.done()  # a chained step is on its way already
        sent_again = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if self.watch.plan is not plan or not self.watch.plan_alive():
                        raise _PlanLost()
                    if send:
                        await self.connection.publish(topic, payload, qos=STEP_QOS)
                    send = True
                    disturbance = self.watch.disturbance()
                    waits: set[asyncio.Future[Any]] = {future, disturbance}
                    if not future.done():
                        await asyncio.wait(waits, timeout=retry_s, return_when=asyncio.FIRST_COMPLETED)
                    if future.done():
                        result = future.result()
                        break
                    if disturbance.done():
                        if disturbance.result() == "resend":
                            if chain is not None:
                                raise _ChainBroken()  # a chain's step may have been lost anywhere on the way
                            log.info("request %s step %d: sending it again after a reconnect", rid, step)
                            continue
                        raise _PlanLost()
                    if chain is not None and (sent_again or any(s > step for s in active.early)):
                        # The chain went on without this token reaching here, or two sends of the
                        # step were not answered: replay; a chain that stalls goes on unchained.
                        log.warning("request %s step %d: the chain of steps broke; replaying", rid, step)
                        if sent_again:
                            active.chain = None
                        raise _ChainBroken()
                    sent_again += 1
                    log.warning("request %s step %d: no answer in %.1f s, sending it again", rid, step, retry_s)
        except TimeoutError:
            raise RequestError(
                "stage_timeout", f"step {step} got no answer from the stages in {self.timing.step_timeout_s:.0f} s"
            ) from None
        finally:
            active.pending.pop(step, None)
        if isinstance(result, StageError):
            raise RequestError("stage_error", f"device {result.device_id}: {result.message}")
        if result.token is None and step >= 0:
            raise RequestError("stage_error", f"step {step} came back without a token")
        if chain is not None and result.token is not None and chain.follows(step, result.token):
            active.chained = step + 1  # the last stage has sent it on
        return result


def _sent_by_plan(envelope: Token | StageError, sender: str, plan: Plan) -> bool:
    """Whether ``sender`` may send ``envelope`` under ``plan``: a token only the last stage's device."""
    if isinstance(envelope, StageError):
        return envelope.device_id == sender and any(s.device_id == sender for s in plan.stages)
    return plan.stages[-1].device_id == sender


def _eos_ids(checkpoint: Checkpoint, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (checkpoint.config_dict.get("eos_token_id"), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    gen_config = checkpoint.folder / "generation_config.json"
    if gen_config.is_file():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids

