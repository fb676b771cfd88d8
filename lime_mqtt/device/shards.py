"""A device's shards: the model files it has, the segments of the plan it runs, the
layers loaded for them, and which of those are streamed from disk.

A device never materialises layers it does not run: each segment's shard is built on
the meta device and only its own tensors are read (``model/shard.py``). Devices without
model files fetch exactly their segments' tensors from a weight source first. The
memory governor (``planning/governor.py``) decides, as KV caches grow and shrink, which
layers to stream; :meth:`ShardHost.restream` applies that.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from lime_mqtt.core.errors import LimeError
from lime_mqtt.core.messages import Adaptation, DeviceState
from lime_mqtt.core.plan import StagePlan
from lime_mqtt.core.progress import Bars, no_bars
from lime_mqtt.device.memory import anon_rss_bytes, rss_bytes, trim_heap
from lime_mqtt.model.adapter import adapter_for
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.model.shard import LayerStream, Shard, ShardSpec, import_runtime
from lime_mqtt.planning.governor import MemoryGovernor
from lime_mqtt.planning.plan import MIB
from lime_mqtt.transport.base import Transport

log = logging.getLogger(__name__)


def specs_of(stages: list[StagePlan]) -> dict[int, ShardSpec]:
    """What each segment's shard must hold, by stage number."""
    return {s.stage: ShardSpec(s.start, s.stop, s.embed, s.head, tuple(s.streamed), max(1, s.slots))
            for s in stages}


