"""Batched decode: a lone request with batching on and off, and bursts of 16 and 32 at once.

Two clusters of the same ``--stages`` device agents (separate processes, one torch
thread each) share one local Mosquitto: one with ``--max-batch 1`` (batching off) and
one with ``--max-batch 32``. Each round, in turn:

- a lone request on each cluster (time per output token: does batching slow it down?);
- a burst of 16 and of 32 requests sent at once to the batching cluster (four prompts
  in turn, each request its own sequence),
  against the same requests one after another on it: output tokens per second of the
  burst over the one-at-a-time rate.

Every answer of a burst must be token-identical to the lone answer for its prompt
(greedy decoding; batching must not change an answer). Medians over ``--rounds`` are
printed and written to bench/results/batch.json.

    .venv/bin/python bench/batch.py [--model smollm2] [--stages 4] [--tokens 32] [--rounds 3]
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
from pathlib import Path
from typing import Any

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask_final
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.transport.mosquitto import LocalBroker

PROMPTS = [
    "Explain in a few sentences why a pump in a cooling loop might lose pressure.",
    "Summarise the shift report: two alarms, one false, no injuries.",
    "What should an operator check before restarting conveyor belt 3?",
    "List three causes of overheating in an electric motor.",
]


async def _burst(broker: str, cluster: str, requests: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    started = time.perf_counter()
    finals = await asyncio.gather(*(ask_final(broker, cluster, r, timeout_s=600) for r in requests))
    return time.perf_counter() - started, list(finals)


async def _one_by_one(broker: str, cluster: str, requests: list[dict[str, Any]]) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    finals = [await ask_final(broker, cluster, r, timeout_s=600) for r in requests]
    return time.perf_counter() - started, finals


def _tokens(finals: list[dict[str, Any]]) -> int:
    for final in finals:
        if final.get("type") != "final":
            raise RuntimeError(f"a request failed: {final}")
    return sum(len(f["token_ids"]) for f in finals)


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bursts", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--out", default="bench/results/batch.json")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="lime-batch-"))
    results: dict[str, list[float]] = {}
    lone_answers: dict[str, list[int]] = {}
    mismatches = 0

    def note(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    with LocalBroker() as broker, contextlib.ExitStack() as stack:
        names = {"off": "batch1", "on": "batch32"}
        for mode, name in names.items():
            memory_mb = 1600 // args.stages + 200  # weights and the KV cache of 32 sequences
            extra = ("--max-batch", "1" if mode == "off" else "32")
            devices = [DeviceSpec(f"{name}-dev{i}", memory_mb, 1, extra) for i in range(args.stages)]
            procs = stack.enter_context(ProcessCluster(
                broker.url, name, str(folder), devices, log_dir / name,
                planner_args=("--strategy", "equal", "--sequences", "32"),
                coordinator_args=("--max-concurrent", "32")))
            plan = procs.wait_ready()
            print(f"{name}: {[(s.device_id, s.start, s.stop) for s in plan.stages]}", flush=True)
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for mode, name in names.items():
                request = {"prompt": PROMPTS[0], "max_tokens": args.tokens, "stream": False}
                final = asyncio.run(ask_final(broker.url, name, request))
                _tokens([final])
                lone_answers.setdefault(PROMPTS[0], final["token_ids"])
                if final["token_ids"] != lone_answers[PROMPTS[0]]:
                    mismatches += 1
                if round_:
                    note(f"lone request, batching {mode}: ms/token", final["timings"]["tpot_ms"])
            for size in args.bursts:
                requests = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.tokens, "stream": False}
                            for i in range(size)]
                wall, finals = asyncio.run(_burst(broker.url, names["on"], requests))
                burst_rate = _tokens(finals) / wall
                seq_wall, seq_finals = asyncio.run(_one_by_one(broker.url, names["on"], requests[: len(PROMPTS)]))
                seq_rate = _tokens(seq_finals) / seq_wall
                alone = {r["prompt"]: f["token_ids"] for r, f in zip(requests, seq_finals, strict=False)}
                mismatches += sum(f["token_ids"] != alone[r["prompt"]] for r, f in zip(requests, finals, strict=True))
                if round_:
                    note(f"burst of {size}: output tokens/s", burst_rate)
                    note(f"burst of {size}: one at a time, tokens/s", seq_rate)
                    note(f"burst of {size}: speed-up over one at a time", burst_rate / seq_rate)
            print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), flush=True)
    summary = {key: {"median": statistics.median(values), "runs": values} for key, values in results.items()}
    lone_on = statistics.median(results["lone request, batching on: ms/token"])
    lone_off = statistics.median(results["lone request, batching off: ms/token"])
    ratios = [a / b for a, b in zip(results["lone request, batching on: ms/token"],
                                   results["lone request, batching off: ms/token"], strict=True)]
    print(f"\n{'figure':48s} {'median':>10s}")
    for key, row in summary.items():
        print(f"{key:48s} {row['median']:10.2f}")
    print(f"lone request, batching on / off: {lone_on / lone_off:.3f} (median of per-round ratios "
          f"{statistics.median(ratios):.3f}); answers differing from the lone answer: {mismatches}")
    report = {"model": args.model, "stages": args.stages, "tokens": args.tokens, "rounds": args.rounds,
              "summary": summary, "lone_on_over_off": lone_on / lone_off,
              "lone_on_over_off_per_round": statistics.median(ratios), "mismatched_answers": mismatches}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
