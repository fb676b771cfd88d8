"""``lime-mqtt demo`` (part of the command line, so it prints): a whole cluster on this machine,
one question, a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.cli.progress import terminal_bars
from lime_mqtt.cli.settings import Settings
from lime_mqtt.core.topics import Identity
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.planning.plan import format_plan
from lime_mqtt.transport.mosquitto import LocalBroker, SecureBroker

if TYPE_CHECKING:
    from lime_mqtt.broker import BrokerFolder

DEMO_MEMORY_MB = (320, 256, 256, 224, 224, 192)


DEMO_PORT = 18883  # the demo broker's TLS listener, on 127.0.0.1


def demo_folder() -> Path:
    """Where the demo keeps its broker (CA, certificate, identities, persistence): a folder
    Mosquitto's own user can reach when this runs as root."""
    if os.geteuid() == 0:
        return Path("/var/lib/lime-mqtt/demo")
    return Path.home() / ".local" / "share" / "lime-mqtt" / "demo"


def secure_demo_broker(devices: list[str]) -> BrokerFolder:
    """The demo's broker folder, made on the first run (``lime-mqtt broker init``): TLS on
    127.0.0.1, a password for each role and device, the ACL; later runs reuse it."""
    from lime_mqtt.broker import BrokerFolder

    folder = BrokerFolder(demo_folder())
    config = folder.config() if folder.initialised else None
    known = {m.identity for m in config.members} if config is not None else set()
    if config is None or config.cluster != "demo":
        print(f"first run: writing a private CA, the broker's certificate and an identity per role into "
              f"{folder.path} ...", flush=True)
        folder.path.parent.mkdir(parents=True, exist_ok=True)
        folder.path.parent.chmod(0o755)
        folder.init("demo", ["localhost"], port=DEMO_PORT, bind="127.0.0.1", devices=devices, force=True)
    else:
        for name in devices:
            if Identity("device", name) not in known:
                folder.add("device", name)
    return folder


def run_demo(settings: Settings, devices: int, question: str, max_tokens: int, secure: bool = True) -> int:
    from lime_mqtt.cli.main import stream_answer

    if not 1 <= devices <= len(DEMO_MEMORY_MB):
        print(f"--devices must be between 1 and {len(DEMO_MEMORY_MB)}")
        return 2
    print(f"preparing model {settings.model!r} (the first run converts it, about a minute) ...", flush=True)
    folder = resolve_model(settings.model, terminal_bars)
    log_dir = Path(tempfile.mkdtemp(prefix="lime-demo-"))
    # All agents share this machine's cores: one torch thread each (see docs/benchmarks.md).
    specs = [DeviceSpec(f"device-{i + 1}", DEMO_MEMORY_MB[i], threads=1) for i in range(devices)]
    with contextlib.ExitStack() as stack:
        if secure:
            broker_folder = secure_demo_broker([s.device_id for s in specs])
            secure_broker = stack.enter_context(SecureBroker(broker_folder))
            url, client = secure_broker.url, secure_broker.transport("client", "default")
            print(f"broker: mosquitto on {url} (TLS; planner, coordinator, client and each device with its own "
                  f"password, an ACL that binds every message to its sender; in {broker_folder.path})", flush=True)
        else:
            broker_folder = None
            plain = stack.enter_context(LocalBroker(folder=log_dir / "broker"))
            url = plain.url
            client = plain.transport()
            print(f"broker: mosquitto on {url} (insecure loopback: anonymous, plaintext)", flush=True)
        cluster = ProcessCluster(url, "demo", str(folder), specs, log_dir, identities=broker_folder)
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
            code = asyncio.run(stream_answer(client, "demo", request, timeout_s=300))
            print("\nshutting down ...", flush=True)
        codes = cluster.stop()
    unclean = {name: code for name, code in codes.items() if code != 0}
    if unclean:
        print(f"processes that did not stop cleanly: {unclean}")
    print("done.")
    return code
