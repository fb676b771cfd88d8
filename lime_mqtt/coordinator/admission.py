"""KV-cache admission: never more tokens in flight than the KV owners can hold.

A request reserves its largest possible KV footprint (prompt + the tokens it may
generate) before its first step and gives it back when it ends. Requests that do not
fit now wait in arrival order (no overtaking, so a long request is not starved by
short ones) and are told their place in the queue whenever it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from lime_mqtt.core.errors import RequestError

PositionCallback = Callable[[int], Awaitable[None]]


@dataclass(eq=False)
class _Waiter:
    tokens: int
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    position: int = 0
    ticket: int = -1  # admission order, once admitted


class KvAdmission:
    """Token reservations against a capacity that the current plan sets."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # the most tokens ever reserved at once
        self._queue: list[_Waiter] = []
        self._moved = asyncio.Event()  # set (and replaced) whenever the queue moves
        self._issued = 0  # admission tickets handed out
        self._started = 0  # tickets whose request has started (or given up): they start in order
        self._finished_tickets: set[int] = set()

    def __repr__(self) -> str:
        return f"KvAdmission(used={self.used}, capacity={self.capacity}, waiting={len(self._queue)})"

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def set_capacity(self, capacity: int) -> None:
        """A new plan: requests already admitted keep their tokens; the queue moves if it can."""
        self.capacity = capacity
        self._admit()

    def _admit(self) -> None:
        while self._queue and self.used + self._queue[0].tokens <= self.capacity:
            waiter = self._queue.pop(0)
            self.used += waiter.tokens
            self.peak = max(self.peak, self.used)
            waiter.ticket, self._issued = self._issued, self._issued + 1
            waiter.ready.set()
        for place, waiter in enumerate(self._queue, start=1):
            waiter.position = place
        self._wake()

    def _wake(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    def _start(self, ticket: int) -> None:
        """Ticket ``ticket`` has started (or gone): let the next in admission order start."""
        self._finished_tickets.add(ticket)
        while self._started in self._finished_tickets:
            self._finished_tickets.discard(self._started)
            self._started += 1
        self._wake()

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int, on_position: PositionCallback | None = None) -> AsyncIterator[None]:
        """Hold ``tokens`` of KV cache for the body; wait first if they are not free.

        ``on_position(n)`` is awaited with the request's place in the queue (1 = next)
        each time it changes while it waits. A request larger than the whole capacity
        gets a ``kv_capacity`` error at once: waiting would never help.
        """
        if tokens > self.capacity:
            raise RequestError(
                "kv_capacity",
                f"the request may need {tokens} tokens of KV cache (prompt plus max_tokens) but the devices "
                f"of this plan hold at most {self.capacity}; ask for fewer tokens or add memory",
            )
        waiter = _Waiter(tokens)
        self._queue.append(waiter)
        self._admit()
        try:
            told = 0
            while not waiter.ready.is_set():
                moved = self._moved
                if on_position is not None and waiter.position != told:
                    told = waiter.position
                    await on_position(told)
                if not waiter.ready.is_set():
                    await moved.wait()  # set if the queue moved since ``moved`` was taken
            # Requests admitted together start in admission order (one may still be
            # telling its client its place when the queue moves).
            while True:
                moved = self._moved
                if self._started == waiter.ticket:
                    break
                await moved.wait()
        except BaseException:
            if waiter in self._queue:
                self._queue.remove(waiter)
                self._admit()
            elif waiter.ready.is_set():
                self.used -= tokens
                self._start(waiter.ticket)
                self._admit()
            raise
        self._start(waiter.ticket)
        try:
            yield
        finally:
            self.used -= tokens
            self._admit()
