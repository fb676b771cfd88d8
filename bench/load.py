"""Load: the same requests one at a time, in a burst, and sporadically, on one cluster.

A cluster of ``--stages`` device agents (separate processes, one torch thread each, an
equal split, batching up to ``--max-batch`` decode steps) serves three patterns, round
after round, in one run:

- *one at a time*: ``--burst`` requests, each sent when the previous one is answered;
- *bursty*: the same ``--burst`` requests sent at once;
- *sporadic*: ``--sporadic`` requests with Poisson arrivals at ``--rate`` per second,
  so that they rarely overlap.

For each: time to first token and time per output token (median and 95th percentile,
from the coordinator's timings), total output tokens per second (first send to last
answer), and each device's busy fraction (its ``compute_s`` telemetry over the pattern's
wall time). Every greedy answer must equal the one-at-a-time answer. Results go to
``bench/results/load.json`` and a chart to ``bench/results/load.png``.

    .venv/bin/python bench/load.py [--model smollm2] [--stages 4] [--burst 16] [--tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask_final
from lime_mqtt.core.topics import Topics
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker

PROMPTS = [
    "Explain why a pump in a cooling loop might lose pressure.",
    "List three checks before restarting a conveyor after a jam.",
    "What does a rising bearing temperature on a motor suggest?",
    "Describe a safe lockout procedure for a hydraulic press.",
    "How do you tell a clogged filter from a failing fan?",
    "Summarise the purpose of a pressure relief valve.",
    "Why would a compressor cycle on and off quickly?",
    "Give two causes of voltage drops on a factory line.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Telemetry:
    """Each device's latest telemetry (compute_s and its timestamp), kept by a listener."""

    def __init__(self, broker: str, cluster: str) -> None:
        self.broker, self.topics = broker, Topics(cluster)
        self.latest: dict[str, dict[str, Any]] = {}
        self.updated = asyncio.Event()

    async def listen(self) -> None:
        async with connect(self.broker) as conn:
            await conn.subscribe(self.topics.all_device_telemetry, qos=0)
            async for message in conn.messages():
                data = json.loads(message.payload)
                self.latest[data["device_id"]] = data
                self.updated.set()

    def snapshot(self) -> dict[str, tuple[float, float]]:
        return {d: (t["ts"], t["compute_s"]) for d, t in self.latest.items()}


async def run_requests(broker: str, cluster: str, requests: list[dict[str, Any]],
                       starts: list[float]) -> tuple[list[dict[str, Any]], float]:
    """Send ``requests[i]`` at ``starts[i]`` seconds (None: after the previous answer)."""
    began = time.perf_counter()

    async def one(request: dict[str, Any], at: float) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, began + at - time.perf_counter()))  # the arrival schedule
        sent = time.perf_counter()
        answer = await ask_final(broker, cluster, request, timeout_s=1200)
        return {**answer, "span": (sent, time.perf_counter())}

    answers = await asyncio.gather(*[one(r, at) for r, at in zip(requests, starts, strict=True)])
    return list(answers), time.perf_counter() - began


def overlapping(answers: list[dict[str, Any]]) -> list[bool]:
    """For each answer, whether another request was in flight at some moment of its own."""
    spans = [a["span"] for a in answers]
    return [any(j != i and s2 < e1 and s1 < e2 for j, (s2, e2) in enumerate(spans)) for i, (s1, e1) in enumerate(spans)]


async def run_one_at_a_time(broker: str, cluster: str, requests: list[dict[str, Any]]) -> tuple[list[dict], float]:
    began = time.perf_counter()
    answers = [await ask_final(broker, cluster, r, timeout_s=1200) for r in requests]
    return answers, time.perf_counter() - began


