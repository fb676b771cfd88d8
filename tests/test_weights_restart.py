"""A weight source survives a broker restart: every role its own OS process, a real Mosquitto.

The only weight source is a device started with ``--serve-weights`` (the coordinator has
``--no-weight-source``). Mosquitto is restarted while it serves; the device must still be
running and serving afterwards, so that a device started later with
``--weights-from-broker`` and an empty cache gets its tensors over MQTT, and the cluster
answers like transformers.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster, wait_for_ready_plan
from lime_mqtt.client import ask_final
from lime_mqtt.core.errors import WeightsError
from lime_mqtt.core.topics import Topics
from lime_mqtt.model.builtin import received_folder
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.planning.plan import Plan
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from lime_mqtt.weights.fetch import fetch_manifest
from tests.helpers import prompt_ids, reference_greedy

pytestmark = pytest.mark.e2e  # device agents run as separate processes

SERVER, FRESH = "server", "fresh"
PLANNER = ("--strategy", "equal", "--reserve-mb", "0", "--context-tokens", "64")  # equal: a joiner is adopted
PROMPT, MAX_TOKENS = "Pump P-3 status:", 8
FETCHED = re.compile(rf"{FRESH}: (\d+) tensors \(([\d.]+) MB\) over MQTT in ([\d.]+) s, (\d+) already here")

T = TypeVar("T")


def _while_all_alive(procs: ProcessCluster, waiting: Awaitable[T]) -> T:
    """Run ``waiting`` to its end; fail at once if a process of the cluster exits. Any
    failure (a timeout too) carries the processes' logs."""

    async def watch() -> T:
        task = asyncio.ensure_future(waiting)
        try:
            while not task.done():
                dead = {n: p.returncode for n, p in procs.processes.items() if p.poll() is not None}
                if dead:
                    raise AssertionError(f"processes exited: {dead}")
                await asyncio.wait({task}, timeout=0.2)
            return task.result()
        finally:
            task.cancel()

    try:
        return asyncio.run(watch())
    except Exception as exc:
        exc.add_note(procs.log_tail(25))
        raise


async def _ready_again(broker: str, cluster: str, device_id: str, since: float, timeout_s: float) -> float:
    """Wait for a "ready" status of ``device_id`` published after ``since`` (wall clock): the
    device's own reconnect republishes it. Returns when it came (perf_counter)."""
    topics = Topics(cluster)
    async with connect(broker) as conn:
        await conn.subscribe(topics.device_status(device_id), qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in conn.messages():
                status = json.loads(message.payload) if message.payload else {}
                if status.get("state") == "ready" and status.get("ts", 0) >= since:
                    return time.perf_counter()
    raise AssertionError("unreachable")


async def _source_answers(broker: LocalBroker, cluster: str, model_id: str, timeout_s: float) -> float:
    """Ask for the manifest until a weight source answers (each try a new request); returns
    when one did (perf_counter)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                manifest = await fetch_manifest(broker.transport(), cluster, model_id, device_id="dev0", timeout_s=2)
            except WeightsError:
                continue  # asked before the source's subscription was back: ask again
            assert manifest["model"] == model_id
            return time.perf_counter()


def test_a_serve_weights_device_survives_a_broker_restart_and_a_later_device_gets_its_weights(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto stops (SIGTERM) for 1 s while a ``--serve-weights`` device is the only
    weight source. The device's process is still running afterwards and it serves again; a
    device started after the restart with an empty received folder fetches its stage's
    tensors over MQTT from it, joins the plan, and the answer equals transformers greedy."""
    cache = tmp_path / "cache"  # every process's LIME_MQTT_CACHE: nothing received before this test
    monkeypatch.setenv("LIME_MQTT_CACHE", str(cache))
    received = received_folder(tiny_model.name)
    assert not received.exists()
    cluster = f"wr{uuid.uuid4().hex[:8]}"
    logs = tmp_path / "logs"
    with LocalBroker() as own_broker, ProcessCluster(  # its own folder: Mosquitto (user mosquitto) can write there
        own_broker.url, cluster, str(tiny_model), [DeviceSpec(SERVER, 10, 1, ("--serve-weights",))], logs,
        extra_env={"LIME_MQTT_CACHE": str(cache)}, planner_args=PLANNER, coordinator_args=("--no-weight-source",),
    ) as procs:
        first = procs.wait_ready(timeout_s=60)
        assert [s.device_id for s in first.stages] == [SERVER]
        _while_all_alive(procs, _source_answers(own_broker, cluster, tiny_model.name, timeout_s=30))

        since, stopped = time.time(), time.perf_counter()
        own_broker.restart(down_s=1)
        back = time.perf_counter()
        ready = _while_all_alive(procs, _ready_again(own_broker.url, cluster, SERVER, since, timeout_s=30))
        serving = _while_all_alive(procs, _source_answers(own_broker, cluster, tiny_model.name, timeout_s=30))
        assert procs.processes[SERVER].poll() is None, procs.log_tail(25)  # the weight source did not end it

        started = time.perf_counter()
        procs.start_device(DeviceSpec(FRESH, 10, 1, ("--weights-from-broker",)))
        plan: Plan = _while_all_alive(procs, wait_for_ready_plan(own_broker.url, cluster, timeout_s=60, quorum=2))
        joined = time.perf_counter()
        request = {"prompt": PROMPT, "max_tokens": MAX_TOKENS}
        answer = _while_all_alive(procs, ask_final(own_broker.url, cluster, request, timeout_s=60))
        assert procs.processes[SERVER].poll() is None
        codes = procs.stop()

    assert sorted(s.device_id for s in plan.stages) == [FRESH, SERVER], plan
    assert answer.get("type") == "final", f"{answer}\n{procs.log_tail(25)}"
    assert answer["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), MAX_TOKENS)

    # The fetched tensors: over MQTT after the restart (the folder did not exist before),
    # none already there, a proper subset of the model (its stage's), bit-identical.
    line = FETCHED.search((logs / f"{FRESH}.log").read_text())
    assert line is not None, procs.log_tail(25)
    count, megabytes, fetch_s, already = int(line[1]), float(line[2]), float(line[3]), int(line[4])
    source, got = Checkpoint(tiny_model), Checkpoint(received)
    assert count == len(got.tensors) > 0 and already == 0
    assert set(got.tensors) < set(source.tensors)
    assert megabytes == pytest.approx(source.bytes_of(list(got.tensors)) / 1e6, abs=0.06)
    for name in got.tensors:
        assert torch.equal(got.read([name])[name], source.read([name])[name]), name
    assert all(code == 0 for code in codes.values()), codes
    print(f"\nbroker down {back - stopped:.2f} s (1 s asked); {SERVER} ready again {ready - back:.2f} s and "
          f"its weight source answering {serving - back:.2f} s after the broker came back; "
          f"{FRESH}: {count} tensors ({megabytes:.1f} MB) fetched in {fetch_s:.1f} s, "
          f"started to in the ready plan {joined - started:.1f} s")
