"""Chained decode steps against a coordinator that sends every step, with the coordinator
on a link of its own.

Chained (the default), the last stage sends each next decode step straight to the first
stage, so the coordinator is off the per-token path; unchained (``coordinator
--no-chain``), every token goes back through the coordinator. On one machine the
coordinator's hop is loopback and costs little; in a plant the coordinator sits on a
network link of its own. Here it reaches the broker through a delaying TCP proxy
(lime_mqtt/cli/delay_proxy.py) that adds ``--rtt-ms`` to its round trip, while the
devices stay on loopback; no root needed. Two clusters of ``--stages`` SmolLM2 device
agents share one Mosquitto, one chained and one not; their rounds alternate, and their
token ids must agree. Medians of ms per output token go to bench/results/chain.json.

    .venv/bin/python bench/chain.py [--rtt-ms 0 4] [--rounds 5] [--tokens 48] [--stages 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tpot import cluster_runner, interleaved_rounds

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.transport.mosquitto import LocalBroker, free_port, wait_for_port


@contextlib.contextmanager
def delaying_proxy(broker_port: int, rtt_ms: float, log: Path) -> Iterator[str]:
    """A proxy to the broker that adds ``rtt_ms`` to a round trip; its mqtt:// URL."""
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "lime_mqtt.cli.delay_proxy", "--listen", f"127.0.0.1:{port}",
                              "--to", f"127.0.0.1:{broker_port}", "--delay-ms", str(rtt_ms / 2)],
                             stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, process=proxy)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 4.0],
                        help="round trips added to the coordinator's link, one setting each")
    parser.add_argument("--out", default="bench/results/chain.json")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="lime-bench-chain-"))
    report: dict[str, object] = {"model": args.model, "stages": args.stages, "tokens": args.tokens,
                                 "rounds": args.rounds, "settings": []}
    with LocalBroker() as broker:
        for rtt in args.rtt_ms:
            with contextlib.ExitStack() as stack:
                coordinator_url = stack.enter_context(delaying_proxy(broker.port, rtt, log_dir / f"proxy-{rtt}.log"))
                runners = {}
                for label, options in (("chained", ()), ("unchained", ("--no-chain",))):
                    name = f"chain{label[0]}{int(rtt * 10)}"
                    devices = [DeviceSpec(f"{name}-dev{i}", 1600 // args.stages + 100, 1) for i in range(args.stages)]
                    cluster = stack.enter_context(ProcessCluster(
                        broker.url, name, str(folder), devices, log_dir / name, planner_args=("--strategy", "equal"),
                        coordinator_args=options, coordinator_broker=coordinator_url))
                    cluster.wait_ready()
                    runners[label] = cluster_runner(broker.url, name, args.tokens)
                print(f"coordinator round trip +{rtt:g} ms:", flush=True)
                times = interleaved_rounds(runners, args.rounds)
                if times is None:
                    return 1
            medians = {label: statistics.median(t) for label, t in times.items()}
            saved = medians["unchained"] - medians["chained"]
            print(f"  chained {medians['chained']:.1f} ms/token, unchained {medians['unchained']:.1f}: "
                  f"{saved:.1f} ms saved per token", flush=True)
            report["settings"].append({"coordinator_rtt_ms": rtt, "ms_per_token_median": medians,  # type: ignore[union-attr]
                                       "saved_ms": saved, "runs_ms": times})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