def summarise(answers: list[dict[str, Any]], wall_s: float, busy: dict[str, float]) -> dict[str, Any]:
    bad = [a for a in answers if a.get("type") != "final"]
    if bad:
        raise RuntimeError(f"failed answers: {bad[:3]}")
    ttft = [a["timings"]["ttft_ms"] for a in answers]
    tpot = [a["timings"]["tpot_ms"] for a in answers if a["usage"]["completion_tokens"] > 1]
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    extra: dict[str, Any] = {}
    if all("span" in a for a in answers):  # which requests had the cluster to themselves
        shared = overlapping(answers)
        alone = [a["timings"]["tpot_ms"] for a, s in zip(answers, shared, strict=True)
                 if not s and a["usage"]["completion_tokens"] > 1]
        extra = {"overlapped": sum(shared), "tpot_ms_median_not_overlapped": statistics.median(alone) if alone
                 else None, "tpot_ms_each": [a["timings"]["tpot_ms"] for a in answers], "overlapped_each": shared}
    return {
        "requests": len(answers), "output_tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
        "ttft_ms_median": statistics.median(ttft), "ttft_ms_p95": percentile(ttft, 0.95),
        "tpot_ms_median": statistics.median(tpot), "tpot_ms_p95": percentile(tpot, 0.95),
        "busy_fraction": busy, **extra,
    }


