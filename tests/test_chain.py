"""Unit: chained decode steps (wire.Chain): the last stage sends each next decode step to the
first stage itself, and the coordinator only awaits its token.

On the in-memory twin (lime_mqtt/transport/memory.py), whose ``lose`` loses chosen QoS 0
messages as a network may. The chain on a real Mosquitto, with device agents as processes,
is what every end-to-end test runs (it is the default).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest

from lime_mqtt.core.errors import WireError
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.core.wire import Chain, Sampling, Step, Token, decode_envelope
from lime_mqtt.transport.memory import MemoryBroker
from tests.helpers import (
    TEST_COORDINATOR,
    fixed_plan,
    in_process_cluster,
    prompt_ids,
    reference_greedy,
    stage_topic,
    wait_until,
)

PROMPT = "Close valve V-17 before starting the maintenance"
FAST = {"measure": False}
SPANS = [(0, 2), (2, 3), (3, 6)]  # uneven, three devices


# -- the envelope -----------------------------------------------------------------------


def test_a_chain_travels_with_its_step_and_is_checked() -> None:
    step = Step("r", 3, 2, 40, tokens=[7], sampling=Sampling(), reply="main", chain=Chain(64, (2, 0)))
    assert decode_envelope(step.encode()) == step
    assert decode_envelope(Step("r", 3, 2, 40, tokens=[7]).encode()).chain is None  # optional
    body = {"v": 4, "kind": "step", "rid": "r", "step": 0, "epoch": 1, "tokens": [1]}
    import cbor2

    for bad in ({"u": -1, "s": []}, {"u": 8, "s": [-1]}, {"u": 8, "s": list(range(17))}, {"u": 8},
                {"u": True, "s": []}, [8, []]):
        with pytest.raises(WireError, match="chain"):
            decode_envelope(cbor2.dumps({**body, "chain": bad}))


def test_a_chain_goes_on_below_its_end_and_stops_at_a_stop_token() -> None:
    chain = Chain(until=4, stop=(2,))
    assert chain.follows(0, 5) and chain.follows(2, 5)
    assert not chain.follows(3, 5)  # step 4 would be past the request's max_tokens
    assert not chain.follows(1, 2)  # end of sequence: nothing follows
    assert not chain.follows(-1, 5)  # a leading prefill chunk gives no token


# -- a cluster on the twin ----------------------------------------------------------------


def steps_seen(broker: MemoryBroker, cluster: str) -> collections.Counter[str]:
    """Counts, by sender role, of the steps sent to stage 0 (the rule loses nothing)."""
    seen: collections.Counter[str] = collections.Counter()
    topics = Topics(cluster)

    def count(topic: str, payload: bytes) -> bool:
        route = topics.parse(topic)
        if route is not None and route.kind == "stage" and route.arg == "0":
            seen[route.sender.role] += 1
        return False

    broker.lose(count)
    return seen


def lose_once(broker: MemoryBroker, cluster: str, kind: str, step: int) -> list[int]:
    """Lose the first ``kind`` message ("stage0": a step to stage 0 from the last device;
    "result": a token to the coordinator) of step ``step``; the list says how many were lost."""
    lost: list[int] = []
    topics = Topics(cluster)

    def rule(topic: str, payload: bytes) -> bool:
        route = topics.parse(topic)
        if lost or route is None:
            return False
        wanted = (route.kind == "result" if kind == "result"
                  else route.kind == "stage" and route.arg == "0" and route.sender.role == "device")
        if wanted and decode_envelope(payload).step == step:  # type: ignore[union-attr]
            lost.append(step)
            return True
        return False

    broker.lose(rule)
    return lost


async def answer(cluster_name: str, tiny_model: Path, broker: MemoryBroker, tokens: int,
                 **coordinator: Any) -> tuple[dict[str, Any], Any]:
    plan = fixed_plan(tiny_model, SPANS)
    async with in_process_cluster(broker, cluster_name, tiny_model, [10, 10, 10], device_options=FAST, plan=plan,
                                  **coordinator) as cluster:
        final = await cluster.final({"prompt": PROMPT, "max_tokens": tokens})
        devices = cluster.devices
        await wait_until(lambda: not any(d.sequences for d in devices))  # every cache freed at the end
        return final, cluster.coordinator


@pytest.mark.parametrize("chain", [True, False], ids=["chained", "unchained"])
async def test_the_coordinator_sends_only_the_first_step_of_a_chained_request(
    cluster_name: str, tiny_model: Path, chain: bool
) -> None:
    broker = MemoryBroker()
    seen = steps_seen(broker, cluster_name)
    final, coordinator = await answer(cluster_name, tiny_model, broker, 12, chain=chain)
    assert final["type"] == "final", final
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 12)
    if chain:
        assert seen == {"coordinator": 1, "device": 11}  # the prefill; then the last device, every token after
    else:
        assert seen == {"coordinator": 12}
    assert coordinator.generation.stats.replays == 0


async def test_a_lost_chained_step_is_sent_again_by_the_coordinator(cluster_name: str, tiny_model: Path) -> None:
    broker = MemoryBroker()
    lost = lose_once(broker, cluster_name, "stage0", 5)
    seen = steps_seen(broker, cluster_name)
    final, coordinator = await answer(cluster_name, tiny_model, broker, 12, step_retry_s=0.3)
    assert lost == [5]
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 12)
    assert seen["coordinator"] == 2  # the prefill and step 5, after which the chain went on
    assert coordinator.generation.stats.replays == 0


async def test_a_lost_token_whose_chain_went_on_is_replayed(cluster_name: str, tiny_model: Path) -> None:
    broker = MemoryBroker()
    lost = lose_once(broker, cluster_name, "result", 4)
    final, coordinator = await answer(cluster_name, tiny_model, broker, 12, step_retry_s=0.3)
    assert lost == [4]
    assert final["type"] == "final", final
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 12)
    assert coordinator.generation.stats.replays == 1  # token 4 came no more: the history again, under a new id


async def test_a_chain_that_stalls_twice_goes_on_unchained(cluster_name: str, tiny_model: Path) -> None:
    """Step 6 is lost from the last device every time: the coordinator's own send is lost
    too (it does not reach stage 0 either), so after two unanswered sends it replays and
    goes on without the chain."""
    broker = MemoryBroker()
    topics = Topics(cluster_name)
    lost: list[str] = []

    def rule(topic: str, payload: bytes) -> bool:
        route = topics.parse(topic)
        if route is None or route.kind != "stage" or route.arg != "0" or len(lost) >= 3:
            return False
        envelope = decode_envelope(payload)
        if isinstance(envelope, Step) and envelope.step == 6 and envelope.chain is not None:
            lost.append(route.sender.role)
            return True
        return False

    broker.lose(rule)
    final, coordinator = await answer(cluster_name, tiny_model, broker, 12, step_retry_s=0.3)
    assert lost == ["device", "coordinator"]  # then replayed unchained: nothing chained to lose
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, PROMPT), 12)
    assert coordinator.generation.stats.replays == 1


async def test_stage_zero_takes_from_the_last_device_only_the_next_step_of_a_chain(
    cluster_name: str, tiny_model: Path
) -> None:
    """The last device may go on with a chained request whose cache is at stage 0, one
    step after the one run there; it may not start, skip or rewind one. Another device
    may not send to stage 0 at all."""
    broker = MemoryBroker()
    topics = Topics(cluster_name)
    plan = fixed_plan(tiny_model, SPANS)
    ids = prompt_ids(tiny_model, PROMPT)
    chain = Chain(32)
    last = Identity("device", plan.stages[-1].device_id)
    middle = Identity("device", plan.stages[1].device_id)
    async with in_process_cluster(broker, cluster_name, tiny_model, [10, 10, 10], device_options=FAST,
                                  plan=plan) as cluster:
        first = cluster.devices[0]
        async with broker.connection() as conn:
            await conn.subscribe(topics.results_inbox(TEST_COORDINATOR))
            messages = conn.messages()

            def step(number: int, pos: int, tokens: list[int], rid: str = "c") -> Step:
                return Step(rid, number, plan.epoch, pos, tokens=tokens, sampling=Sampling(), reply=TEST_COORDINATOR,
                            chain=chain)

            async def from_(sender: Identity | None, envelope: Step) -> None:
                await conn.publish(stage_topic(topics, plan, 0, sender), envelope.encode(), qos=1)

            async def tokens(count: int) -> list[int]:
                got: list[int] = []
                while len(got) < count:
                    token = decode_envelope((await anext(messages)).payload)
                    assert isinstance(token, Token) and token.token is not None
                    got.append(token.token)
                return got

            impostors = first.scheduler.impostors
            await from_(last, step(0, 0, ids, rid="start"))  # the last device may not start a request
            await from_(middle, step(0, 0, ids))  # nor may any device but it send to stage 0
            await wait_until(lambda: first.scheduler.impostors == impostors + 2)
            assert ("start", 0) not in first.sequences
            # A chained request that runs to its end (32 steps) is answered token by token.
            await from_(None, Step("c", 0, plan.epoch, 0, tokens=ids, sampling=Sampling(), reply=TEST_COORDINATOR,
                                   chain=Chain(3)))
            got = await tokens(3)
            await from_(last, step(5, len(ids) + 4, [got[-1]]))  # skipping ahead
            await wait_until(lambda: first.scheduler.impostors == impostors + 3)
            duplicates = first.scheduler.duplicates
            await from_(last, step(2, len(ids) + 1, [got[1]]))  # step 2 again: a late copy
            await wait_until(lambda: first.scheduler.duplicates == duplicates + 1)
    assert got == reference_greedy(tiny_model, ids, 3)


async def test_the_last_stage_starts_no_chained_step_for_a_coordinator_that_has_gone(
    cluster_name: str, tiny_model: Path
) -> None:
    """A coordinator's cleared status (its last will) stops the chains it started: they
    would otherwise run to their end for nobody."""
    broker = MemoryBroker()
    topics = Topics(cluster_name)
    plan = fixed_plan(tiny_model, SPANS)
    ids = prompt_ids(tiny_model, PROMPT)
    chained: collections.Counter[str] = collections.Counter()  # steps to stage 0 from a device, by request

    def count(topic: str, payload: bytes) -> bool:
        route = topics.parse(topic)
        if route is not None and route.kind == "stage" and route.arg == "0" and route.sender.role == "device":
            chained[decode_envelope(payload).request_id] += 1  # type: ignore[union-attr]
        return False

    broker.lose(count)
    async with in_process_cluster(broker, cluster_name, tiny_model, [10, 10, 10], device_options=FAST,
                                  plan=plan) as cluster:
        last = cluster.devices[-1]
        async with broker.connection() as conn:
            await conn.subscribe(topics.results_inbox(TEST_COORDINATOR))
            messages = conn.messages()

            async def first_token(rid: str) -> Token:
                await conn.publish(stage_topic(topics, plan, 0), Step(
                    rid, 0, plan.epoch, 0, tokens=ids, sampling=Sampling(), reply=TEST_COORDINATOR,
                    chain=Chain(2)).encode(), qos=1)
                while True:
                    token = decode_envelope((await anext(messages)).payload)
                    if isinstance(token, Token) and token.request_id == rid:
                        return token

            await first_token("before")
            await conn.publish(topics.coordinator_status(TEST_COORDINATOR), b"{}", qos=1, retain=True)
            await conn.publish(topics.coordinator_status(TEST_COORDINATOR), b"", qos=1, retain=True)  # its will
            await wait_until(lambda: TEST_COORDINATOR in last.gone_coordinators)
            after = await first_token("after")  # its chained step, if any, was sent before this token
    assert chained["before"] == 1  # step 1 of 2, started by the last device
    assert after.token is not None and chained["after"] == 0
