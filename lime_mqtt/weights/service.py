"""Weights through the broker: a device fetches exactly its own tensors over MQTT.

A :class:`WeightSource` (the coordinator, or any agent that has the model files) answers
requests on ``weights/request``: a model's manifest (its config, and each tensor's dtype,
shape, size, source file offset and sha256), or a byte range of one tensor as a run of
CBOR chunks. :func:`fetch_tensors` asks for them window by window, appends the bytes to
``.partial/<name>.part`` (an interrupted fetch resumes where it stopped), checks the
sha256 and writes each tensor as its own safetensors file, with its data at the same file
offset modulo 64 as in the source (docs/wire-format.md). Requests are JSON, answers CBOR;
nothing received is pickled or ``torch.load``-ed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import Any, Literal

import cbor2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lime_mqtt.core.errors import ConfigError, LimeError
from lime_mqtt.core.topics import Topics
from lime_mqtt.model.checkpoint import _DTYPE_BYTES, Checkpoint
from lime_mqtt.transport.base import Connection, Transport

log = logging.getLogger(__name__)

WEIGHTS_VERSION = 1
CHUNK_BYTES = 1 << 20  # the most tensor bytes in one chunk message
WINDOW_BYTES = 8 << 20  # the most bytes one tensor request asks for (bounds what the broker queues)
MANIFEST_CACHE = ".lime-manifest.json"
PARTIAL_DIR = ".partial"

_ALIGN = 64  # lime_mqtt.model.checkpoint aligns tensor buffers like their file offset mod 64
_READ_BLOCK = 8 << 20
_CLIENT = re.compile(r"[^/+#\s\x00]{1,128}")

Progress = Callable[[str, int, int], None]  # (tensor name, bytes done, tensor bytes)


class WeightsError(LimeError):
    """A manifest or tensor that cannot be served or fetched."""

    code = "weights_error"


# ----- manifest -----------------------------------------------------------------------------------

# sha256 per tensor, per folder and file key: for folders where the cache file cannot be written.
_hashes_in_memory: dict[tuple[str, str], dict[str, str]] = {}


def _files_key(checkpoint: Checkpoint) -> list[list[Any]]:
    """Names, sizes and mtimes of the safetensors files: the tensor hashes hold while these do."""
    key: list[list[Any]] = []
    for path in sorted({info.file for info in checkpoint.tensors.values()}):
        stat = path.stat()
        key.append([str(path.relative_to(checkpoint.folder)), stat.st_size, stat.st_mtime_ns])
    return key


def _sha256_of_range(fh: BufferedReader, offset: int, nbytes: int) -> str:
    digest = hashlib.sha256()
    fh.seek(offset)
    left = nbytes
    while left:
        block = fh.read(min(left, _READ_BLOCK))
        if not block:
            raise WeightsError(f"{fh.name} ends inside a tensor at byte {offset + nbytes - left}")
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


def _hash_tensors(checkpoint: Checkpoint) -> dict[str, str]:
    """sha256 of every tensor's bytes, reading each file once from start to end."""
    hashes: dict[str, str] = {}
    ordered = sorted(checkpoint.tensors.items(), key=lambda item: (str(item[1].file), item[1].offset))
    for path, group in itertools.groupby(ordered, key=lambda item: item[1].file):
        with path.open("rb") as fh:
            for name, info in group:
                hashes[name] = _sha256_of_range(fh, info.offset, info.nbytes)
    return hashes


def _read_hash_cache(path: Path, key: list[list[Any]], names: set[str]) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("v") != WEIGHTS_VERSION or data.get("files") != key:
        return None
    hashes = data.get("sha256")
    if not isinstance(hashes, dict) or set(hashes) != names or not all(isinstance(h, str) for h in hashes.values()):
        return None
    return hashes