def busy_between(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for device, (ts, compute) in after.items():
        if device in before and ts > before[device][0]:
            out[device] = round((compute - before[device][1]) / (ts - before[device][0]), 3)
    return out


async def measure(broker: str, cluster: str, args: argparse.Namespace) -> dict[str, Any]:
    telemetry = Telemetry(broker, cluster)
    listener = asyncio.create_task(telemetry.listen())
    rng = random.Random(args.seed)
    def request(i: int) -> dict[str, Any]:
        chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        return {"messages": chat, "max_tokens": args.tokens, "stream": False}

    burst = [request(i) for i in range(args.burst)]
    sporadic = [request(i) for i in range(args.sporadic)]

    async def settle_telemetry() -> dict[str, tuple[float, float]]:
        # Telemetry comes every few seconds: wait for a fresh report from every device.
        mark = time.time()
        while len(telemetry.latest) < args.stages or min(t["ts"] for t in telemetry.latest.values()) < mark:
            telemetry.updated.clear()
            await telemetry.updated.wait()
        return telemetry.snapshot()

    rounds: list[dict[str, Any]] = []
    reference: dict[str, list[int]] = {}
    try:
        await run_one_at_a_time(broker, cluster, burst[:1])  # warm up
        for round_ in range(args.rounds):
            result: dict[str, Any] = {}
            for pattern in [p.strip() for p in args.patterns.split(",")]:
                before = await settle_telemetry()
                if pattern == "one at a time":
                    answers, wall = await run_one_at_a_time(broker, cluster, burst)
                elif pattern == "bursty":
                    answers, wall = await run_requests(broker, cluster, burst, [0.0] * len(burst))
                else:
                    gaps = [rng.expovariate(args.rate) for _ in sporadic]
                    starts = [sum(gaps[: i + 1]) for i in range(len(gaps))]
                    answers, wall = await run_requests(broker, cluster, sporadic, starts)
                after = await settle_telemetry()
                for request, answer in zip(burst if pattern != "sporadic" else sporadic, answers, strict=True):
                    ids = reference.setdefault(json.dumps(request["messages"]), answer.get("token_ids", []))
                    if answer.get("token_ids") != ids:
                        raise RuntimeError(f"{pattern}: an answer differs from the same request's other answers")
                result[pattern] = summarise(answers, wall, busy_between(before, after))
                row = result[pattern]
                print(f"round {round_ + 1} {pattern:14s}: {row['tokens_per_s']:6.1f} tokens/s, "
                      f"ttft {row['ttft_ms_median']:7.1f} ms (p95 {row['ttft_ms_p95']:7.1f}), "
                      f"tpot {row['tpot_ms_median']:6.1f} ms (p95 {row['tpot_ms_p95']:6.1f}), "
                      f"busy {row['busy_fraction']}"
                      + (f", {row['overlapped']} overlapped" if "overlapped" in row else ""), flush=True)
            rounds.append(result)
    finally:
        listener.cancel()
    return {"rounds": rounds}


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = report["medians"]
    patterns = list(med)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(patterns, [med[p]["tokens_per_s"] for p in patterns], color=["#888", "#2a7", "#27a"][: len(patterns)])
    axes[0].set_title("output tokens per second")
    for offset, (key, label) in enumerate((("tpot_ms_median", "median"), ("tpot_ms_p95", "p95"))):
        axes[1].bar([i + 0.4 * offset for i in range(len(patterns))], [med[p][key] for p in patterns], width=0.4,
                    label=label)
    axes[1].set_xticks([i + 0.2 for i in range(len(patterns))], patterns)
    axes[1].set_title("time per output token (ms)")
    axes[1].legend()
    devices = sorted(med[patterns[0]]["busy_fraction"])
    for offset, pattern in enumerate(patterns):
        axes[2].bar([i + 0.27 * offset for i in range(len(devices))],
                    [med[pattern]["busy_fraction"].get(d, 0) for d in devices], width=0.27, label=pattern)
    axes[2].set_xticks([i + 0.27 for i in range(len(devices))], devices)
    axes[2].set_title("device busy fraction")
    axes[2].legend()
    fig.suptitle(f"{report['model']}, {report['stages']} stages, "
                 f"{report['burst']} requests x {report['tokens']} tokens, devices batch up to {report['max_batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--sporadic", type=int, default=6)
    parser.add_argument("--rate", type=float, default=0.06, help="sporadic arrivals per second")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--patterns", default="one at a time,bursty,sporadic",
                        help="comma-separated subset of: one at a time, bursty, sporadic")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="devices batch up to this many decode steps (1: no batching)")
    parser.add_argument("--out", default="bench/results/load.json")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    devices = [DeviceSpec(f"load-{i}", 2000 // args.stages + 200, 1, ("--max-batch", str(args.max_batch)))
               for i in range(args.stages)]
    with LocalBroker() as broker:
        cluster = f"load{os.getpid()}"
        with ProcessCluster(broker.url, cluster, str(folder), devices, Path(tempfile.mkdtemp(prefix="lime-load-")),
                            planner_args=("--strategy", "equal", "--sequences", str(args.burst)),
                            coordinator_args=("--max-concurrent", str(args.burst))) as procs:
            plan = procs.wait_ready(timeout_s=300)
            assert len(plan.stages) == args.stages, plan
            measured = asyncio.run(measure(broker.url, cluster, args))
    medians: dict[str, dict[str, Any]] = {}
    for pattern in measured["rounds"][0]:
        rows = [r[pattern] for r in measured["rounds"]]
        medians[pattern] = {key: statistics.median(row[key] for row in rows) for key in rows[0]
                            if isinstance(rows[0][key], int | float) and all(row[key] is not None for row in rows)}
        medians[pattern]["busy_fraction"] = {
            d: statistics.median(row["busy_fraction"].get(d, 0.0) for row in rows) for d in rows[0]["busy_fraction"]
        }
    single = medians["one at a time"]
    ratios = {}
    if "bursty" in medians:
        ratios["bursty_throughput_vs_one_at_a_time"] = medians["bursty"]["tokens_per_s"] / single["tokens_per_s"]
    if "sporadic" in medians:
        ratios["sporadic_tpot_vs_one_at_a_time"] = medians["sporadic"]["tpot_ms_median"] / single["tpot_ms_median"]
        if "tpot_ms_median_not_overlapped" in medians["sporadic"]:
            ratios["sporadic_not_overlapped_tpot_vs_one_at_a_time"] = (
                medians["sporadic"]["tpot_ms_median_not_overlapped"] / single["tpot_ms_median"])
    report = {
        "model": args.model, "stages": args.stages, "burst": args.burst, "tokens": args.tokens,
        "max_batch": args.max_batch,
        "sporadic": args.sporadic, "rate_per_s": args.rate, "rounds": measured["rounds"], "medians": medians,
        **ratios,
    }
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    chart(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
