"""No single point of failure but the broker: two coordinators serve one cluster, and when
the one serving an answer is killed (SIGKILL) mid-answer, the client resumes the request
on the other. That one replays the prompt and the tokens the client already has, and the
answer completes token-identical to transformers', with a clean stream: chunk indices
0, 1, 2, ... with no gap and no repeat, and their text and tokens exactly the answer's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask
from lime_mqtt.core.topics import Topics
from lime_mqtt.core.view import ClusterView
from lime_mqtt.transport import transport_for
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import prompt_ids, reference_greedy

pytestmark = [pytest.mark.e2e]

PROMPT = "Close valve V-17 before starting the maintenance"
TOKENS = 120


def _east_and_west(procs: ProcessCluster, broker: str, cluster: str) -> None:
    """Coordinators east and west, both serving a ready plan."""
    procs.start_coordinator("east")
    procs.start_coordinator("west")
    procs.wait_ready()
    asyncio.run(_both_serving(broker, cluster, {"east", "west"}))


async def _both_serving(broker: str, cluster: str, names: set[str], timeout_s: float = 60) -> None:
    view = ClusterView(Topics(cluster))
    async with transport_for(broker).connection() as conn:
        await conn.subscribe(view.topics.all_coordinator_status)
        async with asyncio.timeout(timeout_s):
            async for message in conn.messages():
                view.take(message.topic, message.payload, message.retain)
                if names <= set(view.coordinators):
                    return


async def _ask_and_kill(broker: str, cluster: str, procs: ProcessCluster) -> tuple[list[dict], list[str]]:
    """Stream the answer; after 10 chunks, SIGKILL the coordinator that sends them. Also
    returns who sent each answer message, as a spy on the answer topics saw it."""
    topics = Topics(cluster)
    senders: list[str] = []
    async with transport_for(broker).connection() as spy:
        await spy.subscribe(topics.answers_inbox("default"), qos=1)

        async def watch() -> None:
            async for message in spy.messages():
                route = topics.parse(message.topic)
                if route is not None and json.loads(message.payload).get("type") in ("chunk", "final"):
                    senders.append(route.sender.name)

        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(watch(), name="answer-spy")
            messages: list[dict] = []
            async for message in ask(broker, cluster, {"id": "failover-1", "prompt": PROMPT, "max_tokens": TOKENS},
                                     timeout_s=120):
                messages.append(message)
                if len(messages) == 10:
                    procs.kill(f"coordinator-{senders[-1]}")  # the one serving it, with no goodbye
            watcher.cancel()
    return messages, senders


def test_an_answer_survives_the_loss_of_its_coordinator(broker: LocalBroker, cluster_name: str, tiny_model: Path,
                                                         tmp_path: Path) -> None:
    devices = [DeviceSpec(f"f{i}", 100, 1, ("--emulate-layer-delay-ms", "4")) for i in range(2)]
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path / "logs",
                        planner_args=("--strategy", "equal"), coordinator=False) as procs:
        _east_and_west(procs, broker.url, cluster_name)
        messages, senders = asyncio.run(_ask_and_kill(broker.url, cluster_name, procs))
        logs = procs.log_tail()
    final = messages[-1]
    assert final["type"] == "final", (final, logs)
    expected = reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), TOKENS)
    assert final["token_ids"] == expected
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))  # no gap, no repeat
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert [t for c in chunks for t in c["token_ids"]] == final["token_ids"]
    # Both coordinators answered: the first until it was killed, the other to the end.
    first, last = senders[0], senders[-1]
    assert first != last and {first, last} == {"east", "west"}, senders
    assert senders.index(last) >= 10


def test_a_standby_planner_takes_over_and_plans_around_a_lost_device(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    """Planner `main` plans; planner `spare` (--standby) waits. `main` is killed (SIGKILL):
    its last will clears its status, and `spare` takes over from the retained plan. A
    device of that plan is then killed: `spare` plans without it, and the answer is
    token-identical."""
    from lime_mqtt.cli.cluster import wait_for_ready_plan

    devices = [DeviceSpec(f"p{i}", 100, 1) for i in range(2)]
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path / "logs", planner=False,
                        planner_args=()) as procs:
        procs.start_planner("main", "--quorum", "2", "--strategy", "equal", "--heartbeat-timeout", "3")
        first = procs.wait_ready()
        procs.start_planner("spare", "--quorum", "1", "--strategy", "equal", "--heartbeat-timeout", "3", "--standby")
        planners = asyncio.run(_planner_statuses(broker.url, cluster_name, {"main"}))
        assert planners == {"main"}  # the standby says nothing while it waits
        procs.kill("planner-main")
        asyncio.run(_planner_statuses(broker.url, cluster_name, {"spare"}))  # it took over
        lost = first.stages[-1].device_id
        procs.kill(lost)
        plan = asyncio.run(wait_for_ready_plan(broker.url, cluster_name, timeout_s=60))
        while plan.epoch == first.epoch:
            plan = asyncio.run(wait_for_ready_plan(broker.url, cluster_name, timeout_s=60))
        messages = asyncio.run(_collect(broker.url, cluster_name))
        logs = procs.log_tail()
    assert [s.device_id for s in first.stages] == ["p0", "p1"]
    assert plan.epoch > first.epoch and lost not in {s.device_id for s in plan.stages}, (plan, logs)
    final = messages[-1]
    assert final["type"] == "final", (final, logs)
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 16)


async def _planner_statuses(broker: str, cluster: str, wanted: set[str], timeout_s: float = 30) -> set[str]:
    """The planners whose retained status is there, once it is exactly ``wanted``."""
    topics = Topics(cluster)
    present: set[str] = set()
    async with transport_for(broker).connection() as conn:
        await conn.subscribe(topics.all_planner_status)
        async with asyncio.timeout(timeout_s):
            async for message in conn.messages():
                route = topics.parse(message.topic)
                if route is not None:
                    (present.add if message.payload else present.discard)(route.sender.name)
                if present == wanted:
                    return present
    return present


async def _collect(broker: str, cluster: str) -> list[dict]:
    return [m async for m in ask(broker, cluster, {"prompt": PROMPT, "max_tokens": 16}, timeout_s=60)]


def test_the_http_bridge_resumes_a_stream_whose_coordinator_dies(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The same loss under the HTTP bridge: an OpenAI stream whose coordinator is killed
    after its 10th event completes through the other coordinator with the text a lone
    answer has, no gap and no repetition."""
    import openai

    from lime_mqtt.client import ask_final
    from lime_mqtt.transport.mosquitto import free_port

    devices = [DeviceSpec(f"h{i}", 100, 1, ("--emulate-layer-delay-ms", "4")) for i in range(2)]
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path / "logs",
                        planner_args=("--strategy", "equal"), coordinator=False) as procs:
        _east_and_west(procs, broker.url, cluster_name)
        url = procs.start_bridge(free_port())
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        topics, senders = Topics(cluster_name), []

        async def spy_until(count: int) -> str:
            """Who sends the bridge's answers, once ``count`` chunks have gone by."""
            async with transport_for(broker.url).connection() as spy:
                await spy.subscribe(topics.answers_inbox("default"), qos=1)
                async with asyncio.timeout(60):
                    async for message in spy.messages():
                        route = topics.parse(message.topic)
                        if route is not None:
                            senders.append(route.sender.name)
                        if len(senders) >= count:
                            return senders[-1]
            raise AssertionError("no answers")

        pieces = []
        stream = api.completions.create(model=tiny_model.name, prompt=PROMPT, max_tokens=TOKENS, stream=True)
        for event in stream:
            pieces.append(event.choices[0].text)
            if len(pieces) == 10:
                procs.kill(f"coordinator-{asyncio.run(spy_until(1))}")
        survivor = asyncio.run(ask_final(broker.url, cluster_name, {"prompt": PROMPT, "max_tokens": TOKENS}))
        logs = procs.log_tail()
    assert survivor["type"] == "final", (survivor, logs)
    assert survivor["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), TOKENS)
    assert len(pieces) > 10, pieces  # it went on after the kill: another coordinator served the rest
    assert "".join(pieces) == survivor["text"], logs