def _write_hash_cache(path: Path, key: list[list[Any]], hashes: dict[str, str]) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps({"v": WEIGHTS_VERSION, "files": key, "sha256": hashes}))
        os.replace(tmp, path)
    except OSError as exc:
        log.info("cannot cache tensor hashes in %s (%s); keeping them in memory", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def tensor_hashes(checkpoint: Checkpoint) -> dict[str, str]:
    """sha256 (hex) of every tensor of ``checkpoint``.

    Hashing reads the whole model, so the result is cached in ``<folder>/.lime-manifest.json``
    keyed by the safetensors files' names, sizes and mtimes (and in memory, which is all
    there is when the folder cannot be written).
    """
    key = _files_key(checkpoint)
    memo = (str(checkpoint.folder.resolve()), json.dumps(key))
    if memo in _hashes_in_memory:
        return _hashes_in_memory[memo]
    cache = checkpoint.folder / MANIFEST_CACHE
    hashes = _read_hash_cache(cache, key, set(checkpoint.tensors))
    if hashes is None:
        log.info("hashing the tensors of %s (once per change of its files)", checkpoint.folder)
        hashes = _hash_tensors(checkpoint)
        _write_hash_cache(cache, key, hashes)
    _hashes_in_memory[memo] = hashes
    return hashes


def build_manifest(checkpoint: Checkpoint, model_id: str) -> dict[str, Any]:
    """What a fetching device needs to know: the config and each tensor's layout and hash."""
    hashes = tensor_hashes(checkpoint)
    return {
        "v": WEIGHTS_VERSION,
        "model": model_id,
        "config": checkpoint.config_dict,
        "tensors": {
            name: {
                "dtype": info.dtype,
                "shape": list(info.shape),
                "nbytes": info.nbytes,
                "offset": info.offset,
                "sha256": hashes[name],
            }
            for name, info in sorted(checkpoint.tensors.items())
        },
    }


class _TensorEntry(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    dtype: str
    shape: list[int]
    nbytes: int = Field(ge=0)
    offset: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _size_matches_shape(self) -> _TensorEntry:
        itemsize = _DTYPE_BYTES.get(self.dtype)
        if itemsize is None:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if any(dim < 0 for dim in self.shape) or math.prod(self.shape) * itemsize != self.nbytes:
            raise ValueError(f"nbytes {self.nbytes} does not match shape {self.shape} of {self.dtype}")
        return self


class _Manifest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    v: Literal[1]
    model: str = Field(min_length=1)
    config: dict[str, Any]
    tensors: dict[str, _TensorEntry]

    @model_validator(mode="after")
    def _names_not_empty(self) -> _Manifest:
        if any(not name for name in self.tensors):
            raise ValueError("a tensor name is empty")
        return self


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in exc.errors())


def check_manifest(obj: Any) -> dict[str, Any]:
    """``obj`` if it is a well-formed manifest, else :class:`WeightsError`."""
    try:
        _Manifest.model_validate(obj)
    except ValidationError as exc:
        raise WeightsError(f"malformed manifest: {_problems(exc)}") from exc
    manifest: dict[str, Any] = obj
    return manifest


# ----- requests and replies (pure) -----------------------------------------------------------------


class WeightRequest(BaseModel):
    """A JSON request on ``weights/request``."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    v: Literal[1]
    op: Literal["manifest", "tensor"]
    model: str = Field(min_length=1)
    reply: str
    id: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, min_length=1)
    offset: int = Field(0, ge=0)
    length: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _tensor_has_name(self) -> WeightRequest:
        if self.op == "tensor" and self.name is None:
            raise ValueError("a tensor request needs 'name'")
        return self


def parse_weights_request(body: dict[str, Any]) -> WeightRequest:
    try:
        return WeightRequest.model_validate(body)
    except ValidationError as exc:
        raise WeightsError(f"bad weights request: {_problems(exc)}") from exc


def valid_client(client: str) -> bool:
    """A fetching client's name: one topic level, no wildcards or spaces, at most 128 characters."""
    return isinstance(client, str) and _CLIENT.fullmatch(client) is not None


def valid_reply_topic(topics: Topics, reply: Any) -> bool:
    """Sources answer only on ``weights/to/{client}`` of their own cluster, never anywhere else."""
    prefix = topics.weights_reply("")
    return isinstance(reply, str) and reply.startswith(prefix) and valid_client(reply[len(prefix):])


def _reply(request_id: str, kind: str, **fields: Any) -> bytes:
    return cbor2.dumps({"v": WEIGHTS_VERSION, "id": request_id, "kind": kind, **fields})


def _decode_reply(payload: bytes) -> dict[str, Any] | None:
    try:
        reply = cbor2.loads(payload)
    except Exception:  # cbor2 raises several types for garbage input
        log.warning("ignoring a weights reply that is not CBOR")
        return None
    if not isinstance(reply, dict) or reply.get("v") != WEIGHTS_VERSION:
        log.warning("ignoring a weights reply that is not a version %d map", WEIGHTS_VERSION)
        return None
    return reply


# ----- local files (pure, synchronous) -------------------------------------------------------------


def _safe_name(name: str) -> str:
    """A file name for a tensor name; names that had to change get a hash so none collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe == name and not name.startswith(".") and len(name) <= 200:
        return name
    return f"{safe.lstrip('.')[:180]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def tensor_path(folder: Path, name: str) -> Path:
    """Where a fetched, verified tensor lives: its own safetensors file."""
    return Path(folder) / f"{_safe_name(name)}.safetensors"


def partial_path(folder: Path, name: str) -> Path:
    """The bytes of ``name`` received so far (not matched by ``*.safetensors``)."""
    return Path(folder) / PARTIAL_DIR / f"{_safe_name(name)}.part"


def safetensors_header(name: str, entry: dict[str, Any]) -> bytes:
    """Length prefix and JSON header of a one-tensor safetensors file.

    The JSON is padded with spaces so that the data starts at a file offset congruent to
    the source's ``offset`` modulo 64: Checkpoint.read gives a tensor the alignment of its
    file offset, and only the source's alignment gives results bit-identical to it.
    """
    header = {
        "__metadata__": {"sha256": entry["sha256"]},
        name: {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [0, entry["nbytes"]]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((entry["offset"] - 8 - len(text)) % _ALIGN)
    return len(text).to_bytes(8, "little") + text


def _is_complete(path: Path, name: str, entry: dict[str, Any]) -> bool:
    """Whether ``path`` holds this very tensor (its header names the manifest's hash)."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= 1 << 20:
                return False
            header = json.loads(fh.read(size))
        info = header[name]
        return bool(
            header["__metadata__"]["sha256"] == entry["sha256"]
            and info["dtype"] == entry["dtype"]
            and info["shape"] == entry["shape"]
            and path.stat().st_size == 8 + size + entry["nbytes"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _finish(folder: Path, name: str, entry: dict[str, Any]) -> bool:
    """Check the complete ``.part`` against the manifest's sha256 and write the tensor's file.

    One pass: the bytes are hashed while they are copied behind the header into a
    temporary file, which replaces the final name only if the hash matches. False (and
    the ``.part`` deleted) on a mismatch.
    """
    part = partial_path(folder, name)
    tmp = part.with_suffix(".tmp")
    digest = hashlib.sha256()
    with part.open("rb") as src, tmp.open("wb") as dst:
        dst.write(safetensors_header(name, entry))
        while block := src.read(_READ_BLOCK):
            digest.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    if digest.hexdigest() != entry["sha256"]:
        tmp.unlink()
        part.unlink()
        return False
    os.replace(tmp, tensor_path(folder, name))
    part.unlink()
    return True


def write_config(folder: Path, manifest: dict[str, Any]) -> Path:
    """``config.json`` from the manifest, so that ``Checkpoint(folder)`` opens the fetched tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    tmp = folder / f".config.json.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(manifest["config"], indent=2))
    os.replace(tmp, path)
    return path


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


# ----- the source ----------------------------------------------------------------------------------


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
    ) -> None:
        if chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be positive, not {chunk_bytes}")
        self.topics = Topics(cluster)
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
            await self.transport.subscribe(self.topics.weights_requests, qos=1)
            self.serving.set()
            log.info("serving the weights of %s on %s", self.model_id, self.topics.weights_requests)
            try:
                async for message in self.transport.messages():
                    await self._handle(message.payload)
            finally:
                self.serving.clear()

    async def _handle(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            log.warning("ignoring a weights request that is not JSON")
            return
        if not isinstance(body, dict):
            log.warning("ignoring a weights request that is not a JSON object")
            return
        reply = body.get("reply")
        if not isinstance(reply, str) or not valid_reply_topic(self.topics, reply):
            log.warning("ignoring a weights request whose reply topic %r is not under %s",
                        reply, self.topics.weights_reply(""))
            return
        request_id = body["id"] if isinstance(body.get("id"), str) else ""
        model = body.get("model")
        if isinstance(model, str) and model != self.model_id:
            log.debug("ignoring a weights request for model %s", model)
            return
        try:
            request = parse_weights_request(body)
        except WeightsError as exc:
            await self._refuse(request_id, reply, str(exc))
            return
        if request.op == "manifest":
            await self._send(request.reply, _reply(request.id, "manifest", manifest=self.manifest))
        else:
            await self._serve_tensor(request)

    async def _send(self, topic: str, payload: bytes) -> None:
        await self.transport.publish(topic, payload, qos=1)
        self.requests_answered += 1

    async def _refuse(self, request_id: str, topic: str, message: str) -> None:
        log.warning("weights request %s: %s", request_id, message)
        await self._send(topic, _reply(request_id, "error", message=message))

    async def _serve_tensor(self, request: WeightRequest) -> None:
        name = request.name or ""
        info = self.checkpoint.tensors.get(name)
        if info is None:
            await self._refuse(request.id, request.reply, f"model {self.model_id!r} has no tensor {name!r}")
            return
        if not 0 <= request.offset < info.nbytes:
            await self._refuse(request.id, request.reply,
                               f"offset {request.offset} is out of range for tensor {name!r} of {info.nbytes} bytes")
            return
        end = info.nbytes if request.length is None else min(info.nbytes, request.offset + request.length)
        for start in range(request.offset, end, self.chunk_bytes):
            size = min(self.chunk_bytes, end - start)
            try:
                data = await asyncio.to_thread(_read_range, info.file, info.offset + start, size)
            except OSError as exc:
                await self._refuse(request.id, request.reply, f"cannot read tensor {name!r}: {exc}")
                return
            if len(data) != size:
                await self._refuse(request.id, request.reply, f"{info.file.name} ends inside tensor {name!r}")
                return
            chunk = _reply(request.id, "chunk", name=name, offset=start, total=info.nbytes, data=data)
            await self.transport.publish(request.reply, chunk, qos=1)
            self.bytes_served += size
        self.requests_answered += 1


# ----- fetching ------------------------------------------------------------------------------------


@dataclass
class FetchStats:
    tensors_fetched: int = 0
    tensors_skipped: int = 0  # already on disk, complete
    bytes_received: int = 0  # tensor bytes appended, this run
    resumed_from: dict[str, int] = field(default_factory=dict)  # tensor -> bytes found in its .part
    hash_failures: int = 0


class _Replies:
    """Replies to this client, one request id at a time, each wait with a deadline."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._messages = conn.messages()

    async def wait(self, request_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The next reply to ``request_id``; None if none comes within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    reply = _decode_reply((await anext(self._messages)).payload)
                    if reply is not None and reply.get("id") == request_id:
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
    timeout_s: float = 30.0,
    client: str | None = None,
) -> dict[str, Any]:
    """The manifest of ``model_id`` from the first weight source that answers."""
    client = client or f"manifest-{uuid.uuid4().hex[:12]}"
    _check_client(client)
    topics = Topics(cluster)
    request_id = uuid.uuid4().hex
    request = {"v": WEIGHTS_VERSION, "op": "manifest", "model": model_id,
               "reply": topics.weights_reply(client), "id": request_id}
    async with transport.connection(f"lime-weights-{client}-{uuid.uuid4().hex[:8]}", reconnect=True) as conn:
        await conn.subscribe(topics.weights_reply(client), qos=1)
        await conn.publish(topics.weights_requests, json.dumps(request).encode(), qos=1)
        replies = _Replies(conn)
        try:
            reply = await replies.wait(request_id, timeout_s)
        finally:
            await replies.aclose()
    if reply is None:
        raise WeightsError(
            f"no weight source answered for model {model_id!r} on cluster {cluster!r} within {timeout_s:g} s"
        )
    if reply.get("kind") == "error":
        raise WeightsError(f"the weight source refused the manifest of {model_id!r}: {reply.get('message')}")
    if reply.get("kind") != "manifest":
        raise WeightsError(f"expected a manifest, the weight source sent {reply.get('kind')!r}")
    manifest = check_manifest(reply.get("manifest"))
    if manifest["model"] != model_id:
        raise WeightsError(f"asked for the manifest of {model_id!r}, got that of {manifest['model']!r}")
    return manifest


class _Fetcher:
    """Fetches tensors one by one over one connection into ``folder``."""

    def __init__(
        self, conn: Connection, topics: Topics, manifest: dict[str, Any], folder: Path, client: str,
        stats: FetchStats, chunk_timeout_s: float, max_retries: int, window_bytes: int, progress: Progress | None,
    ) -> None:
        self.conn = conn
        self.topics = topics
        self.model: str = manifest["model"]
        self.tensors: dict[str, dict[str, Any]] = manifest["tensors"]
        self.folder = folder
        self.reply = topics.weights_reply(client)
        self.stats = stats
        self.chunk_timeout_s = chunk_timeout_s
        self.max_retries = max_retries
        self.window_bytes = window_bytes
        self.progress = progress
        self.replies = _Replies(conn)

    async def fetch(self, name: str) -> None:
        """Download, verify, write; on a hash mismatch, once more from the start."""
        entry = self.tensors[name]
        for attempt in (1, 2):
            await self._download(name, entry)
            if await asyncio.to_thread(_finish, self.folder, name, entry):
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

    def _data_of(self, reply: dict[str, Any], name: str, total: int, done: int) -> bytes | None:
        """The bytes of a chunk that continues the ``.part`` exactly; None for anything to ignore."""
        kind = reply.get("kind")
        if kind == "error":
            raise WeightsError(f"the weight source cannot send tensor {name!r}: {reply.get('message')}")
        if kind != "chunk" or reply.get("name") != name:
            return None
        if reply.get("total") != total:
            raise WeightsError(
                f"the weight source has {reply.get('total')} bytes of tensor {name!r}, the manifest says {total}"
            )
        data = reply.get("data")
        if reply.get("offset") != done or not isinstance(data, bytes) or not data or done + len(data) > total:
            log.debug("ignoring a chunk of %s at %r (have %d bytes)", name, reply.get("offset"), done)
            return None
        return data

    async def _request(self, name: str, request_id: str, offset: int, length: int) -> None:
        body = {"v": WEIGHTS_VERSION, "op": "tensor", "model": self.model, "name": name, "offset": offset,
                "length": length, "reply": self.reply, "id": request_id}
        await self.conn.publish(self.topics.weights_requests, json.dumps(body).encode(), qos=1)

    async def aclose(self) -> None:
        await self.replies.aclose()


async def fetch_tensors(
    transport: Transport,
    cluster: str,
    manifest: dict[str, Any],
    names: Iterable[str],
    folder: Path,
    *,
    client: str,
    chunk_timeout_s: float = 10.0,
    max_retries: int = 5,
    window_bytes: int = WINDOW_BYTES,
    progress: Progress | None = None,
) -> FetchStats:
    """Fetch ``names`` of ``manifest`` into ``folder``: one verified safetensors file each.

    ``client`` names this fetcher's reply topic and must be unique in the cluster (e.g.
    the device id with a random suffix). Tensors already complete in ``folder`` are
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
        if _is_complete(tensor_path(folder, name), name, tensors[name]):
            stats.tensors_skipped += 1
        else:
            todo.append(name)
    if todo:
        topics = Topics(cluster)
        # Reconnecting: after a broker restart, a chunk that does not come is asked for again.
        async with transport.connection(f"lime-weights-{client}-{uuid.uuid4().hex[:8]}", reconnect=True) as conn:
            await conn.subscribe(topics.weights_reply(client), qos=1)
            fetcher = _Fetcher(conn, topics, manifest, folder, client, stats,
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
