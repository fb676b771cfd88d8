"""``lime-mqtt demo`` (part of the command line, so it prints): a whole cluster on this machine,
one question, a clean shutdown."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.cli.settings import Settings
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.planning.plan import format_plan
from lime_mqtt.transport.mosquitto import LocalBroker

DEMO_MEMORY_MB = (320, 256, 256, 224, 224, 192)


def run_demo(settings: Settings, devices: int, question: str, max_tokens: int) -> int:
    from lime_mqtt.cli.main import stream_answer

    if not 1 <= devices <= len(DEMO_MEMORY_MB):
        print(f"--devices must be between 1 and {len(DEMO_MEMORY_MB)}")
        return 2
    print(f"preparing model {settings.model!r} (the first run converts it, about a minute) ...", flush=True)
    folder = resolve_model(settings.model)
    log_dir = Path(tempfile.mkdtemp(prefix="lime-demo-"))
    # All agents share this machine's cores: one torch thread each (see docs/benchmarks.md).
    specs = [DeviceSpec(f"device-{i + 1}", DEMO_MEMORY_MB[i], threads=1) for i in range(devices)]
    with LocalBroker(folder=log_dir / "broker") as broker:
        print(f"broker: mosquitto on {broker.url}", flush=True)
        cluster = ProcessCluster(broker.url, "demo", str(folder), specs, log_dir)
        with cluster:
            names = ", ".join(f"{s.device_id} ({s.memory_mb} MB)" for s in specs)
            print(f"started planner, coordinator and {devices} device agents: {names}", flush=True)
            print(f"logs: {log_dir}", flush=True)
            started = time.monotonic()
            plan = cluster.wait_ready()
            print(f"devices ready after {time.monotonic() - started:.1f} s\n", flush=True)
            print(format_plan(plan, explain=True), flush=True)
            print(f"\nquestion: {question}\nanswer:   ", end="", flush=True)
            request = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
            code = asyncio.run(stream_answer(broker.url, "demo", request, timeout_s=300))
            print("\nshutting down ...", flush=True)
        codes = cluster.stop()
    unclean = {name: code for name, code in codes.items() if code != 0}
    if unclean:
        print(f"processes that did not stop cleanly: {unclean}")
    print("done.")
    return code
