"""Weights through the broker: manifest, layer fetch, resume, hash check, bad requests.

Unit tests of the files and the manifest cache need no broker; the rest run a
WeightSource on the tiny model against a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import torch
from safetensors.torch import load_file

from lime_mqtt.core.errors import WeightsError
from lime_mqtt.core.topics import Identity, Route, Topics
from lime_mqtt.core.weight_messages import valid_client
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.transport import connect, transport_for
from lime_mqtt.transport.mosquitto import LocalBroker
from lime_mqtt.weights.fetch import fetch_manifest, fetch_tensors
from lime_mqtt.weights.files import MANIFEST_CACHE, build_manifest, partial_path, safetensors_header, tensor_path
from lime_mqtt.weights.source import WeightSource
from tests.helpers import running, wait_until

MODEL = "tiny-llama"  # the tiny model's folder name, which a source serves it as
EMBED = "model.embed_tokens.weight"


@contextlib.asynccontextmanager
async def serving(broker: str, cluster: str, folder: Path, **options: Any) -> AsyncIterator[WeightSource]:
    """A WeightSource running as a task; if it crashes, its exception fails the test."""
    source = WeightSource(transport_for(broker), cluster, folder, **options)
    async with running({"weights-source": source}):
        await wait_until(source.serving.is_set, timeout_s=30)
        yield source


def _copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(source / name, target / name)
    return target


# ----- no broker -------------------------------------------------------------------------------------


def test_weights_topics() -> None:
    topics = Topics("plant")
    source = Identity("coordinator", "main")
    assert topics.weights_request("pi-1") == "lime/v2/plant/device/pi-1/weights"
    assert topics.weights_reply(source, "pi-1", "x1") == "lime/v2/plant/coordinator/main/to/device/pi-1/weights/x1"
    route = topics.parse(topics.weights_reply(source, "pi-1", "x1"))
    assert route == Route(source, "weights_reply", Identity("device", "pi-1"), "x1")
    assert topics.parse(topics.weights_request("pi-1")) == Route(Identity("device", "pi-1"), "weights")
    assert valid_client("x1") and not any(valid_client(bad) for bad in ("", "a/b", "#", "a b", "x" * 129))


@pytest.mark.parametrize("source_offset", [0, 8, 24, 56, 64 + 40, 4096 + 8])
def test_a_tensor_file_keeps_the_source_alignment(tmp_path: Path, source_offset: int) -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    data = tensor.numpy().tobytes()
    entry = {"dtype": "F32", "shape": [3, 4], "nbytes": len(data), "offset": source_offset,
             "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "w.safetensors").write_bytes(safetensors_header("w", entry) + data)
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.tensors["w"].offset % 64 == source_offset % 64
    assert torch.equal(checkpoint.read(["w"])["w"], tensor)
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], tensor)  # a valid safetensors file


def test_manifest_hashes_are_cached_by_file_name_size_and_mtime(tiny_model: Path, tmp_path: Path) -> None:
    folder = _copy_model(tiny_model, tmp_path / "model")
    checkpoint = Checkpoint(folder)
    manifest = build_manifest(checkpoint, "m")
    raw = (folder / "model.safetensors").read_bytes()
    for name, info in checkpoint.tensors.items():
        entry = manifest["tensors"][name]
        assert entry == {"dtype": info.dtype, "shape": list(info.shape), "nbytes": info.nbytes,
                         "offset": info.offset,
                         "sha256": hashlib.sha256(raw[info.offset:info.offset + info.nbytes]).hexdigest()}
    assert manifest["model"] == "m" and manifest["config"] == checkpoint.config_dict
    cache = json.loads((folder / MANIFEST_CACHE).read_text())
    stat = (folder / "model.safetensors").stat()
    assert cache["files"] == [["model.safetensors", stat.st_size, stat.st_mtime_ns]]

    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert build_manifest(Checkpoint(folder), "m") == manifest  # recomputed: the same bytes
    cache = json.loads((folder / MANIFEST_CACHE).read_text())
    assert cache["files"][0][2] == stat.st_mtime_ns + 10**9


def test_manifest_without_a_writable_cache(tiny_model: Path, tmp_path: Path) -> None:
    folder = _copy_model(tiny_model, tmp_path / "model")
    (folder / MANIFEST_CACHE).mkdir()  # the cache file can neither be read nor replaced
    manifest = build_manifest(Checkpoint(folder), "m")
    assert manifest == build_manifest(Checkpoint(tiny_model), "m")


# ----- through the broker ----------------------------------------------------------------------------


async def test_a_device_fetches_exactly_its_layer(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "device"
    async with serving(broker.url, cluster_name, tiny_model) as source:
        manifest = await fetch_manifest(broker.transport(), cluster_name, MODEL, device_id="dev0", timeout_s=10)
        names = [name for name in manifest["tensors"] if name.startswith("model.layers.1.")]
        stats = await fetch_tensors(broker.transport(), cluster_name, manifest, names, folder,
                                    device_id="dev1", client="a1b2")

    original, received = Checkpoint(tiny_model), Checkpoint(folder)
    assert len(names) == 9 and sorted(received.tensors) == sorted(names)  # its layer, nothing else
    assert stats.tensors_fetched == len(names) and stats.hash_failures == 0 and stats.resumed_from == {}
    assert stats.bytes_received == source.bytes_served == original.bytes_of(names)
    assert received.config_dict == original.config_dict
    mine, theirs = received.read(names), original.read(names)
    for name in names:
        assert torch.equal(mine[name], theirs[name]), name
        assert received.tensors[name].offset % 64 == original.tensors[name].offset % 64, name
    assert list((folder / ".partial").iterdir()) == []

    # Everything is on disk now: a second fetch needs no source at all.
    again = await fetch_tensors(broker.transport(), cluster_name, manifest, names, folder, device_id="dev1",
                                client="a1b2",
                                chunk_timeout_s=0.2, max_retries=0)
    assert (again.tensors_skipped, again.tensors_fetched, again.bytes_received) == (len(names), 0, 0)


class Interrupted(Exception):
    pass


async def test_an_interrupted_fetch_resumes_where_it_stopped(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "device"
    chunk = 4096
    seen: list[int] = []

    def stop_after_three_chunks(name: str, done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 3:
            raise Interrupted

    async with serving(broker.url, cluster_name, tiny_model, chunk_bytes=chunk) as source:
        manifest = await fetch_manifest(broker.transport(), cluster_name, MODEL, device_id="dev0", timeout_s=10)
        total = manifest["tensors"][EMBED]["nbytes"]
        assert total > 10 * chunk
        with pytest.raises(Interrupted):
            await fetch_tensors(broker.transport(), cluster_name, manifest, [EMBED], folder,
                                device_id="dev0", client="r1",
                                progress=stop_after_three_chunks)
        assert seen == [chunk, 2 * chunk, 3 * chunk]
        assert partial_path(folder, EMBED).stat().st_size == 3 * chunk
        assert not tensor_path(folder, EMBED).exists()

        # The source sends the rest of that request to nobody; then the device comes back.
        await wait_until(lambda: source.bytes_served == total)
        before = source.bytes_served
        stats = await fetch_tensors(broker.transport(), cluster_name, manifest, [EMBED], folder,
                                    device_id="dev0", client="r2")
        served_again = source.bytes_served - before

    assert stats.resumed_from == {EMBED: 3 * chunk}
    assert served_again == stats.bytes_received == total - 3 * chunk
    assert stats.hash_failures == 0 and stats.tensors_fetched == 1
    assert not partial_path(folder, EMBED).exists()
    received = Checkpoint(folder).read([EMBED])[EMBED]
    assert torch.equal(received, Checkpoint(tiny_model).read([EMBED])[EMBED])


async def test_a_damaged_partial_file_fails_the_hash_and_is_fetched_again(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "device"
    chunk = 4096
    async with serving(broker.url, cluster_name, tiny_model, chunk_bytes=chunk):
        manifest = await fetch_manifest(broker.transport(), cluster_name, MODEL, device_id="dev0", timeout_s=10)
        total = manifest["tensors"][EMBED]["nbytes"]
        part = partial_path(folder, EMBED)
        part.parent.mkdir(parents=True)
        part.write_bytes(b"\xa5" * (total - chunk))  # the right length but one chunk, wrong bytes
        stats = await fetch_tensors(broker.transport(), cluster_name, manifest, [EMBED], folder,
                                    device_id="dev0", client="h1")

        # A source whose bytes never match the manifest: the second mismatch is an error.
        wrong = json.loads(json.dumps(manifest))
        wrong["tensors"]["model.norm.weight"]["sha256"] = "0" * 64
        with pytest.raises(WeightsError, match=r"'model\.norm\.weight'.*sha256 check twice"):
            await fetch_tensors(broker.transport(), cluster_name, wrong, ["model.norm.weight"], folder,
                                device_id="dev0", client="h2")

    assert stats.hash_failures == 1
    assert stats.resumed_from == {EMBED: total - chunk}
    assert stats.bytes_received == chunk + total
    received = Checkpoint(folder).read([EMBED])[EMBED]
    assert torch.equal(received, Checkpoint(tiny_model).read([EMBED])[EMBED])
    assert not tensor_path(folder, "model.norm.weight").exists()


async def test_bad_requests_never_stop_the_source(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    topics = Topics(cluster_name)
    reply = "probe"
    outside = "elsewhere/x"
    layer = "model.layers.0.input_layernorm.weight"

    def request(**fields: Any) -> bytes:
        return json.dumps({"v": 1, "model": MODEL, "reply": reply, **fields}).encode()

    requests = [
        b"\xff\xfe not json",
        b"[1, 2, 3]",
        json.dumps({"v": 1, "op": "manifest", "model": MODEL, "id": "no-reply"}).encode(),
        request(op="manifest", id="outside", reply=outside),
        request(op="tensor", id="no-name", offset=0),
        request(op="tensor", id="text-offset", name=layer, offset="0"),
        request(op="fly", id="bad-op"),
        request(op="manifest", id="bad-version", v=2),
        request(op="tensor", id="unknown", name="model.layers.99.weight", offset=0),
        request(op="tensor", id="past-end", name=layer, offset=10**9),
        request(op="manifest", id="other-model", model="another-model"),  # for another source
        request(op="manifest", id="good"),
    ]
    async with serving(broker.url, cluster_name, tiny_model) as source, connect(broker.url) as probe:
        await probe.subscribe(f"{topics.root}/#", qos=1)  # whatever the source sends, wherever
        for payload in requests:
            await probe.publish(topics.weights_request("dev9"), payload, qos=1)
        answers: dict[str, dict[str, Any]] = {}
        elsewhere = []
        async with asyncio.timeout(10):
            async for message in probe.messages():  # in order: "good" comes last
                route = topics.parse(message.topic)
                if route is None or route.kind != "weights_reply":
                    continue  # the requests themselves
                if route.arg != reply:
                    elsewhere.append(message)
                    continue
                answer = cbor2.loads(message.payload)
                answers[answer["id"]] = answer
                if answer["id"] == "good":
                    break

        assert elsewhere == []
        assert answers["good"]["kind"] == "manifest" and answers["good"]["manifest"]["model"] == MODEL
        errors = {rid: answer["message"] for rid, answer in answers.items() if answer["kind"] == "error"}
        assert set(errors) == {"no-name", "text-offset", "bad-op", "bad-version", "unknown", "past-end"}
        assert "needs 'name'" in errors["no-name"]
        assert "offset" in errors["text-offset"]
        assert "op" in errors["bad-op"]
        assert errors["unknown"] == f"model '{MODEL}' has no tensor 'model.layers.99.weight'"
        assert "out of range" in errors["past-end"]

        # Still serving: a real fetch works, and unknown names fail clearly on either side.
        manifest = await fetch_manifest(broker.transport(), cluster_name, MODEL, device_id="dev0", timeout_s=10)
        folder = tmp_path / "device"
        stats = await fetch_tensors(broker.transport(), cluster_name, manifest, [layer], folder,
                                    device_id="dev0", client="g1")
        assert stats.tensors_fetched == 1
        with pytest.raises(WeightsError, match=r"has no tensor 'model\.layers\.99\.weight' \(not in its manifest\)"):
            await fetch_tensors(broker.transport(), cluster_name, manifest, ["model.layers.99.weight"], folder,
                                device_id="dev0", client="g2")
        stale = json.loads(json.dumps(manifest))
        stale["tensors"]["model.layers.9.extra"] = stale["tensors"][layer]
        with pytest.raises(WeightsError, match=r"cannot send tensor 'model\.layers\.9\.extra'.*has no tensor"):
            await fetch_tensors(broker.transport(), cluster_name, stale, ["model.layers.9.extra"], folder,
                                device_id="dev0", client="g3")
    assert source.requests_answered >= 9


async def test_without_a_source_fetches_fail_clearly(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(WeightsError, match="no weight source answered for model 'tiny-llama'"):
        await fetch_manifest(broker.transport(), cluster_name, MODEL, device_id="dev0", timeout_s=0.3)
    manifest = build_manifest(Checkpoint(tiny_model), MODEL)
    with pytest.raises(WeightsError, match=r"no data for tensor 'model\.norm\.weight'.*2 waits of 0\.2 s"):
        await fetch_tensors(broker.transport(), cluster_name, manifest, ["model.norm.weight"], tmp_path,
                            device_id="lonely", client="l1", chunk_timeout_s=0.2, max_retries=1)


class RecordedBars:
    """A ``bars`` that records what the service reports (lime_mqtt/core/progress.py)."""

    def __init__(self) -> None:
        self.bars: list[dict[str, Any]] = []

    def __call__(self, description: str, total: float | None, unit: str) -> RecordedBars:
        self.bars.append({"description": description, "total": total, "unit": unit, "done": 0.0, "closed": False})
        return self

    def advance(self, amount: float = 1) -> None:
        self.bars[-1]["done"] += amount

    def close(self) -> None:
        self.bars[-1]["closed"] = True


async def test_a_fetch_shows_its_bytes_in_a_progress_bar(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    from lime_mqtt.device.shards import ShardHost
    from lime_mqtt.planning.plan import StagePlan

    bars = RecordedBars()
    host = ShardHost("fresh", tmp_path / MODEL, 100, fetch_weights=True, bars=bars)
    stage = StagePlan(stage=1, device_id="fresh", start=2, stop=4, embed=False, head=False, weight_bytes=0,
                      kv_tokens=64)
    async with serving(broker.url, cluster_name, tiny_model):
        await host.fetch_manifest(broker.transport(), cluster_name)
        await host.fetch_stages(broker.transport(), cluster_name, [stage])
    names = host.tensor_names([stage])
    expected = Checkpoint(tiny_model).bytes_of(names)
    [bar] = bars.bars
    assert bar["unit"] == "B" and bar["total"] == expected and bar["done"] == expected and bar["closed"]


def test_measuring_shows_its_three_steps(tiny_model: Path, tmp_path: Path) -> None:
    from lime_mqtt.model.measure import measure_capabilities

    bars = RecordedBars()
    measure_capabilities(Checkpoint(tiny_model), "m9", tmp_path, bars=bars)
    assert [(b["total"], b["done"], b["closed"]) for b in bars.bars] == [(3, 3, True)]
    measure_capabilities(Checkpoint(tiny_model), "m9", tmp_path, bars=bars)  # cached: nothing to show
    assert len(bars.bars) == 1
