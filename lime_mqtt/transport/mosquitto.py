"""Start a local Mosquitto: an open one on loopback with the project's configuration
(``broker/mosquitto.conf``, :class:`LocalBroker`), or a secure one from a broker folder
(``lime-mqtt broker init``, :class:`SecureBroker`)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

from lime_mqtt.core.errors import ConfigError, TransportError

if TYPE_CHECKING:
    from lime_mqtt.broker.folder import BrokerFolder
    from lime_mqtt.transport.mqtt import MqttTransport

log = logging.getLogger(__name__)

_PACKAGED_CONF = Path(__file__).resolve().parents[2] / "broker" / "mosquitto.conf"


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("mosquitto is not installed (apt-get install mosquitto; `make` does this)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path, port: int, bind: str = "127.0.0.1", extra: str = "") -> Path:
    """A config for one broker: the project's settings plus a listener and a data folder,
    then ``extra`` lines (an ACL file, say)."""
    if not _PACKAGED_CONF.is_file():
        raise ConfigError(f"{_PACKAGED_CONF} is missing: run lime-mqtt from a checkout (pip install -e .)")
    base = _PACKAGED_CONF.read_text()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    # Mosquitto drops root privileges to the user 'mosquitto': let it read and write here.
    for path in (folder, data):
        path.chmod(0o777)
    if os.geteuid() == 0 and not _reachable_by_others(data):
        log.warning("Mosquitto drops root and runs as 'mosquitto', which cannot reach %s (a parent folder is not "
                    "o+x): it cannot save retained messages there, so they will not survive a restart", data)
    conf = folder / "mosquitto.conf"
    conf.write_text(f"{base}\nlistener {port} {bind}\npersistence_location {data}/\n{extra}")
    conf.chmod(0o644)
    return conf


def _reachable_by_others(path: Path) -> bool:
    """Whether every folder above ``path`` lets other users through (the x bit for others)."""
    return all(parent.stat().st_mode & 0o001 for parent in path.resolve().parents)


def wait_for_port(
    host: str, port: int, timeout_s: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TransportError(f"mosquitto exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TransportError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


class _MosquittoProcess:
    """A Mosquitto child process that can be stopped and started again (the brokers below)."""

    process: subprocess.Popen[bytes] | None

    def start(self) -> Self:
        raise NotImplementedError

    def _terminate(self) -> None:
        """SIGTERM: Mosquitto writes its persistence file (retained messages, sessions) and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the broker, stay down ``down_s`` seconds, start it again on the same port
        with what it persisted."""
        self._terminate()
        time.sleep(down_s)
        self.start()


class LocalBroker(_MosquittoProcess):
    """A Mosquitto child process on a loopback port; a context manager that stops it."""

    def __init__(
        self, port: int | None = None, folder: Path | None = None, bind: str = "127.0.0.1", extra_config: str = "",
    ) -> None:
        self.port = port or free_port()
        self.bind = bind
        self.extra_config = extra_config  # lines after the project's configuration
        self._own_folder = folder is None
        self.folder = folder or Path(tempfile.mkdtemp(prefix="lime-broker-"))
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        running = self.process is not None and self.process.poll() is None
        return f"LocalBroker(port={self.port}, running={running})"

    @property
    def url(self) -> str:
        return f"mqtt://{self.bind}:{self.port}"

    def transport(self) -> MqttTransport:
        """The transport that reaches this broker (anonymous, as it is configured)."""
        from lime_mqtt.transport.mqtt import MqttTransport

        return MqttTransport(self.url)

    def start(self) -> LocalBroker:
        conf = write_config(self.folder, self.port, self.bind, self.extra_config)
        log_file = (self.folder / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log_file, stderr=log_file)
        wait_for_port(self.bind, self.port, process=self.process)
        log.info("mosquitto listening on %s", self.url)
        return self


    def stop(self) -> None:
        self._terminate()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def identity_transport(folder: BrokerFolder, role: str, name: str, broker: str | None = None) -> MqttTransport:
    """The transport of one identity of a broker folder, from its identity file: its user
    name, password and CA; ``broker`` instead of the file's URL if given (a test's port)."""
    from lime_mqtt.transport.mqtt import MqttTransport

    settings = folder.identity_settings(role, name)
    return MqttTransport(broker or settings["broker"], settings["username"], settings["password"],
                         ca_file=settings["ca_file"])


class SecureBroker(_MosquittoProcess):
    """Mosquitto run from a broker folder: TLS, passwords, ACL and persistence as the
    folder's ``mosquitto.conf`` says; a context manager that stops it.

    It listens where the folder says (``init(port=...)``: a test gives a free port there).
    Clients on this machine reach it at :attr:`url`, on ``host`` (by default the bind
    address, or 127.0.0.1 for every interface), which the certificate names."""

    def __init__(self, folder: BrokerFolder | str | Path, host: str | None = None) -> None:
        from lime_mqtt.broker.folder import BrokerFolder  # cryptography, for secure brokers only

        self.folder = folder if isinstance(folder, BrokerFolder) else BrokerFolder(folder)
        config = self.folder.config()
        self.port = config.port
        self.host = host or {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.bind, config.bind)
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        running = self.process is not None and self.process.poll() is None
        return f"SecureBroker({str(self.folder.path)!r}, port={self.port}, running={running})"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtts://{host}:{self.port}"

    def transport(self, role: str, name: str) -> MqttTransport:
        """The transport of identity ``role/name`` (its identity file) to this broker."""
        return identity_transport(self.folder, role, name, self.url)

    def start(self) -> SecureBroker:
        self.folder.check_runnable()
        pid = self.folder.running_pid()
        if pid is not None:
            raise TransportError(f"a mosquitto already runs from {self.folder.path} (pid {pid})")
        console = (self.folder.run_dir / "console.log").open("ab")
        try:
            self.process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.folder.config_file)], stdout=console, stderr=console
            )
        finally:
            console.close()
        try:
            wait_for_port(self.host, self.port, process=self.process)
        except TransportError as exc:
            self._terminate()
            raise TransportError(f"{exc}; see {self.folder.log_file} and {self.folder.run_dir / 'console.log'}: "
                                 f"{self._console_tail()}") from None
        log.info("mosquitto listening on %s (folder %s)", self.url, self.folder.path)
        return self

    def _console_tail(self) -> str:
        try:
            lines = (self.folder.run_dir / "console.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " / ".join(lines[-3:])

    def reload(self) -> bool:
        """SIGHUP: Mosquitto reads the password file and ACL again (``BrokerFolder.add`` does this)."""
        return self.folder.reload()


    def stop(self) -> None:
        self._terminate()

    def __enter__(self) -> SecureBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
