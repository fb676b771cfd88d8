"""Intake: request messages in, replies out.

Each message on a client's request topic (``client/{name}/requests``: the topic says who
sent it) is a request (served as a task of its own), a cancel (``{"cancel": id}``) or a
resume (``{"resume": id, "after": n}``, from a client that lost its connection). Request
ids belong to their client: a client can cancel or resume only its own requests, and its
answers go only to its own answer topics. Every request gets a whole answer or one error
message, never silence.
What was sent about each request is kept, so that a client that reconnects gets what it
missed; the answers of the last ``KEPT_ANSWERS`` requests are kept after they end.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lime_mqtt.coordinator.generation import Generation, deadline_exceeded
from lime_mqtt.coordinator.ratelimit import ClientRates
from lime_mqtt.core import protocol
from lime_mqtt.core.errors import LimeError, RequestError
from lime_mqtt.core.topics import Topics, valid_arg
from lime_mqtt.transport.base import Connection, Message

log = logging.getLogger(__name__)

# Answers kept for clients that reconnect and ask again (resume): the most recent ones.
KEPT_ANSWERS = 32


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


class Intake:
    def __init__(
        self, connection: Connection, topics: Topics, name: str, generation: Generation, *, max_concurrent: int,
        max_waiting: int, limits: protocol.Limits | None = None, owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.connection = connection
        self.topics = topics
        self.name = name  # the coordinator's, which its answers go out under
        self.limits = limits or protocol.Limits()
        self.rates = ClientRates(self.limits.client_rate, self.limits.client_burst)
        self.generation = generation
        # Whether this coordinator serves the request of this key, when several serve the
        # cluster (docs/faults.md#two-coordinators); by default, every request.
        self.owns = owns or (lambda key: True)
        self._slots = asyncio.Semaphore(max_concurrent)  # wakes waiters first come, first served
        self.max_waiting = max_waiting
        self.waiting = 0  # requests received and not yet generating
        self.served = 0
        self.by_client_id: dict[tuple[str, str], _Running] = {}  # (client, id): for cancelling
        self.sent: collections.OrderedDict[tuple[str, str], _Sent] = collections.OrderedDict()  # for resuming

    def __repr__(self) -> str:
        return f"Intake(running={len(self.by_client_id)}, waiting={self.waiting}, served={self.served})"

    async def serve(self, message: Message, client: str) -> None:
        """Answer one request message of ``client``: a whole answer or one error, never silence."""
        received_at = time.perf_counter()
        if not self.rates.take(client):
            self.generation.stats.error("rate_limited")
            if self.rates.should_warn(client):
                log.warning("client %s sends more than %g messages per second; dropping (%d so far)", client,
                            self.limits.client_rate, self.rates.dropped(client))
                await self._send((client, "rate-limited"), ReplyTarget(
                    self.topics.answer(self.name, client, "rate-limited"), message.correlation_data),
                    protocol.error_message(None, "rate_limited", f"more than {self.limits.client_rate:g} messages "
                                           "per second from this client: dropped; send more slowly"))
            return
        raw = None
        if len(message.payload) <= self.limits.max_request_bytes:  # else parse_request says so
            try:
                raw = json.loads(message.payload)
            except (ValueError, RecursionError):  # parse_request below says why, to the client
                pass
        if (victim := protocol.cancel_target(message.payload)) is not None:
            self.cancel(client, victim)
            return
        resumed: protocol.Resume | None = None
        if (resume := protocol.resume_target(message.payload)) is not None:
            if await self._resume(client, resume) or resume.request is None:
                return
            if not self.owns(f"{client}/{resume.request_id}"):
                return  # another coordinator takes it up
            # The broker took the request, then lost it (a restart before it was delivered),
            # or the coordinator that served it is gone: continue after what the client has.
            log.info("request %s: first heard of in a resume after chunk %d (%d tokens); serving it",
                     resume.request_id, resume.after, len(resume.token_ids))
            raw = {**resume.request, "id": resume.request_id}
            message = Message(message.topic, json.dumps(raw).encode(), response_topic=message.response_topic,
                              correlation_data=message.correlation_data)
            resumed = resume
        client_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        if client_id is not None and not valid_arg(client_id):
            client_id = None  # not a topic level: parse_request says so, under a generated id
        if resumed is None and not self.owns(f"{client}/{client_id or hashlib.sha256(message.payload).hexdigest()}"):
            log.debug("a request of %s is another coordinator's to serve", client)
            return
        request_id = client_id or uuid.uuid4().hex
        key = (client, request_id)
        if key in self.by_client_id:
            log.info("request %s of %s is already being served; ignoring a second copy", request_id, client)
            return
        target = ReplyTarget(self.topics.answer(self.name, client, request_id), message.correlation_data)
        task = asyncio.current_task()
        assert task is not None
        running = self.by_client_id[key] = _Running(task)

        async def send(reply: dict[str, Any]) -> None:
            await self._send(key, target, reply)

        try:
            request = protocol.parse_request(message.payload, self.limits.max_request_bytes)
            waiting = self.waiting + self.generation.admission.waiting
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
                        await self.generation.generate(
                            request, request_id, send, received_at,
                            resumed=list(resumed.token_ids) if resumed else [],
                            first_chunk=resumed.after + 1 if resumed else 0)
                    finally:
                        self._slots.release()
            except TimeoutError:
                raise deadline_exceeded(request) from None
        except asyncio.CancelledError:
            if not running.cancelled:
                raise  # the coordinator is stopping
            log.info("request %s cancelled by its client", request_id)
            self.generation.stats.error("cancelled")
            await send(protocol.error_message(request_id, "cancelled", "cancelled by the client"))
        except RequestError as exc:
            log.info("request %s: %s: %s", request_id, exc.code, exc.message)
            self.generation.stats.error(exc.code)
            await send(protocol.error_message(request_id, exc.code, exc.message))
        except LimeError as exc:
            log.error("request %s failed: %s", request_id, exc)
            self.generation.stats.error(exc.code)
            await send(protocol.error_message(request_id, exc.code, str(exc)))
        except Exception as exc:  # the supervisor of one request: the client still gets an answer
            log.exception("request %s failed", request_id)
            self.generation.stats.error("internal_error")
            await send(protocol.error_message(request_id, "internal_error", str(exc)))
        finally:
            self.served += 1
            if self.by_client_id.get(key) is running:
                del self.by_client_id[key]

    def cancel(self, client: str, request_id: str) -> None:
        """A client's cancel of one of its own requests: stop it wherever it is (waiting,
        queued, generating); the request's own cleanup frees its KV cache on every device."""
        running = self.by_client_id.get((client, request_id))
        if running is None or running.cancelled:
            log.info("cancel from %s for %s, which is not one of its requests running here", client, request_id)
            return
        running.cancelled = True
        running.task.cancel()

    async def _send(self, key: tuple[str, str], target: ReplyTarget, message: dict[str, Any]) -> None:
        sent = self.sent.get(key)
        if sent is None or sent.target != target:
            sent = self.sent[key] = _Sent(target)
        sent.messages.append(message)
        if message["type"] in ("final", "error"):
            sent.done = True
            self.sent.move_to_end(key)
            while len(self.sent) > KEPT_ANSWERS and next(iter(self.sent.values())).done:
                self.sent.popitem(last=False)
        await self.connection.publish(
            target.topic, protocol.dumps(message), qos=1, correlation_data=target.correlation_data
        )

    async def _resume(self, client: str, resume: protocol.Resume) -> bool:
        """Send a reconnected client what it missed of one of its requests; ``False`` if
        this coordinator never heard of the request (then the caller may serve it as new)."""
        key = (client, resume.request_id)
        sent = self.sent.get(key)
        if sent is None:
            return key in self.by_client_id  # running, nothing sent yet: nothing missed
        again = [m for m in list(sent.messages) if m["type"] != "chunk" or m["index"] > resume.after]
        log.info("request %s: a client asks again after chunk %d: %d messages", resume.request_id, resume.after,
                 len(again))
        for message in again:
            await self.connection.publish(sent.target.topic, protocol.dumps(message), qos=1,
                                          correlation_data=sent.target.correlation_data)
        return True
