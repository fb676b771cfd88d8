"""Fetching a model's tensors from a weight source, window by window, over MQTT.

:func:`fetch_manifest` asks for a model's manifest; :func:`fetch_tensors` for exactly the
tensors a device needs, each appended to its ``.part`` file, checked and written as its
own safetensors file (``weights/files.py``). Nothing received is pickled or
``torch.load``-ed: replies are decoded strictly (``core/weight_messages.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lime_mqtt.core.errors import BadWeightMessage, ConfigError, WeightsError
from lime_mqtt.core.topics import Topics
from lime_mqtt.core.weight_messages import (
    WEIGHTS_VERSION,
    ChunkReply,
    ErrorReply,
    ManifestReply,
    WeightReply,
    check_manifest,
    decode_weight_reply,
    valid_client,
)
from lime_mqtt.transport.base import Connection, Transport
from lime_mqtt.weights.files import PARTIAL_DIR, finish_tensor, is_complete, partial_path, tensor_path, write_config

log = logging.getLogger(__name__)

SOURCE_ROLES = ("coordinator", "device")  # the identities that may serve weights

WINDOW_BYTES = 8 << 20  # the most bytes one tensor request asks for (bounds what the broker queues)

Progress = Callable[[str, int, int], None]  # (tensor name, bytes done, tensor bytes)


@dataclass
class FetchStats:
    tensors_fetched: int = 0
    tensors_skipped: int = 0  # already on disk, complete
    bytes_received: int = 0  # tensor bytes appended, this run
    resumed_from: dict[str, int] = field(default_factory=dict)  # tensor -> bytes found in its .part
    hash_failures: int = 0


class _Replies:
    """Replies to this fetch, one request id at a time, each wait with a deadline. Only a
    coordinator or a device serves weights: a reply from any other identity is dropped
    (and every tensor is checked against the manifest's sha256 anyway)."""

    def __init__(self, conn: Connection, topics: Topics) -> None:
        self._conn = conn
        self._topics = topics
        self._messages = conn.messages()

    async def wait(self, request_id: str, timeout_s: float) -> WeightReply | None:
        """The next reply to ``request_id``; None if none comes within ``timeout_s``.
        Replies that do not decode are logged and dropped."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await anext(self._messages)
                    route = self._topics.parse(message.topic)
                    if route is None or route.kind != "weights_reply" or route.sender.role not in SOURCE_ROLES:
                        log.warning("ignoring weights on %s: only a coordinator or a device serves weights",
                                    message.topic)
                        continue
                    try:
                        reply = decode_weight_reply(message.payload)
                    except BadWeightMessage as exc:
                        log.warning("ignoring a weights reply: %s", exc)
                        continue
                    if reply.id == request_id:
                        return reply
        except TimeoutError:
            self._messages = self._conn.messages()  # the timeout ended the old generator
            return None

    async def aclose(self) -> None:
        await self._messages.aclose()


def _check_client(client: str) -> None:
    if not valid_client(client):
        raise ConfigError(f"weights client name {client!r} must be 1 to 128 characters without / + # or spaces")


async def fetch_manifest(
    transport: Transport,
    cluster: str,
    model_id: str,
    *,
    device_id: str,
    timeout_s: float = 30.0,
    client: str | None = None,
) -> dict[str, Any]:
    """The manifest of ``model_id`` from the first weight source that answers, asked as
    device ``device_id`` (the weights topics are under the device's name)."""
    client = client or f"manifest-{uuid.uuid4().hex[:12]}"
    _check_client(client)
    topics = Topics(cluster)
    request_id = uuid.uuid4().hex
    request = {"v": WEIGHTS_VERSION, "op": "manifest", "model": model_id, "reply": client, "id": request_id}
    async with transport.connection(f"lime-weights-{device_id}-{client}", reconnect=True) as conn:
        await conn.subscribe(topics.weights_inbox(device_id, client), qos=1)
        await conn.publish(topics.weights_request(device_id), json.dumps(request).encode(), qos=1)
        replies = _Replies(conn, topics)
        try:
            reply = await replies.wait(request_id, timeout_s)
        finally:
            await replies.aclose()
    if reply is None:
        raise WeightsError(
            f"no weight source answered for model {model_id!r} on cluster {cluster!r} within {timeout_s:g} s"
        )
    if isinstance(reply, ErrorReply):
        raise WeightsError(f"the weight source refused the manifest of {model_id!r}: {reply.message}")
    if not isinstance(reply, ManifestReply):
        raise WeightsError(f"expected a manifest, the weight source sent {reply.kind!r}")
    manifest = reply.manifest
    if manifest["model"] != model_id:
        raise WeightsError(f"asked for the manifest of {model_id!r}, got that of {manifest['model']!r}")
    return manifest


class _Fetcher:
    """Fetches tensors one by one over one connection into ``folder``."""

    def __init__(
        self, conn: Connection, topics: Topics, manifest: dict[str, Any], folder: Path, device_id: str, client: str,
        stats: FetchStats, chunk_timeout_s: float, max_retries: int, window_bytes: int, progress: Progress | None,
    ) -> None:
        self.conn = conn
        self.topics = topics
        self.model: str = manifest["model"]
        self.tensors: dict[str, dict[str, Any]] = manifest["tensors"]
        self.folder = folder
        self.device_id = device_id
        self.reply = client  # the fetch's tag: the last level of its reply topic
        self.stats = stats
        self.chunk_timeout_s = chunk_timeout_s
        self.max_retries = max_retries
        self.window_bytes = window_bytes
        self.progress = progress
        self.replies = _Replies(conn, topics)

    async def fetch(self, name: str) -> None:
        """Download, verify, write; on a hash mismatch, once more from the start."""
        entry = self.tensors[name]
        for attempt in (1, 2):
            await self._download(name, entry)
            if await asyncio.to_thread(finish_tensor, self.folder, name, entry):
                self.stats.tensors_fetched += 1
                return
            self.stats.hash_failures += 1
            log.warning("tensor %s failed its sha256 check (attempt %d of 2)", name, attempt)
        raise WeightsError(
            f"tensor {name!r} of model {self.model!r} failed its sha256 check twice "
            "(has the weight source's model changed since its manifest?)"
        )

    async def _download(self, name: str, entry: dict[str, Any]) -> None:
        """Append the tensor's missing bytes to its ``.part`` until it has them all."""
        total: int = entry["nbytes"]
        part = partial_path(self.folder, name)
        done = part.stat().st_size if part.exists() else 0
        if done > total:
            log.warning("discarding %s: longer than the tensor's %d bytes", part, total)
            part.unlink()
            done = 0
        if done:
            self.stats.resumed_from[name] = done
            log.info("resuming tensor %s at byte %d of %d", name, done, total)
        with part.open("ab") as fh:
            timeouts = 0
            while done < total:
                request_id = uuid.uuid4().hex
                end = min(total, done + self.window_bytes)
                await self._request(name, request_id, done, end - done)
                while done < end:
                    reply = await self.replies.wait(request_id, self.chunk_timeout_s)
                    if reply is None:
                        timeouts += 1
                        if timeouts > self.max_retries:
                            raise WeightsError(
                                f"no data for tensor {name!r} of model {self.model!r} at byte {done}: "
                                f"{timeouts} waits of {self.chunk_timeout_s:g} s went unanswered "
                                "(is a weight source for this model running?)"
                            )
                        log.warning("no data for tensor %s at byte %d within %g s; asking again",
                                    name, done, self.chunk_timeout_s)
                        break  # ask again from `done`, under a new request id
                    data = self._data_of(reply, name, total, done)
                    if data is None:
                        continue
                    fh.write(data)
                    done += len(data)
                    self.stats.bytes_received += len(data)
                    timeouts = 0
                    if self.progress is not None:
                        self.progress(name, done, total)

    def _data_of(self, reply: WeightReply, name: str, total: int, done: int) -> bytes | None:
        """The bytes of a chunk that continues the ``.part`` exactly; None for anything to ignore."""
        if isinstance(reply, ErrorReply):
            raise WeightsError(f"the weight source cannot send tensor {name!r}: {reply.message}")
        if not isinstance(reply, ChunkReply) or reply.name != name:
            return None
        if reply.total != total:
            raise WeightsError(
                f"the weight source has {reply.total} bytes of tensor {name!r}, the manifest says {total}"
            )
        if reply.offset != done or not reply.data:
            log.debug("ignoring a chunk of %s at %r (have %d bytes)", name, reply.offset, done)
            return None
        return reply.data

    async def _request(self, name: str, request_id: str, offset: int, length: int) -> None:
        body = {"v": WEIGHTS_VERSION, "op": "tensor", "model": self.model, "name": name, "offset": offset,
                "length": length, "reply": self.reply, "id": request_id}
        await self.conn.publish(self.topics.weights_request(self.device_id), json.dumps(body).encode(), qos=1)

    async def aclose(self) -> None:
        await self.replies.aclose()


async def fetch_tensors(
    transport: Transport,
    cluster: str,
    manifest: dict[str, Any],
    names: Iterable[str],
    folder: Path,
    *,
    device_id: str,
    client: str,
    chunk_timeout_s: float = 10.0,
    max_retries: int = 5,
    window_bytes: int = WINDOW_BYTES,
    progress: Progress | None = None,
) -> FetchStats:
    """Fetch ``names`` of ``manifest`` into ``folder``: one verified safetensors file each.

    ``device_id`` is the fetching device (the weights topics are under its name);
    ``client`` tags this fetch's reply topic and must be unique on that device (a random
    suffix). Tensors already complete in ``folder`` are
    skipped; a ``.part`` left by an interrupted fetch is resumed. ``config.json`` is
    written too, so ``Checkpoint(folder)`` opens the result. ``progress(name, done,
    total)`` is called after every chunk; an exception from it ends the fetch (the
    ``.part`` stays, to be resumed).
    """
    manifest = check_manifest(manifest)
    _check_client(client)
    if window_bytes <= 0 or chunk_timeout_s <= 0 or max_retries < 0:
        raise ConfigError("window_bytes and chunk_timeout_s must be positive, max_retries not negative")
    tensors = manifest["tensors"]
    wanted = list(dict.fromkeys(names))
    missing = [name for name in wanted if name not in tensors]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise WeightsError(f"model {manifest['model']!r} has no tensor {shown} (not in its manifest)")
    folder = Path(folder)
    (folder / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    stats = FetchStats()
    todo = []
    for name in wanted:
        if is_complete(tensor_path(folder, name), name, tensors[name]):
            stats.tensors_skipped += 1
        else:
            todo.append(name)
    if todo:
        topics = Topics(cluster)
        # Reconnecting: after a broker restart, a chunk that does not come is asked for again.
        async with transport.connection(f"lime-weights-{device_id}-{client}", reconnect=True) as conn:
            await conn.subscribe(topics.weights_inbox(device_id, client), qos=1)
            fetcher = _Fetcher(conn, topics, manifest, folder, device_id, client, stats,
                               chunk_timeout_s, max_retries, window_bytes, progress)
            try:
                for name in todo:
                    await fetcher.fetch(name)
            finally:
                await fetcher.aclose()
    write_config(folder, manifest)
    log.info("fetched %d tensors (%d bytes) of %s into %s; %d already there",
             stats.tensors_fetched, stats.bytes_received, manifest["model"], folder, stats.tensors_skipped)
    return stats
