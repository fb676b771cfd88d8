"""A coordinator's figures (its telemetry, docs/topics.md): requests in flight and served,
errors by code, replays, tokens, and histograms of time to first token and per token.

Plain counters, kept by :class:`~lime_mqtt.coordinator.intake.Intake` and
:class:`~lime_mqtt.coordinator.generation.Generation` as requests go, and turned into a
:class:`~lime_mqtt.core.messages.CoordinatorTelemetry` message when published. The HTTP
bridge exposes them to Prometheus as they are (lime_mqtt/http/metrics.py).
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field

from lime_mqtt.core.messages import (
    MAX_RECENT,
    TPOT_BUCKETS_MS,
    TTFT_BUCKETS_MS,
    CoordinatorTelemetry,
    Histogram,
    RecentRequest,
)


@dataclass
class Buckets:
    """Observations counted by bucket (the last one: above every bound)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def message(self) -> Histogram:
        return Histogram(bounds=list(self.bounds), counts=list(self.counts), sum=round(self.total, 3))


@dataclass
class RequestStats:
    """What a coordinator counts about its requests."""

    served: int = 0
    answered: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    replays: int = 0
    prefill_chunks: int = 0  # leading chunks of long prompts, each sent as its own step
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: Buckets = field(default_factory=lambda: Buckets(TTFT_BUCKETS_MS))
    tpot_ms: Buckets = field(default_factory=lambda: Buckets(TPOT_BUCKETS_MS))
    recent: collections.deque[RecentRequest] = field(default_factory=lambda: collections.deque(maxlen=MAX_RECENT))

    def answer(self, prompt_tokens: int, completion_tokens: int, ttft_ms: float, tpot_ms: float) -> None:
        """A request answered in full. Time per token only counts with two tokens or more."""
        self.served += 1
        self.answered += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.ttft_ms.observe(ttft_ms)
        if completion_tokens > 1:
            self.tpot_ms.observe(tpot_ms)
        self.recent.append(RecentRequest(ts=round(time.time(), 3), ttft_ms=round(ttft_ms, 3),
                                         tpot_ms=round(tpot_ms, 3), tokens=completion_tokens))

    def error(self, code: str) -> None:
        self.served += 1
        self.errors[code] += 1

    def telemetry(self, name: str, running: int, waiting: int) -> CoordinatorTelemetry:
        return CoordinatorTelemetry(
            v=1, name=name, ts=round(time.time(), 3), running=running, waiting=waiting, served=self.served,
            answered=self.answered, errors=dict(self.errors.most_common(64)), replays=self.replays,
            prefill_chunks=self.prefill_chunks,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            ttft_ms=self.ttft_ms.message(), tpot_ms=self.tpot_ms.message(), recent=list(self.recent),
        )
