"""Unit: each message is bound to its sender (topic layout 2), on the in-memory twin.

The broker's ACL stops a component from publishing under another's name (shown on a real
Mosquitto with the generated configuration in tests/test_broker_secure.py and
tests/test_secure_cluster.py). What the receivers do with what the ACL lets through is
shown here: a stage takes steps only from the sender the plan puts before it, a
coordinator takes tokens only from the plan's last device, request ids belong to their
client, and a client that floods its request topic is slowed down without disturbing
anyone else.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch

from lime_mqtt.client import ask, ask_final, cancel
from lime_mqtt.coordinator.generation import _sent_by_plan
from lime_mqtt.coordinator.ratelimit import ClientRates
from lime_mqtt.core.plan import Plan, StagePlan
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.core.wire import Sampling, StageError, Step, Token, decode_envelope
from lime_mqtt.transport.memory import MemoryBroker
from tests.helpers import TEST_COORDINATOR, in_process_cluster, prompt_ids, reference_greedy, stage_topic

FAST = {"measure": False}
GOOD = {"prompt": "Summarise the shift report", "max_tokens": 8}


def two_stages(model: Path, epoch: int = 1) -> Plan:
    stages = [StagePlan(stage=0, device_id="dev0", start=0, stop=3, embed=True, head=False, weight_bytes=0,
                        kv_tokens=4096),
              StagePlan(stage=1, device_id="dev1", start=3, stop=6, embed=False, head=True, weight_bytes=0,
                        kv_tokens=4096)]
    return Plan(epoch=epoch, model=model.name, num_layers=6, stages=stages, strategy="test")


async def test_a_stage_takes_steps_only_from_the_sender_the_plan_puts_before_it(
    cluster_name: str, tiny_model: Path
) -> None:
    """Stage 1 (dev1) runs hidden states from dev0 only: the same step from dev1 itself,
    from a third device, from a coordinator or from a client is dropped unread; stage 0
    takes steps from coordinators only."""
    broker = MemoryBroker()
    topics = Topics(cluster_name)
    plan = two_stages(tiny_model)
    async with in_process_cluster(broker, cluster_name, tiny_model, [10, 10], device_options=FAST,
                                  plan=plan) as cluster:
        first, second = cluster.devices
        width = second.host.hidden_size
        assert width is not None
        ids = prompt_ids(tiny_model, GOOD["prompt"])
        hidden = Step("h", 0, plan.epoch, 0, hidden=_hidden(width), sampling=Sampling(),
                      reply=TEST_COORDINATOR).encode()
        tokens = Step("t", 0, plan.epoch, 0, tokens=ids, sampling=Sampling(), reply=TEST_COORDINATOR).encode()
        impostors = [Identity("device", "dev1"), Identity("device", "dev7"), Identity("coordinator", "main"),
                     Identity("client", "mallory")]
        async with broker.connection() as conn:
            await conn.subscribe(topics.results_inbox(TEST_COORDINATOR))
            messages = conn.messages()
            for sender in impostors:
                await conn.publish(stage_topic(topics, plan, 1, sender), hidden, qos=1)
            for sender in (Identity("device", "dev0"), Identity("client", "mallory")):
                await conn.publish(stage_topic(topics, plan, 0, sender), tokens, qos=1)
            await conn.publish(stage_topic(topics, plan, 1), hidden, qos=1)  # from dev0: the plan's
            async with asyncio.timeout(10):
                answer = decode_envelope((await anext(messages)).payload)
            route = topics.parse(topics.result("dev1", TEST_COORDINATOR))
            steps = (first.steps_done, second.steps_done)
            await conn.publish(stage_topic(topics, plan, 0), tokens, qos=1)  # from a coordinator: the plan's
            async with asyncio.timeout(10):
                from_start = decode_envelope((await anext(messages)).payload)
        final = await cluster.final(GOOD)
    assert isinstance(answer, Token) and answer.request_id == "h"  # the first answer is the good step's
    assert route is not None and route.sender == Identity("device", "dev1")
    assert steps == (0, 1)  # no impostor's step was run
    assert first.scheduler.impostors == 2 and second.scheduler.impostors == len(impostors)
    assert isinstance(from_start, Token) and from_start.request_id == "t"
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, GOOD["prompt"]), 8)


def _hidden(width: int) -> torch.Tensor:
    return torch.randn(1, 2, width)


def test_a_coordinator_takes_a_token_only_from_the_last_stage_and_errors_from_the_plan(tiny_model: Path) -> None:
    plan = two_stages(tiny_model)
    token = Token("r", 0, 1, 0, token=5)
    assert _sent_by_plan(token, "dev1", plan)
    assert not _sent_by_plan(token, "dev0", plan) and not _sent_by_plan(token, "dev9", plan)
    assert _sent_by_plan(StageError("r", 0, 1, "dev0", "bad token"), "dev0", plan)
    assert not _sent_by_plan(StageError("r", 0, 1, "dev1", "bad token"), "dev0", plan)  # naming another
    assert not _sent_by_plan(StageError("r", 0, 1, "dev9", "bad token"), "dev9", plan)  # not in the plan


async def test_a_client_cannot_cancel_another_clients_request(cluster_name: str, tiny_model: Path) -> None:
    """Client b sends a cancel for the id of client a's request (on its own request topic,
    the only one the ACL lets it use): a's answer completes, whole and greedy; b's own
    request of the same id is the one cancelled."""
    broker = MemoryBroker()
    request = {"id": "shared-id", "prompt": "Close valve V-17 before starting", "max_tokens": 24}
    async with in_process_cluster(broker, cluster_name, tiny_model, [10, 10], device_options=FAST):
        got: list[dict] = []
        stream = ask(broker, cluster_name, request, timeout_s=60, client="a")
        got.append(await anext(stream))  # a's answer is under way
        await cancel(broker, cluster_name, "shared-id", client="b")
        async for message in stream:
            got.append(message)
        b_stream = ask(broker, cluster_name, {**request, "max_tokens": 200}, timeout_s=60, client="b")
        b_first = await anext(b_stream)
        await cancel(broker, cluster_name, "shared-id", client="b")
        b_last = [m async for m in b_stream][-1] if b_first["type"] not in ("final", "error") else b_first
    final = got[-1]
    assert final["type"] == "final" and final["id"] == "shared-id", final
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, request["prompt"]), 24)
    assert "".join(m["text"] for m in got if m["type"] == "chunk") == final["text"]
    assert b_last["type"] == "error" and b_last["error"]["code"] == "cancelled", b_last


async def test_a_flooding_client_is_slowed_and_nobody_else_notices(cluster_name: str, tiny_model: Path) -> None:
    """600 garbage messages at once from one client, past its burst of 256: the rest are
    dropped, it gets a ``rate_limited`` error, and another client's request is answered
    as before."""
    broker = MemoryBroker()
    topics = Topics(cluster_name)
    async with in_process_cluster(broker, cluster_name, tiny_model, [10, 10], device_options=FAST) as cluster:
        before = await ask_final(broker, cluster_name, GOOD, client="calm")
        async with broker.connection() as conn:
            await conn.subscribe(topics.answers_inbox("flood"))
            messages = conn.messages()
            for n in range(600):
                await conn.publish(topics.requests("flood"), json.dumps({"cancel": f"x{n}"}).encode(), qos=1)
            async with asyncio.timeout(10):
                refused = json.loads((await anext(messages)).payload)
        after = await ask_final(broker, cluster_name, GOOD, client="calm")
        dropped = cluster.coordinator.intake.rates.dropped("flood")
    assert refused["type"] == "error" and refused["error"]["code"] == "rate_limited", refused
    assert 600 - 256 - 32 <= dropped <= 600 - 256  # a few tokens may come back while the flood is read
    assert after["type"] == "final" and after["token_ids"] == before["token_ids"]


def test_client_rates_refill_at_their_rate() -> None:
    now = [0.0]
    rates = ClientRates(rate=2.0, burst=3, clock=lambda: now[0])
    assert [rates.take("a") for _ in range(4)] == [True, True, True, False]
    assert rates.take("b")  # another client has its own bucket
    assert rates.should_warn("a") and not rates.should_warn("a")  # one error per second
    now[0] = 0.5
    assert rates.take("a") and not rates.take("a")  # 0.5 s at 2/s: one more
    now[0] = 10.0
    assert [rates.take("a") for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more
    assert rates.dropped("a") == 3 and rates.should_warn("a")
