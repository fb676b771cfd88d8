"""How many messages each client may send: a token bucket per client name.

A client that sends faster than ``rate`` messages per second (after a burst of
``burst``) has its messages dropped; the coordinator answers the first one dropped in
each second with a ``rate_limited`` error, so a flood costs the cluster little and
disturbs no other client.
"""

from __future__ import annotations

import collections
import collections.abc
import time
from dataclasses import dataclass

MAX_CLIENTS = 4096  # buckets kept; the least recently heard client's is forgotten first


@dataclass
class _Bucket:
    tokens: float
    at: float
    warned_at: float = float("-inf")
    dropped: int = 0


class ClientRates:
    def __init__(self, rate: float, burst: int, clock: collections.abc.Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"ClientRates(rate={self.rate}/s, burst={self.burst}, clients={len(self._buckets)})"

    def take(self, client: str) -> bool:
        """Whether ``client`` may send one more message now (and count it)."""
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(client)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        bucket.dropped += 1
        return False

    def should_warn(self, client: str) -> bool:
        """For a dropped message: whether to answer it (the first one each second)."""
        bucket = self._buckets.get(client)
        now = self.clock()
        if bucket is None or now - bucket.warned_at < 1.0:
            return False
        bucket.warned_at = now
        return True

    def dropped(self, client: str) -> int:
        bucket = self._buckets.get(client)
        return bucket.dropped if bucket else 0
