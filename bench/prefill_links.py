"""A long prompt over a slow link: does its prefill hold up the answers already running?

On the shaped-network rig (lime_mqtt/cli/rig.py; root), two SmolLM2 devices behind
``--mbit`` links with ``--rtt-ms`` added round trip. Each round streams one answer; after
its 8th token a second client sends a long prompt (``--prompt-tokens``, one token asked).
For the stream: the longest wait between two of its tokens while the long prompt is
being prefilled (its time per token around it is the baseline); for the long prompt:
its time to first token. Two coordinator settings take turns, round after round, on the
same rig (the coordinator is restarted between them):

- ``--prefill-link-ms 100`` (the default): chunks sized for the slowest measured link;
- ``--prefill-link-ms 0``: chunks of ``--prefill-chunk`` (256) whatever the link.

Results go to ``bench/results/prefill-links.json`` (docs/benchmarks.md).

    sudo .venv/bin/python bench/prefill_links.py [--mbit 20] [--rtt-ms 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from lime_mqtt.cli.rig import Link, Rig, RigDevice
from lime_mqtt.client import ask, ask_final
from lime_mqtt.model.builtin import resolve_model

STREAM_PROMPT = "Explain in a few sentences why a pump in a cooling loop might lose pressure."
LONG_TEXT = ("Shift report for line 2: pump P-3 ran hot after the filter change, valve V-17 was closed for "
             "maintenance, the conveyor stopped twice because of a jammed roller, and the compressor cycled "
             "on and off every few minutes until the night crew replaced the pressure switch. ")
SETTINGS = {"link-sized chunks (--prefill-link-ms 100)": ("--prefill-link-ms", "100"),
            "chunks of 256 (--prefill-link-ms 0)": ("--prefill-link-ms", "0")}


async def one_round(broker: str, cluster: str, long_prompt: str, tokens: int) -> dict[str, Any]:
    """The stream's token arrival times, and the long prompt's sending time and answer."""
    arrivals: list[float] = []
    long_task: asyncio.Task[tuple[float, float, dict[str, Any]]] | None = None

    async def long_request() -> tuple[float, float, dict[str, Any]]:
        sent = time.perf_counter()
        final = await ask_final(broker, cluster, {"prompt": long_prompt, "max_tokens": 1, "stream": False},
                                timeout_s=300, client=f"long-{uuid.uuid4().hex[:6]}")
        return sent, time.perf_counter(), final

    try:
        async for message in ask(broker, cluster, {"prompt": STREAM_PROMPT, "max_tokens": tokens, "stream": True},
                                 timeout_s=300, wait_for_coordinator_s=60):
            if message["type"] == "chunk":
                now = time.perf_counter()
                arrivals.extend(now for _ in message["token_ids"])
                if len(arrivals) >= 8 and long_task is None:
                    long_task = asyncio.create_task(long_request())
            elif message["type"] != "queued":
                if message["type"] != "final":
                    raise RuntimeError(f"the stream ended with {message}")
                break
        if long_task is None:
            raise RuntimeError("the stream ended before its 8th token")
        sent, answered, final = await long_task
    finally:
        if long_task is not None and not long_task.done():  # the stream failed: do not leave it running
            long_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await long_task
    if final.get("type") != "final":
        raise RuntimeError(f"the long prompt: {final}")
    if answered > arrivals[-1]:
        raise RuntimeError("the stream ended before the long prompt's answer came: ask for more --tokens")
    during = [b - a for a, b in itertools.pairwise(arrivals) if b > sent and a < answered]
    before = [b - a for a, b in itertools.pairwise(arrivals) if b <= sent]
    return {"longest_gap_ms": 1000 * max(during), "tpot_before_ms": 1000 * statistics.median(before),
            "long_ttft_ms": final["timings"]["ttft_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--mbit", type=float, default=20.0)
    parser.add_argument("--rtt-ms", type=float, default=5.0)
    parser.add_argument("--memory-mb", type=int, default=420, help="each device's budget (no layer streamed)")
    parser.add_argument("--prompt-tokens", type=int, default=600, help="about this long a prompt")
    parser.add_argument("--tokens", type=int, default=160, help="the stream's tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/prefill-links.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/prefill_links.py needs root (network namespaces and qdiscs)", file=sys.stderr)
        return 2
    folder = resolve_model(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    repeats = max(1, args.prompt_tokens // len(tokenizer(LONG_TEXT).input_ids))
    long_prompt = LONG_TEXT * repeats
    prompt_tokens = len(tokenizer(long_prompt).input_ids)
    link = Link(up_mbit=args.mbit, down_mbit=args.mbit, rtt_ms=args.rtt_ms)
    devices = [RigDevice(f"pl-{i}", args.memory_mb, link) for i in range(2)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    log_dir = Path(tempfile.mkdtemp(prefix="lime-bench-prefill-links-"))
    with Rig("pl", str(folder), devices, log_dir=log_dir, planner_args=("--strategy", "equal")) as rig:
        plan = rig.plan
        assert plan is not None
        print(f"plan: {[f'{s.device_id}[{s.start},{s.stop})' for s in plan.stages]}; prompt {prompt_tokens} "
              f"tokens; logs in {log_dir}", flush=True)
        for number in range(args.rounds + 1):  # round 0 warms up
            for name, options in SETTINGS.items():
                rig.restart_coordinator(*options)
                measured = asyncio.run(one_round(rig.broker.url, rig.cluster, long_prompt, args.tokens))
                print(f"round {number}, {name}: {json.dumps(measured)}", flush=True)
                if number:
                    results[name].append(measured)
    summary = {name: {key: statistics.median(r[key] for r in runs)
                      for key in ("longest_gap_ms", "tpot_before_ms", "long_ttft_ms")}
               for name, runs in results.items()}
    print(f"\n{'setting':44s} {'longest gap ms':>15s} {'ms/token before':>16s} {'long prompt TTFT ms':>20s}")
    for name, row in summary.items():
        print(f"{name:44s} {row['longest_gap_ms']:15.0f} {row['tpot_before_ms']:16.1f} {row['long_ttft_ms']:20.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "mbit": args.mbit, "rtt_ms": args.rtt_ms, "prompt_tokens": prompt_tokens,
        "stream_tokens": args.tokens, "rounds": args.rounds, "summary": summary, "runs": results,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
