"""The shaped-network rig (``lime-mqtt rig``, docs/operations.md#a-shaped-network-rig).

One machine, the topology of a plant: Mosquitto, the planner and the coordinator in the
machine's own network namespace, and each device agent in a namespace of its own, joined
to it by a veth link:

    device namespace  lrig-{name}-{i}  10.213.{i}.2  ──veth──  10.213.{i}.1  delay proxy ─▶ broker (127.0.0.1)

- **Bandwidth:** a tbf qdisc on each end of the link: the device end limits what the
  device sends (its upload), the host end what it receives (its download). Links can be
  asymmetric and can change while the rig runs (:meth:`Rig.shape`).
- **Round trip:** this kernel has no ``tc netem``, so latency comes from a TCP proxy on
  the host end of each link (lime_mqtt/cli/delay_proxy.py) that forwards every byte half
  the added round trip late, each way; it too can change while running.

Everything it makes is named after the rig (namespaces ``lrig-{name}-*``, links
``lr{name}{i}h``/``d``) and goes in :meth:`Rig.down`, which checks that nothing is left.
Root only (``ip netns`` and ``tc``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lime_mqtt.core.errors import ConfigError, LimeError
from lime_mqtt.core.plan import Plan
from lime_mqtt.transport.mosquitto import LocalBroker, free_port, wait_for_port

log = logging.getLogger(__name__)

SUBNET = "10.213"  # 10.213.{i}.0/30 per device link
STATE_DIR = Path("/run/lime-mqtt")  # a running rig's pids and namespaces, for `lime-mqtt rig down`


@dataclass
class Link:
    """One device's link to the broker: Mbit/s each way, and the added round trip."""

    up_mbit: float = 1000.0  # what the device sends
    down_mbit: float = 1000.0  # what it receives
    rtt_ms: float = 0.0


@dataclass
class RigDevice:
    device_id: str
    memory_mb: int
    link: Link = field(default_factory=Link)
    threads: int | None = 1
    extra_args: tuple[str, ...] = ()


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise LimeError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")
    return result


def _tbf(dev: str, mbit: float, namespace: str | None = None, change: bool = False) -> None:
    """A token bucket of ``mbit`` on ``dev``'s egress. Its burst is 1 ms of the rate (at
    least 4 KB, a few full frames): a bigger bucket would let a short message (a prompt's
    activations) pass at the speed of the host, not of the link, which a radio link does
    not do. (It was 10 ms, at least 16 KB, until the bandwidth benchmark showed 20 Mbit/s
    links costing a 37 KB message almost nothing.)"""
    burst = max(4 * 1024, int(mbit * 1e6 / 8 / 1000))
    prefix = ("ip", "netns", "exec", namespace) if namespace else ()
    _run(*prefix, "tc", "qdisc", "change" if change else "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
         "burst", str(burst), "latency", "100ms")


