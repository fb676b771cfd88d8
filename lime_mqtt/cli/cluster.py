"""Start the roles of a cluster as separate OS processes and wait until it can serve.

Used by ``lime-mqtt demo``, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lime_mqtt.core.errors import LimeError, MessageError
from lime_mqtt.core.topics import Topics
from lime_mqtt.core.view import ClusterView
from lime_mqtt.planning.plan import Plan
from lime_mqtt.transport import BrokerAddress, Transport, transport_for

if TYPE_CHECKING:
    from lime_mqtt.broker.folder import BrokerFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    memory_mb: int
    threads: int | None = None
    extra_args: tuple[str, ...] = ()  # more `lime-mqtt device` options


async def wait_for_ready_plan(
    broker: str | BrokerAddress | Transport, cluster: str, timeout_s: float, quorum: int = 1, coordinator: bool = True,
    planner_errors: bool = True,
) -> Plan:
    """Wait until a plan exists with at least ``quorum`` stages, all of whose devices report
    ready for it, and (with ``coordinator``) a coordinator is serving requests.

    With ``planner_errors``, a planner that says it cannot plan ends the wait at once
    with its reason (a retained error from before this call counts only if no plan is
    out either)."""
    view = ClusterView(Topics(cluster))
    async with transport_for(broker).connection() as conn:
        await conn.subscribe(*view.subscriptions())
        try:
            async with asyncio.timeout(timeout_s):
                async for message in conn.messages():
                    try:
                        update = view.take(message.topic, message.payload, message.retain)
                    except MessageError as exc:
                        log.warning("ignoring a message on %s: %s", message.topic, exc)
                        continue
                    said = view.planner
                    if (update is not None and update.kind == "planner" and planner_errors and not update.retained
                            and said is not None and said.state == "error"):
                        raise LimeError(f"the planner cannot plan: {said.message}")
                    if coordinator and not view.coordinators:
                        continue
                    plan = view.plan
                    if plan is not None and len(plan.stages) >= quorum and view.plan_ready():
                        return plan
        except TimeoutError:
            pass
    states = {d: s.state for d, s in view.devices.items()}
    raise LimeError(f"no ready plan on cluster {cluster!r} after {timeout_s:.0f} s (devices: {states})")


async def device_statuses(
    broker: str | BrokerAddress | Transport, cluster: str, ids: list[str], timeout_s: float = 10.0
) -> dict[str, dict[str, Any]]:
    """The retained status (as JSON) of each device in ``ids``, or of those heard within
    ``timeout_s``."""
    found: dict[str, dict[str, Any]] = {}
    async with transport_for(broker).connection() as conn:
        await conn.subscribe(Topics(cluster).all_device_status)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async for message in conn.messages():
                    if not message.payload:
                        continue
                    status = json.loads(message.payload)
                    found[status["device_id"]] = status
                    if set(ids) <= set(found):
                        break
    return found


def ready_while_alive(processes: dict[str, subprocess.Popen[bytes]], broker: str | BrokerAddress | Transport,
                      cluster: str, timeout_s: float, coordinator: bool = True) -> Plan:
    """Block until the cluster has a ready plan (:func:`wait_for_ready_plan`); fail at once
    if one of ``processes`` dies first."""

    async def watch() -> Plan:
        waiter = asyncio.create_task(  # awaited below, cancelled on the way out
            wait_for_ready_plan(broker, cluster, timeout_s, coordinator=coordinator), name=f"{cluster}-wait-ready")
        try:
            while not waiter.done():
                dead = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
                if dead:
                    raise LimeError(f"processes exited before the cluster was ready: {dead}")
                await asyncio.wait({waiter}, timeout=0.2)
            return waiter.result()
        finally:
            waiter.cancel()

    return asyncio.run(watch())


def stop_processes(processes: dict[str, subprocess.Popen[bytes]], timeout_s: float) -> dict[str, int | None]:
    """SIGTERM every process, wait (``timeout_s`` for all), SIGKILL what is left; the exit
    codes (None: killed)."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for name, process in processes.items():
        try:
            codes[name] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            codes[name] = None
    return codes