class ShardHost:
    """The model files, and the shards of this device's segments (all of them on the
    worker thread of the device's compute: :meth:`load`, :meth:`restream`)."""

    def __init__(
        self, name: str, model_folder: Path, memory_mb: int, *, torch_device: str = "cpu",
        layer_delay_ms: float = 0.0, fetch_weights: bool = False, bars: Bars = no_bars,
    ) -> None:
        self.name = name
        self.bars = bars
        self.model_folder = Path(model_folder)
        self.model_id = self.model_folder.name
        self.memory_mb = memory_mb
        self.torch_device = torch_device
        self.layer_delay_ms = layer_delay_ms
        self.fetch_weights = fetch_weights  # model files come over MQTT from a weight source
        self.manifest: dict[str, Any] | None = None
        self.baseline_rss = self.baseline_anon = 0
        self.load_anon = 0  # anonymous memory the last load of shards added
        self.opened = False  # the model's config is here and its code imported
        self.stages: list[StagePlan] = []  # this device's segments of the plan (several if interleaved)
        self.shards: dict[int, Shard] = {}  # by stage number
        self.stream: LayerStream | None = None  # reads the streamed layers of all its segments
        self.governor: MemoryGovernor | None = None  # streams more layers when KV caches grow
        self._over_budget_said = False
        if (self.model_folder / "config.json").is_file():
            self._open_model()
        elif not fetch_weights:
            raise LimeError(f"{self.model_folder} has no config.json (use --weights-from-broker to fetch it)")

    def __repr__(self) -> str:
        return f"ShardHost({self.model_id!r}, stages={[s.stage for s in self.stages]}, shards={list(self.shards)})"

    def _open_model(self) -> None:
        """Open the model folder and import the code its layers run; then the baseline."""
        self.checkpoint = Checkpoint(self.model_folder)
        import_runtime(self.checkpoint)
        self.opened = True
        self.baseline_rss = rss_bytes()  # code loaded, no weights yet
        self.baseline_anon = anon_rss_bytes()

    @property
    def hidden_size(self) -> int | None:
        return int(self.checkpoint.config.hidden_size) if self.opened else None

    # ----- model files over MQTT ----------------------------------------------------------------

    async def fetch_manifest(self, transport: Transport, cluster: str) -> None:
        """The model's config and tensor list from a weight source (waits for one)."""
        from lime_mqtt.core.errors import WeightsError
        from lime_mqtt.weights.fetch import fetch_manifest
        from lime_mqtt.weights.files import write_config

        while True:
            try:
                self.manifest = await fetch_manifest(transport, cluster, self.model_id, device_id=self.name,
                                                     timeout_s=3, client=uuid.uuid4().hex[:12])
                break
            except WeightsError as exc:
                log.warning("%s: %s; asking again", self.name, exc)
        write_config(self.model_folder, self.manifest)
        if not self.opened:
            self._open_model()

    def tensor_names(self, stages: list[StagePlan]) -> list[str]:
        """Exactly the tensors these segments need, by the manifest's names."""
        assert self.manifest is not None
        names = set(self.manifest["tensors"])
        adapter = adapter_for(self.checkpoint.config)
        prefixes = [adapter.layer_prefix(i) for stage in stages for i in stage.layers]
        if any(stage.head for stage in stages):
            prefixes.append(adapter.norm_prefix)
        wanted = [n for n in sorted(names) if n.startswith(tuple(prefixes))]
        if any(stage.embed for stage in stages):
            wanted.append(adapter.embed_key)
        if any(stage.head for stage in stages):
            wanted.append(adapter.head_source_key(self.checkpoint.config, names))
        return list(dict.fromkeys(wanted))

    async def fetch_stages(self, transport: Transport, cluster: str, stages: list[StagePlan]) -> None:
        from lime_mqtt.weights.fetch import fetch_tensors

        started = time.perf_counter()
        names = self.tensor_names(stages)
        tensors = (self.manifest or {}).get("tensors", {})
        total = sum(int(tensors[n]["nbytes"]) for n in names if isinstance(tensors.get(n), dict)
                    and isinstance(tensors[n].get("nbytes"), int))
        bar = self.bars(f"{self.name}: weights over MQTT", total or None, "B")
        seen: dict[str, int] = {}

        def progress(name: str, done: int, of: int) -> None:
            bar.advance(done - seen.get(name, 0))
            seen[name] = done

        try:
            stats = await fetch_tensors(transport, cluster, self.manifest or {}, names, self.model_folder,
                                        device_id=self.name, client=uuid.uuid4().hex[:12], progress=progress)
        finally:
            bar.close()
        log.info("%s: %d tensors (%.1f MB) over MQTT in %.1f s, %d already here, resumed %s", self.name,
                 stats.tensors_fetched, stats.bytes_received / 1e6, time.perf_counter() - started,
                 stats.tensors_skipped, stats.resumed_from or "nothing")
        self.checkpoint = Checkpoint(self.model_folder)  # read the new files' headers

    # ----- shards -------------------------------------------------------------------------------

    async def prepare(
        self, stages: list[StagePlan], transport: Transport, cluster: str, *,
        say: Callable[[DeviceState], Awaitable[None]], run: Callable[[Callable[[], None]], Awaitable[None]],
    ) -> None:
        """Hold exactly the shards of ``stages``: unless they are held already, drop what is
        held, fetch the tensors over MQTT if this device has no model files, and load them
        on the compute thread (``run``). ``say`` tells the cluster each state on the way
        ("fetching", "loading"). :class:`LimeError` names the layers that could not load."""
        if not self.loaded(stages):
            self.drop()
            self.use(stages)  # no governor until the shards are loaded
            layers = ", ".join(f"[{s.start}, {s.stop})" for s in stages)
            try:
                if self.fetch_weights:
                    await say("fetching")
                    await self.fetch_stages(transport, cluster, stages)
                await say("loading")
                await run(lambda: self.load(stages))
            except (LimeError, OSError, RuntimeError) as exc:
                raise LimeError(f"cannot load layers {layers}: {exc}") from exc
        self.use(stages)

    def loaded(self, stages: list[StagePlan]) -> bool:
        """Whether the shards held now are exactly those of ``stages``."""
        return {n: shard.spec for n, shard in self.shards.items()} == specs_of(stages)

    def load(self, stages: list[StagePlan]) -> None:
        """One shard per segment; the streamed layers of all segments share one reader, in
        ring order, so a segment's next layers are read while the other devices work."""
        specs = specs_of(stages)
        streamed = [(i, self.checkpoint.keys_with_prefix(f"model.layers.{i}."))
                    for spec in specs.values() for i in spec.streamed]
        slots = max(spec.slots for spec in specs.values())
        before = anon_rss_bytes()
        self.stream = LayerStream(self.checkpoint, streamed, slots) if streamed else None
        self.shards = {n: Shard(self.checkpoint, spec, self.torch_device, self.layer_delay_ms, stream=self.stream)
                       for n, spec in specs.items()}
        # What loading these shards cost in resident memory: their weights, as held.
        self.load_anon = max(0, anon_rss_bytes() - before)

    def use(self, stages: list[StagePlan]) -> None:
        """These segments are this device's now; with their shards loaded, the governor
        watches their memory (it reads the layers' sizes from the files)."""
        self.stages = stages
        self.governor = self._new_governor() if stages and self.shards else None

    def drop(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream = None
        self.shards = {}
        trim_heap()

    def _new_governor(self) -> MemoryGovernor:
        layers = {i: self.checkpoint.layer_bytes(i) for s in self.stages for i in range(s.start, s.stop)}
        fixed = sum((self.checkpoint.embed_bytes if s.embed else 0) + (self.checkpoint.head_bytes if s.head else 0)
                    for s in self.stages)
        planned = frozenset(i for s in self.stages for i in s.streamed)
        return MemoryGovernor(layers, fixed, int(self.memory_mb * MIB), planned,
                              slots=max([s.slots for s in self.stages if s.streamed], default=1))

    # ----- what is streamed ---------------------------------------------------------------------

    def streamed_now(self) -> frozenset[int]:
        return frozenset(i for shard in self.shards.values() for i in shard.spec.streamed)

    def layer_spans(self) -> dict[int, int]:
        """How many layers each of this device's stages has."""
        return {s.stage: s.stop - s.start for s in self.stages}

    def held_bytes(self, kv_bytes: int) -> int | None:
        """What the governor counts as held now (weights, slots, KV cache)."""
        if self.governor is None or not self.shards:
            return None
        return self.governor.usage(self.streamed_now(), kv_bytes)

    async def govern(self, kv_bytes: int, run: Callable[[Callable[[], None]], Awaitable[None]]) -> Adaptation | None:
        """As KV caches grow toward the budget, stream more layers from disk; as they shrink,
        hold them again (``planning/governor.py``). ``run`` runs the change on the compute
        thread. Returns the change made, if any (logged)."""
        governor = self.governor
        if governor is None or not self.shards:
            return None
        now = self.streamed_now()
        wanted = governor.decide(now, kv_bytes)
        if wanted == now:
            if governor.usage(now, kv_bytes) > governor.budget_bytes and not self._over_budget_said:
                log.error("%s: %.1f MiB of KV cache: over the %.0f MiB budget with every layer streamed",
                          self.name, kv_bytes / MIB, self.memory_mb)
                self._over_budget_said = True
            return None
        self._over_budget_said = False
        before = governor.usage(now, kv_bytes)
        await run(lambda: self.restream(wanted))
        event = Adaptation(ts=time.time(), kv_mb=round(kv_bytes / MIB, 2), budget_mb=float(self.memory_mb),
                           held_mb_before=round(before / MIB, 2),
                           held_mb_after=round(governor.usage(wanted, kv_bytes) / MIB, 2),
                           streamed=sorted(wanted), action="stream" if wanted > now else "hold")
        log.warning("%s: memory: %s layers %s: %.2f MiB of KV cache, %.2f -> %.2f MiB of %.2f MiB", self.name,
                    "streaming" if wanted > now else "holding again", sorted(wanted ^ now), kv_bytes / MIB,
                    before / MIB, event.held_mb_after, self.memory_mb)
        return event

    def restream(self, streamed: frozenset[int]) -> None:
        """Read ``streamed`` from disk from now on (one reader for all segments, ring order)."""
        if self.stream is not None:
            self.stream.close()
        order = [(i, self.checkpoint.keys_with_prefix(f"model.layers.{i}."))
                 for s in self.stages for i in range(s.start, s.stop) if i in streamed]
        slots = self.governor.slots if self.governor else 1
        self.stream = LayerStream(self.checkpoint, order, slots) if order else None
        for shard in self.shards.values():
            shard.set_streamed(tuple(i for i in streamed if shard.spec.start <= i < shard.spec.stop), self.stream,
                               slots)
        trim_heap()
