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