class ProcessCluster:
    """Planner, coordinator and device agents, each its own ``python -m lime_mqtt.cli`` process."""

    def __init__(
        self,
        broker: str,
        cluster: str,
        model: str,
        devices: list[DeviceSpec],
        log_dir: Path,
        *,
        coordinator: bool = True,
        extra_env: dict[str, str] | None = None,
        planner_args: tuple[str, ...] = (),
        planner: bool = True,
        coordinator_args: tuple[str, ...] = (),
        identities: BrokerFolder | None = None,
        coordinator_broker: str | None = None,
    ) -> None:
        self.broker, self.cluster, self.model = broker, cluster, model
        # With a broker folder (lime-mqtt broker init), each process runs with its own
        # identity file (--config): planner/main, coordinator/main, device/{id}, and the
        # helper's own waits use operator/admin.
        self.identities = identities
        self.devices = devices
        self.log_dir = log_dir
        self.with_coordinator = coordinator
        self.planner_args = planner_args
        self.with_planner = planner  # False: someone else publishes the plan
        self.coordinator_args = coordinator_args
        self.coordinator_broker = coordinator_broker  # the coordinator's own way to the broker (a delaying proxy)
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def __repr__(self) -> str:
        alive = sorted(n for n, p in self.processes.items() if p.poll() is None)
        return f"ProcessCluster({self.cluster!r}, alive={alive})"

    @property
    def transport(self) -> str | Transport:
        """How this helper itself reaches the broker (as operator/admin with identities)."""
        if self.identities is None:
            return self.broker
        from lime_mqtt.transport.mosquitto import identity_transport

        return identity_transport(self.identities, "operator", "admin", broker=self.broker)

    def _spawn(self, name: str, *args: str, identity: tuple[str, str] | None = None,
               broker: str | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("ab")
        command = [
            sys.executable, "-m", "lime_mqtt.cli", *args,
            "--broker", broker or self.broker, "--cluster", self.cluster, "--model", self.model,
        ]
        if self.identities is not None and identity is not None:
            command += ["--config", str(self.identities.identity_file(*identity))]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.processes[name] = process
        return process

    def start(self) -> ProcessCluster:
        if self.with_planner:
            self._spawn("planner", "planner", "--quorum", str(len(self.devices)), "--settle", "0.5", *self.planner_args,
                        identity=("planner", "main"))
        if self.with_coordinator:
            self._spawn("coordinator", "coordinator", *self.coordinator_args, identity=("coordinator", "main"),
                        broker=self.coordinator_broker)
        for device in self.devices:
            self.start_device(device)
        return self

    def start_device(self, device: DeviceSpec) -> subprocess.Popen[bytes]:
        """Start (or start again) one device agent."""
        args = ["device", "--device-id", device.device_id, "--memory-mb", str(device.memory_mb)]
        if device.threads:
            args += ["--threads", str(device.threads)]
        args += device.extra_args
        return self._spawn(device.device_id, *args, identity=("device", device.device_id))

    def start_planner(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start one more planner, ``planner/NAME`` (its process is named ``planner-NAME``)."""
        return self._spawn(f"planner-{name}", "planner", "--name", name, "--settle", "0.5", *args,
                           identity=("planner", name))

    def start_coordinator(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start one more coordinator, ``coordinator/NAME`` (its process is named the same)."""
        return self._spawn(f"coordinator-{name}", "coordinator", "--name", name, *args, identity=("coordinator", name))

    def start_bridge(self, port: int, *args: str, identity: tuple[str, str] = ("client", "default"),
                     timeout_s: float = 60.0) -> str:
        """Start ``lime-mqtt http`` on loopback ``port`` (more options in ``args``) and wait
        until it answers and sees a coordinator; its base URL."""
        import urllib.error
        import urllib.request

        process = self._spawn("http", "http", "--listen", f"127.0.0.1:{port}", *args, identity=identity)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return url
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or no coordinator seen yet (503)
            if process.poll() is not None or time.monotonic() > deadline:
                raise LimeError(f"the HTTP bridge did not come up (exit code {process.poll()})\n{self.log_tail()}")
            time.sleep(0.1)  # a synchronous helper (tests, benches): no event loop runs here

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: no goodbye, no cleanup) to one process and reap it; it no
        longer counts as a process of the cluster (``wait_ready`` does not fail on it)."""
        process = self.processes.pop(name)
        process.send_signal(sig)
        process.wait()

    def wait_ready(self, timeout_s: float = 180.0) -> Plan:
        """Block until the cluster can serve; fail at once if one of its processes dies."""

        try:
            return ready_while_alive(self.processes, self.transport, self.cluster, timeout_s,
                                     coordinator=self.with_coordinator)
        except LimeError as exc:
            raise LimeError(f"{exc}\n{self.log_tail()}") from exc

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for name in self.processes:
            path = self.log_dir / f"{name}.log"
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self, timeout_s: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every process, wait, SIGKILL what is left; return the exit codes."""
        return stop_processes(self.processes, timeout_s)

    def __enter__(self) -> ProcessCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
