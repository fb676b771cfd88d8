"""Unit: KV-cache admission (the coordinator's queue in front of the KV owners)."""

from __future__ import annotations

import asyncio

import pytest

from lime_mqtt.coordinator.admission import KvAdmission
from lime_mqtt.core.errors import RequestError
from tests.helpers import wait_until


async def test_requests_wait_in_order_and_are_told_their_place() -> None:
    admission = KvAdmission(capacity=100)
    places: dict[str, list[int]] = {"b": [], "c": []}
    order: list[str] = []
    release_a = asyncio.Event()

    async def run(name: str, tokens: int, hold: asyncio.Event | None = None) -> None:
        async def told(place: int) -> None:
            places[name].append(place)

        async with admission.reserve(tokens, told):
            order.append(name)
            assert admission.used <= admission.capacity
            if hold is not None:
                await hold.wait()

    a = asyncio.create_task(run("a", 70, release_a))
    await asyncio.sleep(0)
    b = asyncio.create_task(run("b", 50))
    c = asyncio.create_task(run("c", 10))  # would fit now, but must not overtake b
    await wait_until(lambda: admission.waiting >= 2)
    assert order == ["a"] and admission.used == 70  # c fits beside a but waits behind b
    assert places == {"b": [1], "c": [2]}
    release_a.set()
    await asyncio.gather(a, b, c)
    assert sorted(order[1:]) == ["b", "c"]
    assert admission.used == 0 and admission.peak == 70


async def test_a_request_larger_than_the_capacity_fails_at_once() -> None:
    admission = KvAdmission(capacity=64)
    with pytest.raises(RequestError, match="at most 64") as caught:
        async with admission.reserve(65):
            pass
    assert caught.value.code == "kv_capacity"


async def _reserve(admission: KvAdmission, tokens: int, entered: asyncio.Event, leave: asyncio.Event) -> None:
    async with admission.reserve(tokens):
        entered.set()
        await leave.wait()


def _start(admission: KvAdmission, tokens: int, leave: asyncio.Event) -> tuple[asyncio.Task[None], asyncio.Event]:
    entered = asyncio.Event()
    return asyncio.create_task(_reserve(admission, tokens, entered, leave)), entered


async def test_a_cancelled_waiter_leaves_the_queue_and_frees_nothing_it_did_not_hold() -> None:
    admission = KvAdmission(capacity=10)
    leave = asyncio.Event()
    first, entered = _start(admission, 10, leave)
    await entered.wait()
    second, _ = _start(admission, 5, leave)
    await wait_until(lambda: admission.waiting >= 1)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert admission.waiting == 0 and admission.used == 10
    leave.set()
    await first
    assert admission.used == 0


async def test_a_bigger_plan_lets_waiting_requests_in() -> None:
    admission = KvAdmission(capacity=10)
    leave = asyncio.Event()
    first, entered_first = _start(admission, 10, leave)
    await entered_first.wait()
    second, entered_second = _start(admission, 8, leave)
    await wait_until(lambda: admission.waiting >= 1)
    admission.set_capacity(20)
    await asyncio.wait_for(entered_second.wait(), 1)
    assert admission.used == 18
    leave.set()
    await asyncio.gather(first, second)
    assert admission.used == 0
