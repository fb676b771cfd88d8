"""A device's memory governor: stream more layers from disk as KV caches grow, hold them again
when the caches shrink.

Pure arithmetic over the same quantities as the planner's cost model (docs/planner.md):
what the device holds is its resident layers, its embedding or head, the streaming slots
and the KV cache of every sequence it serves. The device asks :meth:`MemoryGovernor.decide`
after every step; a changed answer is a set of layers to stream from now on.
"""

from __future__ import annotations

from dataclasses import dataclass

# Above HIGH x budget, stream more layers until at most LOW x budget; layers streamed that
# way are held again while that keeps the device at most LOW x budget. The gap between
# HIGH and LOW (a tenth of the budget of KV growth) keeps a device from switching back and
# forth on every token.
HIGH = 0.90
LOW = 0.80


@dataclass(frozen=True)
class MemoryGovernor:
    layer_bytes: dict[int, int]  # every layer of this device's segments -> its weight bytes
    fixed_bytes: int  # embedding, head and norm held here
    budget_bytes: int
    planned: frozenset[int]  # layers the plan streams (never held again by the governor)
    slots: int = 1  # streamed layers in memory at once when only the governor streams

    def usage(self, streamed: frozenset[int], kv_bytes: int) -> int:
        """Bytes held with ``streamed`` read from disk and ``kv_bytes`` of KV cache."""
        held = sum(b for i, b in self.layer_bytes.items() if i not in streamed)
        slots = self.slots * max((self.layer_bytes[i] for i in streamed), default=0)
        return self.fixed_bytes + held + slots + kv_bytes

    def decide(self, streamed: frozenset[int], kv_bytes: int) -> frozenset[int]:
        """The layers to stream now (``streamed`` itself when nothing should change)."""
        now = self.usage(streamed, kv_bytes)
        if now > HIGH * self.budget_bytes:
            more = set(streamed)
            for index in sorted(set(self.layer_bytes) - streamed, reverse=True):  # from the tail
                more.add(index)
                if self.usage(frozenset(more), kv_bytes) <= LOW * self.budget_bytes:
                    break
            best = frozenset(more)
            # Streaming one layer with a slot for it frees nothing: keep the set only if it helps.
            return best if self.usage(best, kv_bytes) < now else streamed
        extra = sorted(streamed - self.planned)
        fewer = set(streamed)
        for index in extra:  # hold again, lowest layer first, while it stays under LOW
            candidate = frozenset(fewer - {index})
            if self.usage(candidate, kv_bytes) > LOW * self.budget_bytes:
                break
            fewer = set(candidate)
        return frozenset(fewer)
