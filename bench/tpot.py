"""Time per output token: one process vs the cluster with 2 and 4 stages, in one run.

Every configuration generates the same greedy answer to the same prompt (the script
checks that the token ids agree). The clusters (device agents as separate processes on
a local Mosquitto) are all started first; then the configurations take turns, round
after round, so that machine noise hits them alike. Medians and ratios to plain
transformers are printed and written to bench/results/tpot.json.

    .venv/bin/python bench/tpot.py [--model smollm2] [--tokens 64] [--rounds 5]
    .venv/bin/python bench/tpot.py --stages 4 --compare-tree ../base   # before/after, one run
    .venv/bin/python bench/tpot.py --stages 4 --breakdown   # where a cluster's time per token goes
    .venv/bin/python bench/tpot.py --stages 4 --compare-unchained   # chained decode steps or not, one run

With ``--breakdown`` each cluster run also reads every device's telemetry before and after
the request (the first telemetry message published after each moment, so it counts every
step) and reports the devices' own compute per step, summed over the stages: what is left
of the time per token is the pipeline's messaging (the prompt's one prefill step is in the
average).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask_final
from lime_mqtt.core.topics import Topics
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.transport import transport_for
from lime_mqtt.transport.mosquitto import LocalBroker

PROMPT = "Explain in a few sentences why a pump in a cooling loop might lose pressure."


class Clock:
    """A logits processor that only notes when each token's logits are ready."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: object, scores: object) -> object:
        self.stamps.append(time.perf_counter())
        return scores


def transformers_runner(model: Any, ids: Any, tokens: int, threads: int) -> Callable[[], tuple[float, list[int]]]:
    """Plain transformers greedy generation; ms per token between the first and last token."""
    import torch

    def run() -> tuple[float, list[int]]:
        clock = Clock()
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 logits_processor=[clock])
        ms = (clock.stamps[-1] - clock.stamps[0]) * 1000 / (len(clock.stamps) - 1)
        return ms, out[0, ids.shape[1]:].tolist()

    return run


def engine_runner(folder: Path, ids: Any, tokens: int) -> Callable[[], tuple[float, list[int]]]:
    """lime-mqtt's own engine in this process: all layers in one Shard, no MQTT."""
    import torch

    from lime_mqtt.model.checkpoint import Checkpoint
    from lime_mqtt.model.shard import Shard, ShardSpec

    checkpoint = Checkpoint(folder)
    shard = Shard(checkpoint, ShardSpec(0, checkpoint.num_layers, True, True))
    prompt = ids[0].tolist()

    def run() -> tuple[float, list[int]]:
        torch.set_num_threads(1)
        cache, out, stamps = shard.new_cache(), [], []
        inputs, pos = prompt, 0
        for _ in range(tokens):
            token = int(torch.argmax(shard.forward(cache, pos, tokens=inputs)))
            stamps.append(time.perf_counter())
            out.append(token)
            pos, inputs = pos + len(inputs), [token]
        return (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1), out

    return run


