"""End to end: every role its own OS process, SmolLM2 over a real Mosquitto.

Also the memory evidence: a device holding a quarter of the layers has loaded only
those (its parameter count equals its shard's, and its peak resident memory above its
own start-up baseline is far below the model's size).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster, device_statuses
from lime_mqtt.client import ask
from lime_mqtt.device.memory import peak_rss_bytes
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.planning.plan import MIB
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import AnonPeakSampler, prompt_ids, reference_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Name two ways to save energy in a factory."}]


def test_four_device_processes_answer_like_transformers(
    broker: LocalBroker, cluster_name: str, smollm2_model: Path, tmp_path: Path
) -> None:
    devices = [DeviceSpec(f"pi-{i}", 260) for i in range(4)]
    with ProcessCluster(broker.url, cluster_name, str(smollm2_model), devices, tmp_path / "logs",
                        planner_args=("--strategy", "memory")) as procs:
        sampler = AnonPeakSampler([procs.processes[d.device_id].pid for d in devices])
        plan = procs.wait_ready(timeout_s=120)
        assert [s.device_id for s in plan.stages] == [d.device_id for d in devices]

        async def run() -> tuple[list[dict], dict[str, dict]]:
            messages = [m async for m in ask(broker.url, cluster_name, {"messages": QUESTION, "max_tokens": 24})]
            return messages, await device_statuses(broker.url, cluster_name, [d.device_id for d in devices])

        messages, statuses = asyncio.run(run())
        middle = plan.stages[1]
        pid = statuses[middle.device_id]["pid"]
        assert procs.processes[middle.device_id].pid == pid
        peak = sampler.stop()[pid]
        codes = procs.stop()

    final = messages[-1]
    assert final["type"] == "final", (final, procs.log_tail())
    expected = reference_greedy(smollm2_model, prompt_ids(smollm2_model, messages=QUESTION), 24)
    assert final["token_ids"] == expected
    assert "".join(m["text"] for m in messages if m["type"] == "chunk") == final["text"]

    # Memory: the middle device holds layers [start, stop) and nothing else.
    checkpoint = Checkpoint(smollm2_model)
    keys = [k for i in range(middle.start, middle.stop) for k in checkpoint.keys_with_prefix(f"model.layers.{i}.")]
    shard_params = sum(checkpoint.tensors[k].numel for k in keys)
    shard_bytes = checkpoint.bytes_of(keys)
    status = statuses[middle.device_id]
    assert status["param_count"] == shard_params
    # Peak anonymous memory (sampled RssAnon, see the next test) above the agent's own.
    above_baseline = peak - status["baseline_anon_mb"] * MIB
    print(f"middle device: layers [{middle.start}, {middle.stop}), shard {shard_bytes / MIB:.0f} MiB, "
          f"peak anonymous memory {peak / MIB:.0f} MiB, {above_baseline / MIB:.0f} MiB above its baseline, "
          f"model {checkpoint.total_bytes / MIB:.0f} MiB")
    assert above_baseline < checkpoint.total_bytes / 3
    assert shard_bytes <= above_baseline < shard_bytes + 48 * MIB

    # Clean shutdown: every process exits 0 on SIGTERM.
    assert all(code == 0 for code in codes.values()), codes


def test_a_model_larger_than_every_device_streams_layers_and_stays_in_budget(
    broker: LocalBroker, cluster_name: str, smollm2_model: Path, tmp_path: Path
) -> None:
    """SmolLM2 in float32 (513 MiB of weights, 621 MiB with the tied head held twice) on
    four agents with 160 MiB each above their baseline, of which the planner keeps 32 MiB
    free on each for working memory: 512 MiB for weights and KV cache in all, so the
    optimal planner must stream layers from disk. The answer is token-identical to transformers
    and every agent's peak memory above its baseline stays within its budget.

    Memory is measured from outside, from /proc/PID/status of each agent: RssAnon (its
    anonymous resident memory: weights, KV cache, buffers) sampled every 2 ms by this
    test from the agent's start until after the answer, its peak minus the RssAnon the
    agent reported as its baseline (after torch and the model code are imported, before
    it measured itself or read any weight). VmHWM (the kernel's peak of the whole RSS)
    is printed too: it also counts the pages of libtorch's code mapped in as it runs,
    which are shared and reclaimable, and vary by 0 to 80 MiB with the page cache.
    """
    budget_mb = 160
    devices = [DeviceSpec(f"edge-{i}", budget_mb) for i in range(4)]
    checkpoint = Checkpoint(smollm2_model)
    assert checkpoint.total_bytes > 3 * budget_mb * MIB
    with ProcessCluster(broker.url, cluster_name, str(smollm2_model), devices, tmp_path / "logs",
                        planner_args=("--context-tokens", "256")) as procs:
        sampler = AnonPeakSampler([procs.processes[d.device_id].pid for d in devices])
        plan = procs.wait_ready(timeout_s=180)
        assert sum(len(s.streamed) for s in plan.stages) > 0
        ids = [d.device_id for d in devices]

        async def run() -> tuple[list[dict], dict[str, dict]]:
            messages = [m async for m in ask(broker.url, cluster_name, {"messages": QUESTION, "max_tokens": 16})]
            return messages, await device_statuses(broker.url, cluster_name, ids)

        messages, statuses = asyncio.run(run())
        anon_peaks = sampler.stop()
        hwm = {d: peak_rss_bytes(statuses[d]["pid"]) for d in ids}
        codes = procs.stop()

    final = messages[-1]
    assert final["type"] == "final", (final, procs.log_tail())
    assert final["token_ids"] == reference_greedy(smollm2_model, prompt_ids(smollm2_model, messages=QUESTION), 16)
    for device_id in ids:
        status = statuses[device_id]
        mine = plan.stages_of(device_id)
        above = anon_peaks[status["pid"]] - status["baseline_anon_mb"] * MIB
        print(f"{device_id}: layers {[(s.start, s.stop) for s in mine]}, "
              f"{sum(len(s.streamed) for s in mine)} streamed, resident {sum(s.weight_bytes for s in mine) / MIB:.0f} "
              f"MiB; peak anonymous memory {above / MIB:.0f} MiB above baseline (budget {budget_mb} MiB); "
              f"VmHWM {(hwm[device_id] - status['baseline_rss_mb'] * MIB) / MIB:.0f} MiB above the baseline RSS")
        assert 0 < above <= budget_mb * MIB, (device_id, above / MIB)
    assert all(code == 0 for code in codes.values()), codes


def test_a_device_with_an_empty_cache_gets_its_shard_over_mqtt_and_serves(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device "fresh" starts with no model files at all (its own empty cache folder) and
    only the model's name; the coordinator is the weight source. It gets the config and
    exactly its own stage's tensors over MQTT (chunked, hash-checked; tests/test_weights.py
    shows resume and the hash check), and the cluster answers like transformers."""
    from lime_mqtt.model.adapter import adapter_for
    from lime_mqtt.model.builtin import received_folder

    cache = tmp_path / "fresh-cache"
    devices = [DeviceSpec("full", 10), DeviceSpec("fresh", 10, extra_args=("--weights-from-broker",))]
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path / "logs",
                        extra_env={"LIME_MQTT_CACHE": str(cache)},
                        planner_args=("--strategy", "equal", "--reserve-mb", "0", "--context-tokens", "64")) as procs:
        plan = procs.wait_ready(timeout_s=120)

        async def run() -> list[dict]:
            return [m async for m in ask(broker.url, cluster_name, {"prompt": "Pump P-3 status:", "max_tokens": 12})]

        messages = asyncio.run(run())
        codes = procs.stop()
    final = messages[-1]
    assert final["type"] == "final", (final, procs.log_tail())
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, "Pump P-3 status:"), 12)

    stage = plan.stage_of("fresh")
    assert stage is not None
    monkeypatch.setenv("LIME_MQTT_CACHE", str(cache))
    folder = received_folder(tiny_model.name)
    source = Checkpoint(tiny_model)
    adapter = adapter_for(source.config)
    wanted = {k for i in stage.layers for k in source.keys_with_prefix(adapter.layer_prefix(i))}
    if stage.embed:
        wanted.add(adapter.embed_key)
    if stage.head:
        wanted |= set(source.keys_with_prefix(adapter.norm_prefix))
        wanted.add(adapter.head_source_key(source.config, set(source.tensors)))
    received = Checkpoint(folder)
    assert set(received.tensors) == wanted  # exactly its own tensors, nothing else
    for key in wanted:
        assert torch.equal(received.read([key])[key], source.read([key])[key])
    assert "over MQTT" in (tmp_path / "logs" / "fresh.log").read_text()
    assert all(code == 0 for code in codes.values()), codes
