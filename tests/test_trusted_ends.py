"""Trusted ends: with ``trusted_ends`` the planner puts the first stage (it sees token ids)
and the last (it chooses them) only on devices marked trusted, so token ids never reach
the others (docs/security.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from pathlib import Path

import pytest

from lime_mqtt.cli.cluster import wait_for_ready_plan
from lime_mqtt.client import ask_final
from lime_mqtt.coordinator.service import Coordinator
from lime_mqtt.core.errors import PlanError
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.core.wire import Step, decode_envelope
from lime_mqtt.device.agent import DeviceAgent
from lime_mqtt.planner.service import PlannerService
from lime_mqtt.planning.plan import MIB, DeviceProfile, ModelSize, Workload, make_plan
from lime_mqtt.transport import connect
from lime_mqtt.transport.memory import MemoryBroker
from tests.helpers import prompt_ids, reference_greedy, running

MODEL = ModelSize("m", layer_bytes=(10 * MIB,) * 12, embed_bytes=20 * MIB, head_bytes=20 * MIB,
                  kv_bytes_per_token_per_layer=1024, hidden_bytes_per_token=256)
ENDS = Workload(context_tokens=256, reserve_bytes=4 * MIB, trusted_ends=True)


def _devices(trusted: str, fast_untrusted: bool = True) -> list[DeviceProfile]:
    """Three devices that can each hold about a third of the model; the untrusted ones fastest."""
    return [DeviceProfile(f"d{i}", 80 * MIB, layer_decode_ms=0.5 if (f"d{i}" not in trusted and fast_untrusted)
                          else 2.0, trusted=f"d{i}" in trusted) for i in range(3)]


@pytest.mark.parametrize("strategy", ["optimal", "memory", "equal"])
@pytest.mark.parametrize("trusted", ["d1 d2", "d0 d2", "d0 d1"])
def test_the_ends_go_to_trusted_devices(strategy: str, trusted: str) -> None:
    plan = make_plan(MODEL, _devices(trusted), epoch=1, workload=ENDS, strategy=strategy)  # type: ignore[arg-type]
    assert plan.stages[0].device_id in trusted and plan.stages[-1].device_id in trusted
    assert len(plan.stages) == 3  # no device holds much more than a third: the untrusted one runs the middle
    assert plan.stages[1].device_id not in trusted


def test_without_trusted_ends_an_untrusted_device_may_take_an_end() -> None:
    """The control: the constraint is what moves the untrusted device to the middle."""
    plain = dataclasses.replace(ENDS, trusted_ends=False)
    unconstrained = make_plan(MODEL, _devices("d1 d2"), epoch=1, workload=plain, strategy="equal")
    assert unconstrained.stages[0].device_id == "d0"  # id order: the untrusted device takes the token ids
    constrained = make_plan(MODEL, _devices("d1 d2"), epoch=1, workload=ENDS, strategy="equal")
    assert [s.device_id for s in constrained.stages] == ["d1", "d0", "d2"]


def test_the_search_with_trusted_ends_is_the_best_placement_that_keeps_them() -> None:
    """Brute force over every ordered subset of the devices with trusted ends and every contiguous split."""
    from lime_mqtt.planning.cost import evaluate, layout_stage

    devices = _devices("d0 d2")
    best = float("inf")
    for k in (1, 2, 3):
        for order in itertools.permutations(devices, k):
            if not (order[0].trusted and order[-1].trusted):
                continue
            for cuts in itertools.combinations(range(1, 12), k - 1):
                bounds = [0, *cuts, 12]
                stages = [layout_stage(MODEL, d, s, e, s == 0, e == 12, ENDS)
                          for d, s, e in zip(order, bounds, bounds[1:], strict=False)]
                if all(stages):
                    best = min(best, evaluate(stages, ENDS).objective("latency"))  # type: ignore[arg-type]
    plan = make_plan(MODEL, devices, epoch=1, workload=ENDS, interleaving=False)
    assert plan.predicted_ms_per_token == pytest.approx(best, abs=1e-3)  # the plan rounds to 4 places


def test_no_trusted_device_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="trusted devices"):
        make_plan(MODEL, _devices(""), epoch=1, workload=ENDS)


def test_one_trusted_device_that_holds_the_model_runs_it_alone() -> None:
    big = DeviceProfile("big", 400 * MIB, trusted=True)
    plan = make_plan(MODEL, [big, *_devices("")], epoch=1, workload=ENDS)
    assert [s.device_id for s in plan.stages] == ["big"]


async def test_untrusted_devices_never_receive_a_token_id(tiny_model: Path) -> None:
    """A real cluster on the twin, the planner with trusted ends: every message to the
    untrusted device's stage carries hidden states, never token ids, and the answer is
    transformers'."""
    broker, cluster = MemoryBroker(), "trusted"
    topics = Topics(cluster)
    devices = [DeviceAgent(broker, cluster, name, 10, tiny_model, measure=False, trusted=name != "untrusted")
               for name in ("untrusted", "t1", "t2")]  # by id, "untrusted" would come last: the head
    planner = PlannerService(broker, cluster, tiny_model, quorum=3, settle_s=0.2, strategy="equal", reserve_mb=0,
                             context_tokens=64, trusted_ends=True)
    coordinator = Coordinator(broker, cluster, tiny_model)
    seen: list[tuple[str, object]] = []
    async with connect(broker) as spy:
        await spy.subscribe(f"{topics.root}/#")  # every message of the cluster

        async def listen() -> None:
            async for message in spy.messages():
                route = topics.parse(message.topic)
                if route is not None and route.kind in ("stage", "result", "control"):
                    seen.append((message.topic, decode_envelope(message.payload)))

        services = {"planner": planner, "coordinator": coordinator, **{d.device_id: d for d in devices}}
        async with running(services), asyncio.TaskGroup() as tasks:
            listener = tasks.create_task(listen(), name="spy")
            plan = await wait_for_ready_plan(broker, cluster, timeout_s=30, quorum=3)
            answer = await ask_final(broker, cluster, {"prompt": "Pump pressure", "max_tokens": 6})
            listener.cancel()
    stages = {s.device_id: s.stage for s in plan.stages}
    assert plan.stages[0].device_id != "untrusted" and plan.stages[-1].device_id != "untrusted"
    untrusted = Identity("device", "untrusted")
    to_untrusted = [envelope for topic, envelope in seen if getattr(topics.parse(topic), "to", None) == untrusted]
    assert stages["untrusted"] not in (0, len(plan.stages) - 1)
    assert to_untrusted and all(isinstance(e, Step) and e.tokens is None and e.hidden is not None
                                for e in to_untrusted)
    assert answer["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, "Pump pressure"), 6)
