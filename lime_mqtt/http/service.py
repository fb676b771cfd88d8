"""The HTTP bridge as a service: its MQTT sessions, the cluster watch and the web server,
with one lifetime (``lime-mqtt http``; docs/http.md)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterator, Mapping

import uvicorn

from lime_mqtt.client import ClientSession
from lime_mqtt.core.errors import ConfigError
from lime_mqtt.http.app import Sessions, create_app, key_digest
from lime_mqtt.http.metrics import BridgeMetrics
from lime_mqtt.transport import Transport
from lime_mqtt.watch import ClusterWatch

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: stopping is the caller's business
    (the CLI's SIGTERM handler cancels the bridge, which tells the server to exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpBridge:
    """``view``: the connection the dashboard and metrics read the cluster through (an
    operator identity on a secure broker). ``keys``: API key → the transport of the client
    identity its calls go out under. Without keys, every call goes out under ``client``,
    and the bridge may only listen on loopback unless ``allow_open`` says otherwise."""

    def __init__(self, view: Transport, cluster: str, *, host: str = "127.0.0.1", port: int = 8080,
                 client: Transport | None = None, keys: Mapping[str, Transport] | None = None,
                 allow_open: bool = False, timeout_s: float = 300.0) -> None:
        if not keys and client is None:
            raise ConfigError("the bridge needs a client identity to ask as, or API keys that map to some")
        if not keys and not allow_open and not is_loopback(host):
            raise ConfigError(f"listening on {host} without API keys would let anyone on the network ask the "
                              "cluster: give --api-keys, or --allow-open to do it anyway")
        self.view, self.cluster, self.host, self.port = view, cluster, host, port
        self.client, self.keys, self.timeout_s = client, dict(keys or {}), timeout_s
        self.watch = ClusterWatch(view, cluster)
        self.metrics = BridgeMetrics(self.watch)
        self.started = asyncio.Event()  # set once the server listens
        self.server: _Server | None = None

    def __repr__(self) -> str:
        return f"HttpBridge({self.cluster!r}, http://{self.host}:{self.port}, keys={len(self.keys)})"

    @property
    def bound_port(self) -> int | None:
        """The port it listens on (``port`` 0 picks a free one)."""
        if self.server is None or not self.server.servers:
            return None
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.watch)
            by_transport: dict[int, ClientSession] = {}
            digests: dict[str, ClientSession] = {}
            for key, transport in self.keys.items():
                if id(transport) not in by_transport:  # one session per identity, however many keys
                    by_transport[id(transport)] = await stack.enter_async_context(
                        ClientSession(transport, self.cluster, timeout_s=self.timeout_s))
                digests[key_digest(key)] = by_transport[id(transport)]
            open_session = None
            if not self.keys:
                assert self.client is not None
                open_session = await stack.enter_async_context(
                    ClientSession(self.client, self.cluster, timeout_s=self.timeout_s))
            app = create_app(self.watch, Sessions(digests, open_session), self.metrics)
            config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="off",
                                    timeout_graceful_shutdown=2)
            self.server = _Server(config)
            serving = asyncio.create_task(self.server.serve(), name="http-server")  # owned: awaited below
            try:
                while not self.server.started and not serving.done():
                    await asyncio.wait({serving}, timeout=0.05)
                if serving.done():
                    serving.result()  # it failed to start (the port is taken, say): raise why
                    raise ConfigError(f"the HTTP server on {self.host}:{self.port} stopped at once")
                log.info("HTTP bridge for cluster %s on http://%s:%s/ (%s)", self.cluster, self.host,
                         self.bound_port, f"{len(digests)} API keys" if digests else "no API keys")
                self.started.set()
                await serving
            finally:
                self.server.should_exit = True
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
