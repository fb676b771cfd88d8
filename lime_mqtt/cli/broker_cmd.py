"""``lime-mqtt broker``: a secure Mosquitto from a broker folder, or an open one on loopback.

    lime-mqtt broker init DIR [--cluster C] [--host H ...] [--port 8883] [--bind 0.0.0.0]
                              [--device NAME ...] [--trusted-device NAME ...] [--client NAME ...] [--force]
    lime-mqtt broker add DIR ROLE NAME [--trusted]
    lime-mqtt broker rotate DIR ROLE NAME
    lime-mqtt broker remove DIR ROLE NAME
    lime-mqtt broker run DIR
    lime-mqtt broker insecure-loopback [--port 1883] [--data DIR]

docs/broker.md explains the folder and each file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from lime_mqtt.cli.settings import Settings
from lime_mqtt.core.errors import ConfigError
from lime_mqtt.core.topics import ROLES

if TYPE_CHECKING:
    from lime_mqtt.broker.folder import BrokerFolder

Common = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: Any, common: Common) -> None:
    """The ``broker`` command and its actions; ``common`` adds the options every command has."""
    broker = sub.add_parser(
        "broker", help="a secure Mosquitto from a broker folder (init, add, rotate, remove, run), "
        "or an open one on loopback (insecure-loopback)",
        description="A broker folder holds a private CA, the broker's certificate, a password file, an ACL and a "
        "settings file per identity (docs/broker.md).",
    )
    actions = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")

    p = actions.add_parser("init", help="write a new broker folder: CA, certificate, passwords, ACL, identities")
    common(p)
    p.add_argument("folder", help="the broker folder (as root: one the user mosquitto can reach, such as "
                   "/var/lib/lime-mqtt/CLUSTER)")
    p.add_argument("--host", action="append", default=[],
                   help="a host name or IP address the components reach the broker by (repeat it; the first is "
                   "in their settings files; localhost, 127.0.0.1 and ::1 are always in the certificate)")
    p.add_argument("--port", type=int, help="TLS port (default 8883)")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    p.add_argument("--device", action="append", default=[], metavar="NAME", help="a device identity (repeat it)")
    p.add_argument("--trusted-device", action="append", default=[], metavar="NAME",
                   help="a device identity marked trusted (docs/security.md)")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="a client identity besides client/default (repeat it)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a broker folder: a new CA, new passwords, new identity files (data/ is kept)")

    for action, text in (("add", "one more identity (a running broker reloads, no restart)"),
                         ("rotate", "a new password for an identity (a running broker reloads)"),
                         ("remove", "take an identity out (a running broker reloads and drops it)")):
        p = actions.add_parser(action, help=text)
        common(p)
        p.add_argument("folder")
        p.add_argument("role", choices=ROLES)
        p.add_argument("name")
        if action == "add":
            p.add_argument("--trusted", action="store_true", help="a device that may hold the first and last stage")

    p = actions.add_parser("run", help="run Mosquitto in the foreground with the folder's configuration")
    common(p)
    p.add_argument("folder")

    p = actions.add_parser("insecure-loopback",
                           help="an ANONYMOUS, PLAINTEXT Mosquitto on 127.0.0.1 only, for trying things on a laptop")
    common(p)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--data", help="folder for the config, log and persistence (default: a temp folder)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.broker.folder import BrokerFolder  # cryptography: loaded for this command only

    action: str = args.broker_command
    if action == "init":
        return _init(args, settings)
    if action == "insecure-loopback":
        return _insecure_loopback(args)
    folder = BrokerFolder(args.folder)
    if action == "run":
        return _run(folder)
    if action == "add":
        path = folder.add(args.role, args.name, trusted=args.trusted)
        print(f"added {args.role}/{args.name}: its settings file is {path} (mode 0600); give it to that component "
              f"only (--config {path})")
    elif action == "rotate":
        path = folder.rotate(args.role, args.name)
        print(f"new password for {args.role}/{args.name} in {path}; its old one no longer works")
    elif action == "remove":
        folder.remove(args.role, args.name)
        print(f"removed {args.role}/{args.name}")
    return 0


def _init(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.broker.folder import DEFAULT_PORT, BrokerFolder

    folder = BrokerFolder(args.folder)
    folder.init(
        settings.cluster, args.host, port=args.port or DEFAULT_PORT, bind=args.bind, devices=args.device,
        trusted_devices=args.trusted_device, clients=args.client, force=args.force,
    )
    config = folder.config()
    print(f"broker folder {folder.path} for cluster {config.cluster!r}, reached at {config.broker_url}:")
    for path, what in (
        (folder.ca_file, "the private CA: every component trusts it (ca_file)"),
        (folder.ca_key, "the CA's key (0600): keep it here, or offline"),
        (folder.cert_file, "the broker's certificate"),
        (folder.key_file, "the broker's key (0600)"),
        (folder.password_file, "Mosquitto's password file (hashes only)"),
        (folder.acl_file, "the ACL: who may publish and read what"),
        (folder.config_file, "Mosquitto's configuration: one TLS listener on " f"{config.bind}:{config.port}"),
        (folder.data_dir, "persistence: retained status and plans survive a restart"),
    ):
        print(f"  {path.relative_to(folder.path)!s:<18} {what}")
    print("  identities/        one settings file per identity (0600), with its password:")
    for member in config.members:
        path = folder.identity_file(member.identity.role, member.identity.name)
        trusted = " (trusted)" if member.trusted else ""
        print(f"    {path.name:<32} {member.identity}{trusted}")
    print(f"next: lime-mqtt broker run {folder.path}")
    print(f"      and each component with its own file: lime-mqtt planner --config "
          f"{folder.identity_file('planner', 'main')}")
    return 0


def _run(folder: BrokerFolder) -> int:
    """Mosquitto in place of this process: signals (SIGTERM, SIGHUP) go straight to it."""
    from lime_mqtt.transport.mosquitto import mosquitto_binary

    folder.check_runnable()
    pid = folder.running_pid()
    if pid is not None:
        raise ConfigError(f"a mosquitto already runs from {folder.path} (pid {pid})")
    config = folder.config()
    binary = mosquitto_binary()
    print(f"mosquitto for cluster {config.cluster!r}: TLS on {config.bind}:{config.port}, log in {folder.log_file}",
          flush=True)
    sys.stderr.flush()
    os.execv(binary, [binary, "-c", str(folder.config_file)])


def _insecure_loopback(args: argparse.Namespace) -> int:
    """Today's open broker: anonymous and plaintext, but on 127.0.0.1 only."""
    from lime_mqtt.transport.mosquitto import LocalBroker

    broker = LocalBroker(args.port, Path(args.data) if args.data else None, "127.0.0.1").start()
    print(f"INSECURE: anonymous, plaintext mosquitto on {broker.url}, reachable from this machine only "
          f"(config in {broker.folder}). For a network: lime-mqtt broker init (docs/broker.md).", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        assert broker.process is not None
        return broker.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()
