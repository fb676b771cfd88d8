"""Time to first token and per output token over shaped links, against loopback and
against the cost model's prediction (docs/benchmarks.md#over-shaped-links).

For every device link of 1000, 100 and 20 Mbit/s and every added round trip of 0, 5 and
20 ms, the shaped-network rig (lime_mqtt/cli/rig.py; root) starts two SmolLM2 devices in
their own network namespaces, each behind such a link, and asks one request at a time.
A loopback cluster of the same two devices stays up throughout and answers a request
before each setting's, so each ratio compares the same minutes. The prediction is the
plan's (the planner's cost model on the links as the devices measured them) for time per
token, and ``predict_plan_prefill_ms`` for the first token. Token ids must agree across
settings.

    sudo .venv/bin/python bench/links.py [--model smollm2] [--tokens 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster, device_statuses
from lime_mqtt.cli.rig import Link, Rig, RigDevice
from lime_mqtt.client import ask_final
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.model.checkpoint import Checkpoint, model_size
from lime_mqtt.planning.cost import DeviceProfile, Workload
from lime_mqtt.planning.plan import predict_plan_prefill_ms
from lime_mqtt.transport.mosquitto import LocalBroker

PROMPT = "Explain in a few sentences why a pump in a cooling loop might lose pressure."
BANDWIDTHS = (1000.0, 100.0, 20.0)
RTTS = (0.0, 5.0, 20.0)


def one_request(broker: str, cluster: str, tokens: int) -> dict[str, Any]:
    final = asyncio.run(ask_final(broker, cluster, {"prompt": PROMPT, "max_tokens": tokens, "stream": False},
                                  timeout_s=300))
    if final.get("type") != "final":
        raise RuntimeError(f"{cluster}: {final}")
    return final


def predictions(broker: str, cluster: str, plan: Any, folder: Path,
                prompt_tokens: int) -> tuple[float, float, dict[str, dict[str, float]]]:
    """Predicted time to first token and per token, and each device's link as it measured it."""
    statuses = asyncio.run(device_statuses(broker, cluster, [s.device_id for s in plan.stages]))
    profiles = {d: DeviceProfile.from_status(d, status) for d, status in statuses.items()}
    checkpoint = Checkpoint(folder)
    ttft = predict_plan_prefill_ms(plan, model_size(checkpoint, folder.name), profiles, prompt_tokens, Workload())
    links = {d: {k: status["capabilities"].get(k) for k in ("link_rtt_ms", "link_mb_s")}
             for d, status in statuses.items()}
    return ttft or 0.0, plan.predicted_ms_per_token or 0.0, links


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-mb", type=int, default=330, help="each device's budget (two are needed for SmolLM2)")
    parser.add_argument("--out", default="bench/results/links.json")
    parser.add_argument("--chart", default="docs/bench-links.png")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/links.py needs root (network namespaces and qdiscs)", file=sys.stderr)
        return 2
    folder = resolve_model(args.model)
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(folder)(PROMPT).input_ids)
    log_dir = Path(tempfile.mkdtemp(prefix="lime-bench-links-"))
    rows: list[dict[str, Any]] = []
    reference: list[int] | None = None
    with LocalBroker() as broker:
        loop_devices = [DeviceSpec(f"lnk-{i}", args.memory_mb, 1) for i in range(2)]
        with ProcessCluster(broker.url, "links-loopback", str(folder), loop_devices, log_dir / "loopback") as procs:
            loop_plan = procs.wait_ready(timeout_s=300)
            one_request(broker.url, "links-loopback", args.tokens)  # warm-up
            settings = [(bandwidth, rtt) for bandwidth in BANDWIDTHS for rtt in RTTS]
            for index, (bandwidth, rtt) in enumerate(settings):
                name = f"lk{index}"
                link = Link(up_mbit=bandwidth, down_mbit=bandwidth, rtt_ms=rtt)
                devices = [RigDevice(f"lnk-{i}", args.memory_mb, link) for i in range(2)]
                with Rig(name, str(folder), devices, log_dir=log_dir / name) as rig:
                    plan = rig.plan
                    assert plan is not None
                    predicted_ttft, predicted_tpot, links = predictions(rig.broker.url, rig.cluster, plan,
                                                                        folder, prompt_tokens)
                    one_request(rig.broker.url, rig.cluster, args.tokens)  # warm-up
                    shaped, loop = [], []
                    for _ in range(args.rounds):
                        loop.append(one_request(broker.url, "links-loopback", args.tokens))
                        shaped.append(one_request(rig.broker.url, rig.cluster, args.tokens))
                for final in shaped + loop:
                    reference = reference or final["token_ids"]
                    if final["token_ids"] != reference:
                        print(f"{name}: tokens differ!", file=sys.stderr)
                        return 1
                row = {
                    "mbit": bandwidth, "rtt_ms": rtt, "stages": len(plan.stages),
                    "split": [f"{s.device_id}[{s.start},{s.stop})" for s in plan.stages],
                    "ttft_ms": statistics.median(f["timings"]["ttft_ms"] for f in shaped),
                    "tpot_ms": statistics.median(f["timings"]["tpot_ms"] for f in shaped),
                    "loopback_ttft_ms": statistics.median(f["timings"]["ttft_ms"] for f in loop),
                    "loopback_tpot_ms": statistics.median(f["timings"]["tpot_ms"] for f in loop),
                    "predicted_ttft_ms": predicted_ttft, "predicted_tpot_ms": predicted_tpot,
                    "measured_links": links,
                    "ttft_runs_ms": [f["timings"]["ttft_ms"] for f in shaped],
                    "tpot_runs_ms": [f["timings"]["tpot_ms"] for f in shaped],
                }
                row["tpot_error"] = row["predicted_tpot_ms"] / row["tpot_ms"] - 1
                row["ttft_error"] = row["predicted_ttft_ms"] / row["ttft_ms"] - 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nloopback plan: {[f'{s.device_id}[{s.start},{s.stop})' for s in loop_plan.stages]}")
    header = (f"{'Mbit/s':>7s} {'+RTT ms':>8s} {'stages':>6s} {'TTFT':>8s} {'loop':>7s} {'pred':>7s} {'err':>7s} "
              f"{'TPOT':>7s} {'loop':>7s} {'pred':>7s} {'err':>7s}")
    print(header)
    for r in rows:
        print(f"{r['mbit']:7.0f} {r['rtt_ms']:8.0f} {r['stages']:6d} {r['ttft_ms']:8.1f} {r['loopback_ttft_ms']:7.1f} "
              f"{r['predicted_ttft_ms']:7.1f} {r['ttft_error']:+7.1%} {r['tpot_ms']:7.1f} {r['loopback_tpot_ms']:7.1f} "
              f"{r['predicted_tpot_ms']:7.1f} {r['tpot_error']:+7.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "tokens": args.tokens, "rounds": args.rounds,
                                          "prompt_tokens": prompt_tokens, "rows": rows}, indent=2) + "\n")
    chart(rows, Path(args.chart))
    return 0


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft", "time to first token (ms)"), (axes[1], "tpot", "time per token (ms)")):
        for bandwidth in BANDWIDTHS:
            mine = [r for r in rows if r["mbit"] == bandwidth]
            rtts = [r["rtt_ms"] for r in mine]
            ax.plot(rtts, [r[f"{key}_ms"] for r in mine], "o-", label=f"{bandwidth:.0f} Mbit/s, measured")
            ax.plot(rtts, [r[f"predicted_{key}_ms"] for r in mine], "x--", label=f"{bandwidth:.0f} Mbit/s, predicted")
        ax.axhline(statistics.median(r[f"loopback_{key}_ms"] for r in rows), color="grey", lw=1, label="loopback")
        ax.set_xlabel("added round trip per device link (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