async def next_telemetry(broker: Any, cluster: str, ids: list[str],
                         timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The first telemetry each device in ``ids`` publishes from now on."""
    found: dict[str, dict[str, Any]] = {}
    async with transport_for(broker).connection() as conn:
        await conn.subscribe(Topics(cluster).all_device_telemetry)
        async with asyncio.timeout(timeout_s):
            async for message in conn.messages():
                telemetry = json.loads(message.payload)
                found.setdefault(telemetry["device_id"], telemetry)
                if set(ids) <= set(found):
                    return found
    raise RuntimeError("no telemetry")


def cluster_runner(broker: Any, name: str, tokens: int, devices: list[str] | None = None,
                   compute: dict[str, list[float]] | None = None) -> Callable[[], tuple[float, list[int]]]:
    """The cluster's own time per token; with ``devices``, each run also appends the sum of
    the devices' compute per step (ms) to ``compute[name]``."""
    def run() -> tuple[float, list[int]]:
        request = {"prompt": PROMPT, "max_tokens": tokens, "stream": False}
        before = asyncio.run(next_telemetry(broker, name, devices)) if devices else {}
        final = asyncio.run(ask_final(broker, name, request))
        if final.get("type") != "final":
            raise RuntimeError(f"{name}: {final}")
        if devices and compute is not None:
            after = asyncio.run(next_telemetry(broker, name, devices))
            compute.setdefault(name, []).append(sum(
                (after[d]["compute_s"] - before[d]["compute_s"]) * 1000
                / max(1, after[d]["steps_done"] - before[d]["steps_done"]) for d in devices))
        return final["timings"]["tpot_ms"], final["token_ids"]

    return run


def interleaved_rounds(
    runners: dict[str, Callable[[], tuple[float, list[int]]]], rounds: int
) -> dict[str, list[float]] | None:
    """Run every configuration once per round, ``rounds`` times after a warm-up round, so
    that machine noise hits them alike; ms per token by configuration. ``None`` (after
    saying which) if a configuration's tokens differ from the first one's."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    reference: list[int] | None = None
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, run in runners.items():
            ms, ids = run()
            reference = reference or ids
            if ids != reference:
                print(f"{name}: tokens differ from the first configuration's!", file=sys.stderr)
                return None
            if round_:
                times[name].append(ms)
        print(f"round {round_}: " + ", ".join(f"{n} {t[-1]:.1f}" for n, t in times.items() if t), flush=True)
    return times


def main() -> int:
    # The same process settings as every lime-mqtt process (see lime_mqtt/cli/main.py), so that
    # the single-process engine is measured at its best too.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--device-threads", type=int, default=1, help="torch threads of each device agent")
    parser.add_argument("--breakdown", action="store_true",
                        help="also report the devices' own compute per step, from their telemetry")
    parser.add_argument("--out", default="bench/results/tpot.json")
    parser.add_argument("--compare-tree", metavar="PATH",
                        help="also run each cluster from the lime-mqtt source tree at PATH (say, a git worktree "
                             "of an earlier commit), in the same rounds: a before/after comparison in one run")
    parser.add_argument("--compare-unchained", action="store_true",
                        help="also run each cluster with a coordinator that sends every decode step itself "
                             "(coordinator --no-chain), in the same rounds")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    # The single process at 1 thread and at torch's default: the faster one is the baseline.
    single = sorted({1, torch.get_num_threads()})
    runners = {f"single process, {t} thread(s)": transformers_runner(model, ids, args.tokens, t) for t in single}
    runners["single process, lime engine"] = engine_runner(folder, ids, args.tokens)
    log_dir = Path(tempfile.mkdtemp(prefix="lime-bench-"))
    compute: dict[str, list[float]] = {}  # cluster name: devices' compute per step, summed, by round
    with LocalBroker() as broker, contextlib.ExitStack() as stack:
        # (label, source tree, coordinator options, name suffix) of each cluster of a stage count
        variants: list[tuple[str, str | None, tuple[str, ...], str]] = [("", None, (), "")]
        if args.compare_tree:
            variants.append((", compared tree", args.compare_tree, (), "c"))
        if args.compare_unchained:
            variants.append((", unchained", None, ("--no-chain",), "u"))
        for stages in args.stages:
            for label, tree, coordinator_args, suffix in variants:
                name = f"bench{stages}{suffix}"
                memory_mb = 1600 // stages + 100  # room for the weights and KV cache of an even split
                telemetry = ("--telemetry-interval", "0.5") if args.breakdown else ()
                devices = [DeviceSpec(f"{name}-dev{i}", memory_mb, args.device_threads, telemetry)
                           for i in range(stages)]
                # PYTHONSAFEPATH: ``python -m`` would otherwise put the working directory (this
                # checkout, when run from its root) before PYTHONPATH, and run this tree's code.
                env = {"PYTHONPATH": str(Path(tree).resolve()), "PYTHONSAFEPATH": "1"} if tree else None
                procs = stack.enter_context(ProcessCluster(broker.url, name, str(folder), devices, log_dir / name,
                                                           planner_args=("--strategy", "equal"), extra_env=env,
                                                           coordinator_args=coordinator_args))
                plan = procs.wait_ready()
                assert len(plan.stages) == stages, plan
                ids = [d.device_id for d in devices] if args.breakdown else None
                runners[f"cluster, {stages} stages{label}"] = cluster_runner(broker.url, name, args.tokens, ids,
                                                                           compute)
        times = interleaved_rounds(runners, args.rounds)
        if times is None:
            return 1
    baseline = min((n for n in times if n.startswith("single")), key=lambda n: statistics.median(times[n]))
    base = statistics.median(times[baseline])
    # Ratio of medians, and the median of each round's own ratio (robust to slow drift).
    summary = [{"configuration": name, "ms_per_token_median": statistics.median(t),
                "ratio": statistics.median(t) / base,
                "ratio_per_round_median": statistics.median(a / b for a, b in zip(t, times[baseline], strict=True)),
                "runs_ms": t} for name, t in times.items()]
    print(f"\nbaseline: {baseline}")
    print(f"{'configuration':32s} {'ms/token (median)':>18s} {'ratio':>7s} {'per-round ratio':>16s}")
    for row in summary:
        print(f"{row['configuration']:32s} {row['ms_per_token_median']:18.2f} {row['ratio']:7.3f} "
              f"{row['ratio_per_round_median']:16.3f}")
    if compute:
        print(f"\n{'cluster':32s} {'device compute ms/step, all stages (median)':>44s}")
        names = {f"bench{s}{suffix}": f"cluster, {s} stages{label}" for s in args.stages
                 for label, _, _, suffix in variants}
        for cluster, per_round in compute.items():
            runs = per_round[1:]  # round 0 warms up
            label = names.get(cluster, cluster)
            print(f"{label:32s} {statistics.median(runs):44.2f}")
            for row in summary:
                if row["configuration"] == label:
                    row["device_compute_ms_per_step_median"] = statistics.median(runs)
                    row["device_compute_runs_ms"] = runs
    report = {"model": args.model, "tokens": args.tokens, "rounds": args.rounds, "prompt": PROMPT,
              "device_threads": args.device_threads, "baseline": baseline, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