class Rig:
    """The rig as a context manager: :meth:`up` on entry, :meth:`down` on exit."""

    def __init__(self, name: str, model: str, devices: list[RigDevice], *, cluster: str | None = None,
                 log_dir: Path | None = None, planner_args: tuple[str, ...] = (),
                 coordinator_args: tuple[str, ...] = ()) -> None:
        if not name.isalnum() or len(name) > 6:
            raise ConfigError(f"rig name {name!r}: 1 to 6 letters or digits (it goes into link names)")
        if not 1 <= len(devices) <= 200:
            raise ConfigError("a rig has 1 to 200 devices")
        if os.geteuid() != 0:
            raise ConfigError("the rig needs root: it makes network namespaces and qdiscs")
        self.name, self.model, self.devices = name, model, devices
        self.cluster = cluster or f"rig-{name}"
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"lime-rig-{name}-"))
        self.planner_args = planner_args
        self.coordinator_args = coordinator_args
        self.broker = LocalBroker()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.delay_files: dict[str, Path] = {}
        self.plan: Plan | None = None  # the first ready plan

    def __repr__(self) -> str:
        return f"Rig({self.name!r}, devices={len(self.devices)}, alive={sorted(self._alive())})"

    def namespace(self, i: int) -> str:
        return f"lrig-{self.name}-{i}"

    def _links(self, i: int) -> tuple[str, str]:
        return f"lr{self.name}{i}h", f"lr{self.name}{i}d"

    def _alive(self) -> list[str]:
        return [n for n, p in self.processes.items() if p.poll() is None]

    # ----- up ---------------------------------------------------------------------------------

    def up(self, timeout_s: float = 180.0) -> Plan:
        """Make the network, start everything, wait for a ready plan; it."""
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.broker.start()
            for i, device in enumerate(self.devices):
                self._make_link(i, device.link)
            self._spawn("planner", None, "planner", "--quorum", str(len(self.devices)), "--settle", "0.5",
                        *self.planner_args)
            self._spawn("coordinator", None, "coordinator", *self.coordinator_args)
            for i, device in enumerate(self.devices):
                self._start_device(i, device)
            self._save_state()
            self.plan = self._wait_ready(timeout_s)
            return self.plan
        except BaseException:
            self.down()
            raise

    def _state_file(self) -> Path:
        return STATE_DIR / f"rig-{self.name}.json"

    def _save_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        pids = [p.pid for p in self.processes.values()]
        if self.broker.process is not None:
            pids.append(self.broker.process.pid)
        self._state_file().write_text(json.dumps({"name": self.name, "pids": pids, "devices": len(self.devices)}))

    def _make_link(self, i: int, link: Link) -> None:
        ns, (host, dev) = self.namespace(i), self._links(i)
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host, "type", "veth", "peer", "name", dev)
        _run("ip", "link", "set", dev, "netns", ns)
        _run("ip", "addr", "add", f"{SUBNET}.{i}.1/30", "dev", host)
        _run("ip", "link", "set", host, "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{i}.2/30", "dev", dev)
        _run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _tbf(host, link.down_mbit)
        _tbf(dev, link.up_mbit, ns)
        # The device reaches the broker through its link's delaying proxy.
        port = free_port()
        delay_file = self.log_dir / f"delay-{i}"
        delay_file.write_text(str(link.rtt_ms / 2))
        self.delay_files[self.devices[i].device_id] = delay_file
        self._spawn(f"proxy-{i}", None, module="lime_mqtt.cli.delay_proxy", args=(
            "--listen", f"{SUBNET}.{i}.1:{port}", "--to", f"127.0.0.1:{self.broker.port}",
            "--delay-ms", str(link.rtt_ms / 2), "--delay-file", str(delay_file)))
        wait_for_port(f"{SUBNET}.{i}.1", port, process=self.processes[f"proxy-{i}"])
        self.devices[i].extra_args = (*self.devices[i].extra_args, "--broker", f"mqtt://{SUBNET}.{i}.1:{port}")

    def _start_device(self, i: int, device: RigDevice) -> None:
        args = ["device", "--device-id", device.device_id, "--memory-mb", str(device.memory_mb), "--insecure"]
        if device.threads:
            args += ["--threads", str(device.threads)]
        self._spawn(device.device_id, self.namespace(i), *args, *device.extra_args)

    def _spawn(self, name: str, namespace: str | None, *command: str, module: str = "lime_mqtt.cli",
               args: tuple[str, ...] = ()) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("ab")
        line = [sys.executable, "-m", module, *command, *args]
        if module == "lime_mqtt.cli":
            # A device has its own --broker already: the proxy at its end of its link.
            line += [] if "--broker" in command else ["--broker", self.broker.url]
            line += ["--cluster", self.cluster, "--model", self.model]
        if namespace is not None:
            line = ["ip", "netns", "exec", namespace, *line]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.processes[name] = subprocess.Popen(line, stdout=out, stderr=subprocess.STDOUT, env=env)

    def restart_coordinator(self, *args: str) -> None:
        """Stop the coordinator (SIGTERM: it clears its status) and start it again with the
        options ``args``: a benchmark compares coordinator settings on one rig. Clients
        should wait for its status (``ask(..., wait_for_coordinator_s=...)``)."""
        from lime_mqtt.cli.cluster import stop_processes

        stop_processes({"coordinator": self.processes.pop("coordinator")}, 15.0)
        self.coordinator_args = args
        self._spawn("coordinator", None, "coordinator", *args)
        self._save_state()  # `rig down` must find the new process

    def _wait_ready(self, timeout_s: float) -> Plan:
        from lime_mqtt.cli.cluster import ready_while_alive

        # Any ready plan: with slow links the planner may well use fewer devices than the rig has.
        try:
            return ready_while_alive(self.processes, self.broker.url, self.cluster, timeout_s)
        except LimeError as exc:
            raise LimeError(f"{exc}; logs in {self.log_dir}") from exc

    # ----- while it runs ----------------------------------------------------------------------

    def shape(self, device_id: str, link: Link) -> None:
        """Change one device's link while the rig runs (Wi-Fi that degrades, say)."""
        i = next(n for n, d in enumerate(self.devices) if d.device_id == device_id)
        host, dev = self._links(i)
        _tbf(host, link.down_mbit, change=True)
        _tbf(dev, link.up_mbit, self.namespace(i), change=True)
        self.delay_files[device_id].write_text(str(link.rtt_ms / 2))
        self.processes[f"proxy-{i}"].send_signal(signal.SIGUSR1)
        self.devices[i].link = link

    # ----- down -------------------------------------------------------------------------------

    def down(self, timeout_s: float = 15.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL), delete every namespace (and with it
        its veth pair) and the broker; :class:`LimeError` if anything is left."""
        from lime_mqtt.cli.cluster import stop_processes

        stop_processes(self.processes, timeout_s)
        for i in range(len(self.devices)):
            _run("ip", "netns", "delete", self.namespace(i), check=False)
            _run("ip", "link", "delete", self._links(i)[0], check=False)  # gone with the namespace, normally
        self.broker.stop()
        self._state_file().unlink(missing_ok=True)
        left = self.leftovers()
        if left:
            raise LimeError(f"the rig left {left} behind")

    def leftovers(self) -> dict[str, list[str]]:
        """What of this rig still exists: namespaces, links, processes."""
        namespaces = [n.split()[0] for n in _run("ip", "netns", "list").stdout.splitlines()
                      if n.startswith(f"lrig-{self.name}-")]
        links = [line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link").stdout.splitlines()
                 if f" lr{self.name}" in line]
        alive = self._alive()
        return {k: v for k, v in (("namespaces", namespaces), ("links", links), ("processes", alive)) if v}

    def __enter__(self) -> Rig:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def describe(self) -> str:
        return json.dumps({"cluster": self.cluster, "broker": self.broker.url, "logs": str(self.log_dir),
                           "devices": [asdict(d) for d in self.devices]}, indent=2)


def down_by_name(name: str) -> list[str]:
    """``lime-mqtt rig down NAME``: remove what a rig left (its ``up`` killed, say): its
    processes, namespaces and links. What it removed."""
    removed: list[str] = []
    state_file = STATE_DIR / f"rig-{name}.json"
    if state_file.is_file():
        for pid in json.loads(state_file.read_text()).get("pids", []):
            try:
                os.kill(int(pid), signal.SIGKILL)
                removed.append(f"process {pid}")
            except ProcessLookupError:
                pass
        state_file.unlink()
    for line in _run("ip", "netns", "list").stdout.splitlines():
        namespace = line.split()[0] if line.strip() else ""
        if namespace.startswith(f"lrig-{name}-"):
            for pid in _run("ip", "netns", "pids", namespace, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "delete", namespace, check=False)
            removed.append(f"namespace {namespace}")
    for line in _run("ip", "-o", "link").stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if link.startswith(f"lr{name}") and link.endswith("h"):
            _run("ip", "link", "delete", link, check=False)
            removed.append(f"link {link}")
    return removed
