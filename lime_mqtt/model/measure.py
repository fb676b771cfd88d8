"""Measured capabilities of a device for one model: layer compute time, matrix-vector
rate and disk read rate (its link through the broker is measured by ``device/link.py``).
The device agent reports the result in its status, and caches it per device and model
so a restart is quick.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lime_mqtt.core.progress import Bars, no_bars
from lime_mqtt.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MEASURE_VERSION = 4
DISK_SAMPLE_BYTES = 64 * 1024 * 1024
PREFILL_TOKENS = 32
DECODE_CONTEXT = 64
MATVEC_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Capabilities:
    """What a device measured, in the units the cost model uses."""

    layer_decode_ms: float  # one decoder layer, one new token, DECODE_CONTEXT tokens of context
    layer_prefill_ms_per_token: float  # one decoder layer, per token of a PREFILL_TOKENS prefill
    disk_mb_s: float  # reading whole layers as a streamed layer is read (page cache dropped)
    threads: int
    matvec_gb_s: float = 10.0  # a large matrix-vector product (the output head), bytes of matrix per second
    emulated_layer_delay_ms: float = 0.0  # an artificial slowdown that the layer timings above include

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _median_ms(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure_layer(
    checkpoint: Checkpoint, device: str = "cpu", repeats: int = 7, layer_delay_ms: float = 0.0
) -> tuple[float, float]:
    """Time one real decoder layer (layer 0's weights) for decode and for prefill, as this
    device runs it (including an emulated slowdown, if it has one)."""
    import torch

    from lime_mqtt.model.shard import Shard, ShardSpec

    spec = ShardSpec(0, 1, embed=False, head=False)
    if checkpoint.has_folder_tensors(checkpoint.keys_with_prefix("model.layers.0.")):
        shard = Shard(checkpoint, spec, device, layer_delay_ms=layer_delay_ms)
    else:  # a device that fetches its weights over MQTT: the same shapes, random values
        shard = Shard(checkpoint, spec, device, layer_delay_ms=layer_delay_ms, random_weights=True)
    hidden = int(checkpoint.config.hidden_size)
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, DECODE_CONTEXT, hidden, generator=generator)
    prefill = torch.randn(1, PREFILL_TOKENS, hidden, generator=generator)
    one = torch.randn(1, 1, hidden, generator=generator)
    cache = shard.new_cache()
    shard.forward(cache, 0, hidden=context)  # fill a context, and warm up

    def decode() -> None:
        shard.forward(cache, DECODE_CONTEXT, hidden=one)  # a retried step: the cache is cut back each time

    def prefill_run() -> None:
        shard.forward(shard.new_cache(), 0, hidden=prefill)

    decode()
    decode_ms = _median_ms(decode, repeats)
    prefill_ms = _median_ms(prefill_run, max(3, repeats // 2)) / PREFILL_TOKENS
    return decode_ms, prefill_ms


def measure_matvec(hidden: int, device: str = "cpu", repeats: int = 9) -> float:
    """GB/s of matrix read by a matrix-vector product the size of a small output head."""
    import torch

    rows = max(1, MATVEC_BYTES // (4 * hidden))
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(rows, hidden, generator=generator).to(device)
    vector = torch.randn(1, hidden, generator=generator).to(device)

    def run() -> None:
        torch.nn.functional.linear(vector, matrix)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()
    return rows * hidden * 4 / (_median_ms(run, repeats) * 1e6)


def measure_stream(checkpoint: Checkpoint, layers: int = 5) -> float | None:
    """MB/s of the streaming path itself: whole layers read the way a streamed layer is
    (fresh aligned buffers, page cache dropped after each read); median over ``layers``
    layers. ``None`` when this device has no layer files (it fetches them over MQTT)."""
    rates: list[float] = []
    for index in range(min(layers, checkpoint.num_layers)):
        keys = checkpoint.keys_with_prefix(f"model.layers.{index}.")
        if not checkpoint.has_folder_tensors(keys):
            return None
        for path in {checkpoint.tensors[k].file for k in keys}:
            _drop_cached(path)
        started = time.perf_counter()
        tensors = checkpoint.read(keys, drop_page_cache=True)
        elapsed = max(time.perf_counter() - started, 1e-6)
        rates.append(sum(t.nbytes for t in tensors.values()) / elapsed / 1e6)
        del tensors
    return statistics.median(rates)


def _drop_cached(path: Path) -> None:
    if hasattr(os, "posix_fadvise"):
        with path.open("rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure_disk(checkpoint: Checkpoint, sample_bytes: int = DISK_SAMPLE_BYTES) -> float:
    """MB/s reading the model's largest safetensors (or GGUF) file, after asking the kernel to drop
    its cached pages (no root needed for clean pages), so the disk itself is measured."""
    files = sorted([*checkpoint.folder.glob("*.safetensors"), *checkpoint.folder.glob("*.gguf")],
                   key=lambda f: -f.stat().st_size)
    scratch = None
    if not files or files[0].stat().st_size < sample_bytes // 4:
        # Too little of the model is here (it comes over MQTT): measure a scratch file.
        scratch = checkpoint.folder / f".disk-probe-{uuid.uuid4().hex[:8]}"
        with scratch.open("wb") as out:
            for _ in range(sample_bytes // (1024 * 1024)):
                out.write(os.urandom(1024 * 1024))
            out.flush()
            os.fsync(out.fileno())
    path = scratch or files[0]
    size = min(sample_bytes, path.stat().st_size)
    buffer = bytearray(1024 * 1024)
    try:
        return _read_rate(path, size, buffer)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)


def _read_rate(path: Path, size: int, buffer: bytearray) -> float:
    with path.open("rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, size, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        done = 0
        while done < size:
            read = fh.readinto(buffer)
            if not read:
                break
            done += read
        elapsed = max(time.perf_counter() - started, 1e-6)
    return done / elapsed / 1e6


def cache_file(cache_root: Path, device_id: str, checkpoint: Checkpoint, layer_delay_ms: float = 0.0) -> Path:
    """One measurement file per device and model (and torch thread count, and emulated delay)."""
    import torch

    config = hashlib.sha256((checkpoint.folder / "config.json").read_bytes()).hexdigest()[:12]
    stamp = f"{checkpoint.folder.name}-{config}-t{torch.get_num_threads()}"
    if layer_delay_ms:
        stamp += f"-d{layer_delay_ms:g}"
    return cache_root / "measurements" / f"{device_id}-{stamp}.json"


def measure_capabilities(
    checkpoint: Checkpoint, device_id: str, cache_root: Path, device: str = "cpu", refresh: bool = False,
    layer_delay_ms: float = 0.0, bars: Bars = no_bars,
) -> Capabilities:
    """Measured capabilities, from the cache when this device has measured this model before
    (``bars``: a bar of the three measurements)."""

    path = cache_file(cache_root, device_id, checkpoint, layer_delay_ms)
    if not refresh and (cached := _read_cache(path)) is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    # Agents on one machine measure one at a time: measuring side by side, they would
    # slow each other down and record it as their speed.
    with (path.parent / ".measuring.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not refresh and (cached := _read_cache(path)) is not None:
                return cached
            return _measure_and_cache(checkpoint, device_id, path, device, layer_delay_ms, bars)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(path: Path) -> Capabilities | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") == MEASURE_VERSION:
            return Capabilities(**data["capabilities"])
    except (ValueError, TypeError, KeyError):
        log.warning("ignoring a damaged measurement cache %s", path)
    return None


def _measure_and_cache(
    checkpoint: Checkpoint, device_id: str, path: Path, device: str, layer_delay_ms: float, bars: Bars,
) -> Capabilities:
    import torch

    started = time.perf_counter()
    bar = bars(f"{device_id}: measuring layer, disk and memory speed (once)", 3, "step")
    try:
        decode_ms, prefill_ms = measure_layer(checkpoint, device, layer_delay_ms=layer_delay_ms)
        bar.advance()
        disk_mb_s = measure_stream(checkpoint) or measure_disk(checkpoint)
        bar.advance()
        matvec_gb_s = measure_matvec(int(checkpoint.config_dict["hidden_size"]), device)
        bar.advance()
    finally:
        bar.close()
    capabilities = Capabilities(
        layer_decode_ms=decode_ms,
        layer_prefill_ms_per_token=prefill_ms,
        disk_mb_s=disk_mb_s,
        threads=torch.get_num_threads(),
        matvec_gb_s=matvec_gb_s,
        emulated_layer_delay_ms=layer_delay_ms,
    )
    log.info("%s: measured %s in %.1f s", device_id, capabilities.to_json(), time.perf_counter() - started)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps({"version": MEASURE_VERSION, "capabilities": asdict(capabilities)}))
    tmp.replace(path)
    return capabilities
