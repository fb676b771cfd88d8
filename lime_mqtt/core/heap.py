"""The Python heap of a long-running service."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect once, then move every object left to the collector's permanent generation
    (``gc.freeze``): the imported modules, the model's and the loaded shards' objects are
    never scanned again. Call it when a service has loaded what it serves with.

    Without it, a full collection of a device agent's heap (torch and transformers loaded)
    took 400 to 460 ms, a stall in the middle of whatever step it fell on; after it, about
    0.4 ms."""
    gc.collect()
    gc.freeze()
