"""A weight source: serves one model folder's manifest and tensor bytes over MQTT.

A coordinator (by default) or a ``--serve-weights`` device runs one; devices started with
``--weights-from-broker`` ask it for exactly their stage's tensors (``weights/fetch.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from lime_mqtt.core.errors import BadWeightMessage, ConfigError
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.core.weight_messages import (
    CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    WeightRequest,
    decode_weights_request,
    encode_reply,
    valid_client,
)
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.transport.base import Transport
from lime_mqtt.weights.files import build_manifest, read_range

log = logging.getLogger(__name__)


class WeightSource:
    """Serves one model folder's manifest and tensor bytes to one cluster, over its own connection.

    Requests are handled one at a time, in arrival order; a tensor request is answered
    with up to ``length`` bytes in chunks of ``chunk_bytes``. Requests for another model
    are left to the sources of that model.
    """

    def __init__(
        self,
        transport: Transport,
        cluster: str,
        model_folder: Path,
        *,
        model_id: str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        identity: Identity | None = None,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be from 1 to {MAX_CHUNK_BYTES} (what fetchers accept), "
                              f"not {chunk_bytes}")
        self.topics = Topics(cluster)
        # Who it answers as: the process's own identity (a coordinator's, or a device's that
        # has the model files); anonymous sources are named by a random coordinator name.
        self.identity = identity or Identity("coordinator", f"weights-{uuid.uuid4().hex[:8]}")
        self.checkpoint = Checkpoint(model_folder)
        self.model_id = model_id or self.checkpoint.folder.name
        self.chunk_bytes = chunk_bytes
        self.manifest: dict[str, Any] | None = None
        self.bytes_served = 0  # tensor bytes published
        self.requests_answered = 0  # requests that got a reply (manifest, chunks or error)
        self.serving = asyncio.Event()  # set once requests are subscribed to
        # Reconnects by itself (a broker restart): its subscription is restored, and a
        # fetcher asks again for what it did not get.
        self.transport = transport.connection(f"lime-weights-{cluster}-{uuid.uuid4().hex[:8]}", reconnect=True)

    def __repr__(self) -> str:
        return (f"WeightSource({self.model_id!r}, cluster={self.topics.cluster!r}, "
                f"answered={self.requests_answered}, bytes_served={self.bytes_served})")

    async def run(self) -> None:
        """Serve until cancelled (the manifest is built first, in a thread)."""
        if self.manifest is None:
            self.manifest = await asyncio.to_thread(build_manifest, self.checkpoint, self.model_id)
        async with self.transport:
            await self.transport.subscribe(self.topics.all_weights_requests, qos=1)
            self.serving.set()
            log.info("serving the weights of %s on %s as %s", self.model_id, self.topics.all_weights_requests,
                     self.identity)
            try:
                async for message in self.transport.messages():
                    route = self.topics.parse(message.topic)
                    if route is None or route.kind != "weights" or route.sender.role != "device":
                        continue
                    await self._handle(message.payload, route.sender.name)
            finally:
                self.serving.clear()

    async def _handle(self, payload: bytes, device_id: str) -> None:
        """Answer one request of device ``device_id``, always on that device's reply
        topics. A malformed one is refused with an error reply if it names a valid fetch
        tag, else dropped; a request for another model is left to that model's sources."""
        try:
            request = decode_weights_request(payload)
        except BadWeightMessage as exc:
            body = _json_object(payload)
            reply = body.get("reply")
            if not isinstance(reply, str) or not valid_client(reply):
                log.warning("ignoring a weights request of %s (%s) with no valid reply tag", device_id, exc)
                return
            if isinstance(body.get("model"), str) and body["model"] != self.model_id:
                return
            topic = self.topics.weights_reply(self.identity, device_id, reply)
            await self._refuse(body["id"] if isinstance(body.get("id"), str) else "", topic, str(exc))
            return
        if request.model != self.model_id:
            log.debug("ignoring a weights request for model %s", request.model)
            return
        topic = self.topics.weights_reply(self.identity, device_id, request.reply)
        if request.op == "manifest":
            await self._send(topic, encode_reply(request.id, "manifest", manifest=self.manifest))
        else:
            await self._serve_tensor(request, topic)

    async def _send(self, topic: str, payload: bytes) -> None:
        await self.transport.publish(topic, payload, qos=1)
        self.requests_answered += 1

    async def _refuse(self, request_id: str, topic: str, message: str) -> None:
        log.warning("weights request %s: %s", request_id, message)
        await self._send(topic, encode_reply(request_id, "error", message=message))

    async def _serve_tensor(self, request: WeightRequest, topic: str) -> None:
        name = request.name or ""
        info = self.checkpoint.tensors.get(name)
        if info is None:
            await self._refuse(request.id, topic, f"model {self.model_id!r} has no tensor {name!r}")
            return
        if not 0 <= request.offset < info.nbytes:
            await self._refuse(request.id, topic,
                               f"offset {request.offset} is out of range for tensor {name!r} of {info.nbytes} bytes")
            return
        end = info.nbytes if request.length is None else min(info.nbytes, request.offset + request.length)
        for start in range(request.offset, end, self.chunk_bytes):
            size = min(self.chunk_bytes, end - start)
            try:
                data = await asyncio.to_thread(read_range, info.file, info.offset + start, size)
            except OSError as exc:
                await self._refuse(request.id, topic, f"cannot read tensor {name!r}: {exc}")
                return
            if len(data) != size:
                await self._refuse(request.id, topic, f"{info.file.name} ends inside tensor {name!r}")
                return
            chunk = encode_reply(request.id, "chunk", name=name, offset=start, total=info.nbytes, data=data)
            await self.transport.publish(topic, chunk, qos=1)
            self.bytes_served += size
        self.requests_answered += 1


def _json_object(payload: bytes) -> dict[str, Any]:
    """The JSON object in ``payload``, or an empty one (to find where to refuse a bad request)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}
