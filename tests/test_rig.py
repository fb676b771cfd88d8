"""The shaped-network rig (lime_mqtt/cli/rig.py), as root: each device agent in its own
network namespace behind a 20 Mbit/s veth link (tbf) with 5 ms added round trip (the
delaying proxy). The answer is token-identical to transformers'; the devices measured the
shaped link; and the rig leaves no namespace, link or process behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from lime_mqtt.cli.cluster import device_statuses
from lime_mqtt.cli.rig import Link, Rig, RigDevice
from lime_mqtt.client import ask_final
from tests.helpers import prompt_ids, reference_greedy

pytestmark = [pytest.mark.e2e]

PROMPT = "Close valve V-17 before starting the maintenance"
# Long enough to be cut in several link-sized chunks (coordinator --prefill-link-ms 2).
LONG_PROMPT = ("Shift report for line 2: pump P-3 ran hot after the filter change, valve V-17 was closed for "
               "maintenance, the conveyor stopped twice because of a jammed roller, and the compressor cycled "
               "on and off every few minutes until the night crew replaced the pressure switch")


async def coordinator_figures(broker: str, cluster: str, answered: int) -> dict:
    """The first telemetry of the cluster's coordinator that counts ``answered`` answers."""
    from lime_mqtt.core.messages import decode_coordinator_telemetry
    from lime_mqtt.core.topics import Topics
    from lime_mqtt.transport import transport_for

    async with transport_for(broker).connection() as conn:
        await conn.subscribe(Topics(cluster).all_coordinator_telemetry, qos=0)
        async with asyncio.timeout(30):
            async for message in conn.messages():
                figures = decode_coordinator_telemetry(message.payload)
                if figures.answered >= answered:
                    return figures.model_dump()
    raise AssertionError("no coordinator telemetry")


@pytest.mark.skipif(os.geteuid() != 0, reason="the rig needs root (make test runs as root in CI)")
def test_an_answer_through_shaped_links_is_token_identical_and_the_rig_cleans_up(tiny_model: Path,
                                                                                  tmp_path: Path) -> None:
    name = uuid.uuid4().hex[:5]
    devices = [RigDevice(f"rig-{i}", 100, Link(up_mbit=20, down_mbit=20, rtt_ms=5)) for i in range(2)]
    rig = Rig(name, str(tiny_model), devices, log_dir=tmp_path / "logs", planner_args=("--strategy", "equal"),
              coordinator_args=("--prefill-link-ms", "2", "--telemetry-interval", "0.5"))
    with rig:
        assert sorted(rig.leftovers().get("namespaces", [])) == [rig.namespace(0), rig.namespace(1)]
        final = asyncio.run(ask_final(rig.broker.url, rig.cluster, {"prompt": PROMPT, "max_tokens": 24},
                                      timeout_s=120))
        long_final = asyncio.run(ask_final(rig.broker.url, rig.cluster, {"prompt": LONG_PROMPT, "max_tokens": 8},
                                           timeout_s=120))
        figures = asyncio.run(coordinator_figures(rig.broker.url, rig.cluster, answered=2))
        statuses = asyncio.run(device_statuses(rig.broker.url, rig.cluster, [d.device_id for d in devices]))
    assert final["type"] == "final", final
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 24)
    links = []
    for device in devices:
        link = statuses[device.device_id]["capabilities"]
        assert link["link_rtt_ms"] >= 5.0, link  # the added round trip, through the proxy
        assert link["link_mb_s"] < 20 / 8, link  # no more than the 20 Mbit/s the link allows
        links.append(link["link_mb_s"])
    # The long prompt went in chunks sized for the slowest measured link, and its answer is
    # still transformers'.
    from lime_mqtt.model.checkpoint import Checkpoint
    from lime_mqtt.planning.cost import link_chunk_tokens

    long_ids = prompt_ids(tiny_model, LONG_PROMPT)
    checkpoint = Checkpoint(tiny_model)
    chunk = link_chunk_tokens(256, int(checkpoint.config_dict["hidden_size"]) * checkpoint.itemsize, links, 2.0)
    assert chunk < len(long_ids), (chunk, len(long_ids))
    leading = sum(-(-len(ids) // chunk) - 1 for ids in (prompt_ids(tiny_model, PROMPT), long_ids))
    assert figures["prefill_chunks"] == leading >= 2, (figures, chunk, len(long_ids))
    assert long_final["type"] == "final", long_final
    assert long_final["token_ids"] == reference_greedy(tiny_model, long_ids, 8)
    assert rig.leftovers() == {}
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"lrig-{name}-" not in names and f"lr{name}" not in links


@pytest.mark.skipif(os.geteuid() != 0, reason="the rig needs root (make test runs as root in CI)")
def test_a_link_that_degrades_while_serving_is_planned_around(tiny_model: Path, tmp_path: Path) -> None:
    """Two devices on good links; mid-answer, the link of a device of the plan gets a
    150 ms round trip. The device measures it again (every second here), says so in its
    status, the planner plans without it, and the answer, replayed on the new plan,
    stays token-identical."""
    from lime_mqtt.client import ask
    from lime_mqtt.core.topics import Topics
    from lime_mqtt.core.view import ClusterView
    from lime_mqtt.transport import transport_for

    name = uuid.uuid4().hex[:5]
    args = ("--link-interval", "1", "--emulate-layer-delay-ms", "3")
    devices = [RigDevice(f"wifi-{i}", 100, Link(rtt_ms=0.0), extra_args=args) for i in range(2)]
    rig = Rig(name, str(tiny_model), devices, log_dir=tmp_path / "logs")
    tokens = 200

    async def serve_and_degrade() -> tuple[list[dict], str]:
        messages, degraded = [], ""
        async for message in ask(rig.broker.url, rig.cluster, {"prompt": PROMPT, "max_tokens": tokens},
                                 timeout_s=180):
            messages.append(message)
            if len(messages) == 5:
                degraded = first.stages[0].device_id
                rig.shape(degraded, Link(rtt_ms=150.0))
        return messages, degraded

    async def current_plan() -> object:
        view = ClusterView(Topics(rig.cluster))
        async with transport_for(rig.broker.url).connection() as conn:
            await conn.subscribe(view.topics.all_plans)
            async with asyncio.timeout(10):
                async for message in conn.messages():
                    view.take(message.topic, message.payload, message.retain)
                    return view.plan
        return None

    with rig:
        first = rig.plan
        assert first is not None
        messages, degraded = asyncio.run(serve_and_degrade())
        after = asyncio.run(current_plan())
    final = messages[-1]
    assert final["type"] == "final", final
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), tokens)
    assert after is not None and after.epoch > first.epoch  # type: ignore[attr-defined]
    assert degraded not in {s.device_id for s in after.stages}, after  # type: ignore[attr-defined]
    assert rig.leftovers() == {}
