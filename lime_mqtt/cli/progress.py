"""Progress bars in the terminal, with tqdm: what the CLI gives services as their ``bars``
(lime_mqtt/core/progress.py). On a terminal they draw on stderr; when stderr is not one
(a log file), tqdm stays quiet and the services' log lines say what happened."""

from __future__ import annotations

import sys

from tqdm import tqdm

from lime_mqtt.core.progress import Bar


class _TqdmBar:
    def __init__(self, description: str, total: float | None, unit: str) -> None:
        scale = unit == "B"
        self._bar = tqdm(total=total, desc=description, unit=unit, unit_scale=scale,
                         unit_divisor=1024 if scale else 1000,
                         disable=not sys.stderr.isatty(), leave=False, file=sys.stderr)

    def advance(self, amount: float = 1) -> None:
        self._bar.update(amount)

    def close(self) -> None:
        self._bar.close()


def terminal_bars(description: str, total: float | None, unit: str) -> Bar:
    return _TqdmBar(description, total, unit)
