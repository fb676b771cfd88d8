"""Time per output token with TLS against plaintext, on the same 4-stage cluster, in one run.

Two brokers on this machine: Mosquitto with the generated secure configuration (a
broker folder from ``lime-mqtt broker init``: TLS, an identity and password per role,
the ACL) and the anonymous plaintext loopback broker. The same cluster (planner,
coordinator and ``--stages`` device agents as processes, one torch thread each) runs on
each; the two take turns, round after round, so that machine noise hits them alike. The
token ids must agree. Medians, the ratio of medians and the median of the per-round
ratios are printed and written to bench/results/tls.json.

    .venv/bin/python bench/tls.py [--model smollm2] [--stages 4] [--tokens 64] [--rounds 7]
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

from lime_mqtt.broker import BrokerFolder
from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.transport.mosquitto import LocalBroker, SecureBroker, free_port


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="bench/results/tls.json")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    base = Path(tempfile.mkdtemp(prefix="lime-bench-tls-"))
    base.chmod(0o755)  # Mosquitto runs as its own user
    memory_mb = 1600 // args.stages + 100
    names = {"tls": [f"tls-dev{i}" for i in range(args.stages)], "plain": [f"plain-dev{i}" for i in range(args.stages)]}
    broker_folder = BrokerFolder(base / "broker")
    broker_folder.init("tls", ["localhost"], port=free_port(), bind="127.0.0.1", devices=names["tls"])
    runners = {}
    with contextlib.ExitStack() as stack:
        secure = stack.enter_context(SecureBroker(broker_folder))
        plain = stack.enter_context(LocalBroker(folder=base / "plain"))
        for label, url, identities in [("plaintext", plain.url, None), ("TLS", secure.url, broker_folder)]:
            cluster = "tls" if identities else "plain"
            devices = [DeviceSpec(d, memory_mb, 1) for d in names[cluster]]
            procs = stack.enter_context(ProcessCluster(url, cluster, str(folder), devices, base / "logs" / cluster,
                                                       planner_args=("--strategy", "equal"), identities=identities))
            plan = procs.wait_ready()
            assert len(plan.stages) == args.stages, plan
            client = secure.transport("client", "default") if identities else plain.url
            runners[f"{args.stages} stages, {label}"] = cluster_runner(client, cluster, args.tokens)
        times = interleaved_rounds(runners, args.rounds)
    if times is None:
        return 1
    plain_t, tls_t = times[f"{args.stages} stages, plaintext"], times[f"{args.stages} stages, TLS"]
    report = {
        "model": args.model, "stages": args.stages, "tokens": args.tokens, "rounds": args.rounds,
        "plaintext_ms_per_token": plain_t, "tls_ms_per_token": tls_t,
        "plaintext_median": statistics.median(plain_t), "tls_median": statistics.median(tls_t),
        "ratio_of_medians": statistics.median(tls_t) / statistics.median(plain_t),
        "ratio_per_round_median": statistics.median(t / p for t, p in zip(tls_t, plain_t, strict=True)),
    }
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("per_token")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
