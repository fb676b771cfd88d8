"""Progress of slow work (model conversion, weights over MQTT, a device measuring itself),
as the services report it. Drawing it is the CLI's business (lime_mqtt/cli/progress.py,
with tqdm); by default nothing is drawn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Bar(Protocol):
    def advance(self, amount: float = 1) -> None: ...

    def close(self) -> None: ...


# bars(description, total, unit): a new bar; total None when unknown.
Bars = Callable[[str, float | None, str], Bar]


class _Silent:
    def advance(self, amount: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_bars(description: str, total: float | None, unit: str) -> Bar:
    return _Silent()
