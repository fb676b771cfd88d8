"""Heterogeneous devices: the optimal plan vs an equal and a memory-proportional split,
and the cost model's prediction vs the measured time per token, in one run.

Three clusters of the same three devices (the same device ids, so the same cached
measurements): two fast ones with 300 MiB and a slow one with 700 MiB, made slow with
``--emulate-layer-delay-ms`` (every layer sleeps that long; the planner only learns it
from the device's own measurement). The clusters differ only in the planner's
``--strategy``: optimal, equal, memory. Two more clusters run SmolLM2 on four 160 MiB
devices, where the optimal plan streams layers from disk: one may interleave (a device
runs several segments), the other not (``--no-interleave``). All clusters run at once on
one Mosquitto and take turns, round after round; every answer must be the same tokens.

    .venv/bin/python bench/hetero.py [--tokens 48] [--rounds 5] [--slow-delay-ms 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tpot import cluster_runner, interleaved_rounds

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.planning.plan import format_plan
from lime_mqtt.transport.mosquitto import LocalBroker


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slow-delay-ms", type=float, default=3.0)
    parser.add_argument("--no-streaming", action="store_true", help="leave out the streaming cluster")
    parser.add_argument("--keep-measurements", action="store_true",
                        help="use the devices' cached measurements instead of measuring them one by one first")
    parser.add_argument("--out", default="bench/results/hetero.json")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    slow = ("--emulate-layer-delay-ms", str(args.slow_delay_ms))
    hetero = [DeviceSpec("fast-a", 300, 1), DeviceSpec("fast-b", 300, 1), DeviceSpec("slow", 700, 1, slow)]
    configs: dict[str, tuple[list[DeviceSpec], tuple[str, ...]]] = {
        f"heterogeneous, {strategy}": (hetero, ("--strategy", strategy)) for strategy in ("optimal", "equal", "memory")
    }
    if not args.no_streaming:
        edge = [DeviceSpec(f"edge-{i}", 160, 1) for i in range(4)]
        configs["4 x 160 MiB, optimal (streams)"] = (edge, ("--context-tokens", "256"))
        configs["4 x 160 MiB, optimal, not interleaved"] = (edge, ("--context-tokens", "256", "--no-interleave"))
    if not args.keep_measurements:
        # Devices measure themselves at start, all at once, on shared cores; measured
        # one by one on a quiet machine first, they start from these (cached) numbers.
        import torch

        from lime_mqtt.model.builtin import cache_dir
        from lime_mqtt.model.checkpoint import Checkpoint
        from lime_mqtt.model.measure import measure_capabilities

        torch.set_num_threads(1)
        specs = {d.device_id: d for devices, _ in configs.values() for d in devices}
        for spec in specs.values():
            delay = float(spec.extra_args[1]) if spec.extra_args else 0.0
            measured = measure_capabilities(Checkpoint(folder), spec.device_id, cache_dir().parent, refresh=True,
                                            layer_delay_ms=delay)
            print(f"measured {spec.device_id}: {measured.to_json()}", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="lime-bench-hetero-"))
    runners, plans = {}, {}
    with LocalBroker() as broker, contextlib.ExitStack() as stack:
        for index, (label, (devices, planner_args)) in enumerate(configs.items()):
            name = f"hetero{index}"
            procs = stack.enter_context(ProcessCluster(broker.url, name, str(folder), devices, log_dir / name,
                                                       planner_args=planner_args))
            plans[label] = procs.wait_ready(timeout_s=300)
            print(f"{label}:\n{format_plan(plans[label], explain=True)}\n", flush=True)
            runners[label] = cluster_runner(broker.url, name, args.tokens)
        times = interleaved_rounds(runners, args.rounds)
        if times is None:
            return 1
    summary = []
    for label, runs in times.items():
        plan = plans[label]
        measured = statistics.median(runs)
        predicted = plan.predicted_ms_per_token or 0.0
        summary.append({
            "configuration": label, "ms_per_token_median": measured, "predicted_ms_per_token": predicted,
            "prediction_error": predicted / measured - 1, "runs_ms": runs,
            "stages": [{"device": s.device_id, "layers": [s.start, s.stop], "streamed": len(s.streamed),
                        "predicted_ms": s.predicted_ms} for s in plan.stages],
        })
    print(f"\n{'configuration':34s} {'measured ms/token':>18s} {'predicted':>10s} {'error':>7s}  split")
    for row in summary:
        split = " ".join(f"{s['device']}[{s['layers'][0]},{s['layers'][1]})" for s in row["stages"])
        print(f"{row['configuration']:34s} {row['ms_per_token_median']:18.1f} {row['predicted_ms_per_token']:10.1f} "
              f"{row['prediction_error']:+7.1%}  {split}")
    report = {"model": args.model, "tokens": args.tokens, "rounds": args.rounds, "slow_delay_ms": args.slow_delay_ms,
              "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
