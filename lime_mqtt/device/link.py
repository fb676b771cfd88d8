"""A device's link to the broker, measured through the broker itself."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from lime_mqtt.transport.base import Connection


async def measure_link(connection: Connection, topic: str, small: int = 1024,
                       large: int = 1024 * 1024) -> tuple[float, float]:
    """Round trip of a small message through the broker (ms, median of 9) and the
    throughput of a large one (MB/s, best of 3), on ``connection`` before it serves.

    ``topic`` must be this device's own: the connection subscribes to it, and every
    message read here must come from it (nothing else is subscribed yet).
    """
    await connection.subscribe(topic, qos=0)
    messages = connection.messages()

    async def round_trip(size: int) -> float:
        payload = os.urandom(size)
        started = time.perf_counter()
        await connection.publish(topic, payload, qos=0)
        async with asyncio.timeout(10):
            while (await anext(messages)).payload != payload:
                pass
        return time.perf_counter() - started

    try:
        rtt = statistics.median([await round_trip(small) for _ in range(9)])
        big = min([await round_trip(large) for _ in range(3)])
    finally:
        await messages.aclose()
        await connection.unsubscribe(topic)
    # A round trip carries the large message twice (to the broker and back).
    return rtt * 1000, 2 * large / max(big - rtt, 1e-6) / 1e6


# A link "changed" when its round trip moved by more than half (and 2 ms), or its
# throughput by more than 3 times: then the device says so in its status, and the planner
# looks at the plan again (docs/planner.md#links-that-change).
RTT_CHANGE = 0.5
RTT_CHANGE_MS = 2.0
THROUGHPUT_CHANGE = 3.0


def link_changed(before: dict[str, float], rtt_ms: float, mb_s: float) -> bool:
    old_rtt, old_mb_s = before.get("link_rtt_ms"), before.get("link_mb_s")
    if not old_rtt or not old_mb_s:
        return True
    moved = abs(rtt_ms - old_rtt)
    return (moved > RTT_CHANGE_MS and moved > RTT_CHANGE * old_rtt) or not (
        1 / THROUGHPUT_CHANGE <= mb_s / old_mb_s <= THROUGHPUT_CHANGE)


class LinkMonitor:
    """Measures the link again while the device serves. The echoes go out on the device's
    own echo topic; its receiver, which reads every message, hands each echo back
    (:meth:`deliver`)."""

    def __init__(self, connection: Connection, topic: str) -> None:
        self.connection = connection
        self.topic = topic
        self._waiting: dict[bytes, asyncio.Future[float]] = {}

    def __repr__(self) -> str:
        return f"LinkMonitor({self.topic!r}, waiting={len(self._waiting)})"

    def waiting(self) -> bool:
        """An echo is on its way: the event loop must be free to take it when it comes
        (the device's compute runs no step on the loop's thread meanwhile)."""
        return bool(self._waiting)

    def deliver(self, payload: bytes) -> None:
        future = self._waiting.pop(payload, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    async def round_trip(self, size: int, timeout_s: float = 10.0) -> float:
        payload = os.urandom(size)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[payload] = future
        started = time.perf_counter()
        try:
            await self.connection.publish(self.topic, payload, qos=0)
            async with asyncio.timeout(timeout_s):
                arrived = await future
        finally:
            self._waiting.pop(payload, None)
        return arrived - started

    async def measure(self, small: int = 1024, large: int = 256 * 1024) -> tuple[float, float]:
        """Round trip (ms, median of 5) and throughput (MB/s, best of 2), as at start."""
        rtt = statistics.median([await self.round_trip(small) for _ in range(5)])
        big = min([await self.round_trip(large) for _ in range(2)])
        return rtt * 1000, 2 * large / max(big - rtt, 1e-6) / 1e6
