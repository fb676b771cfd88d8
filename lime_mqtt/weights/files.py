"""Model files for weights through the broker: tensor hashes and the manifest of a
source's folder, and a fetching device's files (docs/wire-format.md).

A fetched tensor is appended to ``.partial/<name>.part`` as its chunks arrive (an
interrupted fetch resumes where it stopped), checked against the manifest's sha256 and
written as its own safetensors file, with its data at the same file offset modulo 64 as
in the source, so the tensor gets the source's alignment and bit-identical results.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import uuid
from io import BufferedReader
from pathlib import Path
from typing import Any

from lime_mqtt.core.errors import WeightsError
from lime_mqtt.core.weight_messages import WEIGHTS_VERSION
from lime_mqtt.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MANIFEST_CACHE = ".lime-manifest.json"
PARTIAL_DIR = ".partial"

_ALIGN = 64  # lime_mqtt.model.checkpoint aligns tensor buffers like their file offset mod 64
_READ_BLOCK = 8 << 20


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
    if checkpoint.gguf_file is not None:
        raise WeightsError(f"{checkpoint.gguf_file.name} is a GGUF file: its tensors are not served over MQTT "
                           "(give each device the file, or serve a safetensors folder)")
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


def is_complete(path: Path, name: str, entry: dict[str, Any]) -> bool:
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


def finish_tensor(folder: Path, name: str, entry: dict[str, Any]) -> bool:
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


def read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)
