"""One folder that holds everything a secure broker needs (docs/broker.md).

``BrokerFolder(path).init(...)`` writes a private CA and the broker's certificate, a
password file, an ACL file, a Mosquitto configuration with one TLS listener, a data
folder for persistence, and for every identity a lime-mqtt settings file with its
credentials. ``add``, ``rotate`` and ``remove`` change one identity later and, when a
broker runs from the folder, make it reload its passwords and ACL (SIGHUP), without a
restart. ``lime-broker.toml`` records what the folder is for, so the ACL can be
written again.

Run as root, the folder is made readable to the user ``mosquitto`` where the broker needs
it (Mosquitto drops root and runs as that user), and every folder above it must let that
user through.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import shutil
import signal
import stat
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lime_mqtt.broker import pki
from lime_mqtt.broker.acl import acl_text
from lime_mqtt.broker.passwords import format_password_file, hash_password, new_password, parse_password_file
from lime_mqtt.core.errors import ConfigError
from lime_mqtt.core.topics import Identity, Topics

log = logging.getLogger(__name__)

BROKER_USER = "mosquitto"  # the user Mosquitto drops root to
META_FILE = "lime-broker.toml"
LAYOUT = 1  # of the folder (lime-broker.toml's ``layout``)
DEFAULT_PORT = 8883
DEFAULT_IDENTITIES = (
    Identity("planner", "main"),
    Identity("coordinator", "main"),
    Identity("operator", "admin"),
    Identity("client", "default"),
)
_PROJECT_CONF = Path(__file__).resolve().parents[2] / "broker" / "mosquitto.conf"
# Set by this module in mosquitto.conf; the project's file sets them for an open broker.
_MANAGED = {
    "per_listener_settings", "allow_anonymous", "password_file", "acl_file", "persistence",
    "persistence_location", "pid_file", "log_dest", "listener", "port", "bind_address", "cafile",
    "capath", "certfile", "keyfile", "tls_version", "require_certificate",
}


@dataclass(frozen=True)
class Member:
    """An identity of the folder, and whether it is a trusted device (docs/security.md)."""

    identity: Identity
    trusted: bool = False

    def __post_init__(self) -> None:
        if self.trusted and self.identity.role != "device":
            raise ConfigError(f"{self.identity}: only devices can be marked trusted")


@dataclass(frozen=True)
class FolderConfig:
    """What ``lime-broker.toml`` holds: the cluster, how the broker is reached, who may connect."""

    cluster: str
    hosts: tuple[str, ...]
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    members: tuple[Member, ...] = field(default_factory=tuple)

    @property
    def identities(self) -> list[Identity]:
        return [m.identity for m in self.members]

    def member(self, identity: Identity) -> Member | None:
        return next((m for m in self.members if m.identity == identity), None)

    @property
    def broker_url(self) -> str:
        """The URL components use: the first host given (localhost if none) and the port."""
        host = self.hosts[0] if self.hosts else "localhost"
        return f"mqtts://{f'[{host}]' if ':' in host else host}:{self.port}"

    def to_toml(self) -> str:
        lines = [
            "# A lime-mqtt broker folder (docs/broker.md). `lime-mqtt broker add` and `remove` keep it",
            "# up to date and write the ACL again from it.",
            f"layout = {LAYOUT}",
            f"cluster = {_toml(self.cluster)}",
            f"hosts = {_toml(list(self.hosts))}",
            f"port = {self.port}",
            f"bind = {_toml(self.bind)}",
        ]
        for m in self.members:
            lines += ["", "[[identity]]", f"role = {_toml(m.identity.role)}", f"name = {_toml(m.identity.name)}"]
            if m.identity.role == "device":
                lines.append(f"trusted = {_toml(m.trusted)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, source: Path) -> FolderConfig:
        try:
            data = tomllib.loads(text)
            if data.get("layout") != LAYOUT:
                raise ConfigError(f"{source}: layout {data.get('layout')!r}, this lime-mqtt reads layout {LAYOUT}")
            members = tuple(
                Member(Identity(m["role"], m["name"]), bool(m.get("trusted", False))) for m in data.get("identity", [])
            )
            return cls(str(data["cluster"]), tuple(data["hosts"]), int(data["port"]), str(data["bind"]), members)
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source} is not a lime-mqtt broker folder's description: {exc}") from exc


def _toml(value: str | bool | int | list[str]) -> str:
    """A TOML value: strings as basic strings, with control characters escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    escaped = "".join(
        "\\\\" if c == "\\" else '\\"' if c == '"' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in value
    )
    return f'"{escaped}"'


def _identity(role: str, name: str) -> Identity:
    try:
        return Identity(role, name)  # type: ignore[arg-type]  # checked in Identity
    except ValueError as exc:
        raise ConfigError(f"identity {role}/{name}: {exc}") from exc


def check_port(port: int) -> int:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"port {port!r} must be 1 to 65535")
    return port


def check_bind(bind: str) -> str:
    """An address to listen on: an IP address (0.0.0.0 for every interface) or a host name."""
    checked = pki.check_host(bind)
    return str(checked) if isinstance(checked, ipaddress.IPv4Address | ipaddress.IPv6Address) else checked


class BrokerFolder:
    """A broker folder on disk: its files, and the commands that write them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self.ca_file = self.path / "ca.crt"  # the private CA: what every component trusts
        self.ca_key = self.path / "ca.key"  # 0600; only `init` uses it
        self.cert_file = self.path / "broker.crt"
        self.key_file = self.path / "broker.key"  # 0600, the broker's
        self.password_file = self.path / "passwords"
        self.acl_file = self.path / "acl"
        self.config_file = self.path / "mosquitto.conf"
        self.data_dir = self.path / "data"  # Mosquitto's persistence
        self.run_dir = self.path / "run"
        self.pid_file = self.run_dir / "mosquitto.pid"
        self.log_file = self.path / "mosquitto.log"
        self.meta_file = self.path / META_FILE
        self.identities_dir = self.path / "identities"  # one settings file per identity, 0600

    def __repr__(self) -> str:
        if not self.initialised:
            return f"BrokerFolder({str(self.path)!r}, not initialised)"
        config = self.config()
        return f"BrokerFolder({str(self.path)!r}, cluster={config.cluster!r}, port={config.port}, " \
               f"identities={len(config.members)})"

    def identity_file(self, role: str, name: str) -> Path:
        return self.identities_dir / f"{_identity(role, name).role}-{name}.toml"

    @property
    def initialised(self) -> bool:
        return self.meta_file.is_file()

    def config(self) -> FolderConfig:
        if not self.initialised:
            raise ConfigError(f"{self.path} is not a broker folder (no {META_FILE}): run `lime-mqtt broker init` first")
        return FolderConfig.from_toml(self.meta_file.read_text(), self.meta_file)

    def identity_settings(self, role: str, name: str) -> dict[str, Any]:
        """The settings file of one identity, as a dict (broker, cluster, username, password, ca_file, ...)."""
        path = self.identity_file(role, name)
        try:
            return tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{role}/{name} has no identity file in {self.path} (lime-mqtt broker add)") from None

    # -- commands
    def init(
        self,
        cluster: str,
        hosts: Sequence[str] = (),
        port: int = DEFAULT_PORT,
        bind: str = "0.0.0.0",
        identities: Iterable[Identity | Member] | None = None,
        *,
        devices: Iterable[str] = (),
        trusted_devices: Iterable[str] = (),
        clients: Iterable[str] = (),
        force: bool = False,
    ) -> list[Path]:
        """Write a new broker folder; return the files written.

        ``identities`` default to planner/main, coordinator/main, operator/admin and
        client/default; ``devices``, ``trusted_devices`` and ``clients`` (names) add to them.
        A folder that already holds a broker is refused unless ``force``: then everything
        is new (CA, certificate, passwords, identity files), only ``data/`` is kept."""
        try:
            Topics(cluster)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        names = pki.broker_hosts(hosts)  # checks every host
        members = _members(identities, devices, trusted_devices, clients)
        config = FolderConfig(cluster, tuple(str(pki.check_host(h)) for h in hosts), check_port(port),
                              check_bind(bind), members)
        self._refuse_to_overwrite(force)
        if any(c.isspace() or c == "#" for c in str(self.path)):
            raise ConfigError(f"{self.path}: Mosquitto's configuration cannot name a folder with spaces or '#'")
        owner = _broker_owner()
        if owner is not None:
            _check_reachable(self.path, owner, cluster)

        log.info("initialising broker folder %s for cluster %r", self.path, cluster)
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o755)
        if owner is not None:
            _check_reachable(self.path, owner, cluster)
        shutil.rmtree(self.identities_dir, ignore_errors=True)  # old credentials are worthless now
        for folder in (self.data_dir, self.run_dir, self.identities_dir):
            folder.mkdir(exist_ok=True)
            folder.chmod(0o700)

        pki.make_pki(self.path, cluster, config.hosts)
        log.info("wrote %s (the private CA; its key %s stays here, mode 0600)", self.ca_file, self.ca_key.name)
        log.info("wrote %s for %s", self.cert_file, ", ".join(names.all))

        passwords = {m.identity.username: new_password() for m in members}
        _write_private(self.password_file, format_password_file(
            {user: hash_password(pw) for user, pw in passwords.items()}), owner)
        log.info("wrote %s (%d identities)", self.password_file, len(members))
        self._write_meta(config)
        self._write_acl(config, owner)
        self.config_file.write_text(mosquitto_conf(self, config))
        self.config_file.chmod(0o644)
        log.info("wrote %s (TLS listener on %s:%d)", self.config_file, config.bind, config.port)
        self.log_file.touch()
        self.log_file.chmod(0o640)
        written = [self.ca_file, self.ca_key, self.cert_file, self.key_file, self.password_file, self.acl_file,
                   self.config_file, self.meta_file, self.data_dir]
        for m in members:
            written.append(self._write_identity(config, m, passwords[m.identity.username]))
        if owner is not None:
            for path in (self.key_file, self.data_dir, self.run_dir, self.log_file):
                os.chown(path, *owner)
            log.info("gave %s, %s, %s and %s to user %s (Mosquitto runs as it)", self.key_file.name,
                     self.data_dir.name, self.run_dir.name, self.log_file.name, BROKER_USER)
        return written

    def add(self, role: str, name: str, trusted: bool = False) -> Path:
        """One more identity: a password, an ACL block and its identity file; the running
        broker, if any, reloads. Returns the identity file."""
        config = self.config()
        member = Member(_identity(role, name), trusted)
        if config.member(member.identity) is not None:
            raise ConfigError(f"{member.identity} already exists in {self.path}: `lime-mqtt broker rotate` gives it "
                              "a new password; `remove` takes it out")
        config = replace(config, members=(*config.members, member))
        owner = _broker_owner()
        password = new_password()
        self._set_password(member.identity, hash_password(password), owner)
        self._write_meta(config)
        self._write_acl(config, owner)
        path = self._write_identity(config, member, password)
        log.info("added %s", member.identity)
        self.reload()
        return path

    def rotate(self, role: str, name: str) -> Path:
        """A new password for an identity (its old one stops working once the broker
        reloads); returns its identity file, written again."""
        config = self.config()
        member = config.member(_identity(role, name))
        if member is None:
            raise ConfigError(f"{role}/{name} is not an identity of {self.path}")
        password = new_password()
        self._set_password(member.identity, hash_password(password), _broker_owner())
        path = self._write_identity(config, member, password)
        log.info("new password for %s", member.identity)
        self.reload()
        return path

    def remove(self, role: str, name: str) -> None:
        """Take an identity out: its password, its ACL block and its identity file; the
        running broker, if any, reloads (and drops it)."""
        config = self.config()
        identity = _identity(role, name)
        if config.member(identity) is None:
            raise ConfigError(f"{identity} is not an identity of {self.path}")
        config = replace(config, members=tuple(m for m in config.members if m.identity != identity))
        owner = _broker_owner()
        self._set_password(identity, None, owner)
        self._write_meta(config)
        self._write_acl(config, owner)
        self.identity_file(role, name).unlink(missing_ok=True)
        log.info("removed %s", identity)
        self.reload()

    def reload(self) -> bool:
        """SIGHUP to the Mosquitto that runs from this folder (its pid file): it reads its
        password file and ACL again. False when none runs."""
        pid = self.running_pid()
        if pid is None:
            log.info("no broker runs from %s: the change takes effect when it starts", self.path)
            return False
        os.kill(pid, signal.SIGHUP)
        log.info("sent SIGHUP to mosquitto (pid %d): it reloads passwords and ACL", pid)
        return True

    def running_pid(self) -> int | None:
        """The pid of the Mosquitto that runs from this folder, or None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = None
        if comm is not None and not comm.startswith("mosquitto"):
            return None  # a stale pid file; the number now belongs to another process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # it exists; someone else's
        return pid

    def check_runnable(self) -> None:
        """Before starting Mosquitto on this folder: it is initialised and, as root, the
        user mosquitto can reach it."""
        config = self.config()
        owner = _broker_owner()
        if owner is not None:
            _check_reachable(self.path, owner, config.cluster)

    # -- writing
    def _refuse_to_overwrite(self, force: bool) -> None:
        if force:
            return
        if self.initialised:
            raise ConfigError(
                f"{self.path} already holds a broker (cluster {self.config().cluster!r}); --force makes everything "
                "new (CA, passwords, identity files), and every component then needs its new identity file"
            )
        ours = [p.name for p in (self.ca_file, self.ca_key, self.password_file, self.acl_file, self.config_file)
                if p.exists()]
        if ours:
            raise ConfigError(f"{self.path} already has {', '.join(ours)}; use an empty folder or --force")

    def _write_meta(self, config: FolderConfig) -> None:
        self.meta_file.write_text(config.to_toml())
        self.meta_file.chmod(0o644)

    def _write_acl(self, config: FolderConfig, owner: tuple[int, int] | None) -> None:
        _write_private(self.acl_file, acl_text(config.cluster, config.identities), owner)
        log.info("wrote %s (%d user blocks)", self.acl_file, len(config.members))

    def _set_password(self, identity: Identity, hashed: str | None, owner: tuple[int, int] | None) -> None:
        entries = parse_password_file(self.password_file.read_text()) if self.password_file.exists() else {}
        entries.pop(identity.username, None)
        if hashed is not None:
            entries[identity.username] = hashed
        _write_private(self.password_file, format_password_file(entries), owner)

    def _write_identity(self, config: FolderConfig, member: Member, password: str) -> Path:
        identity = member.identity
        path = self.identity_file(identity.role, identity.name)
        lines = [
            f"# lime-mqtt settings for {identity} of cluster {config.cluster!r} (docs/broker.md).",
            "# It holds a password: keep it mode 0600, give it only to that component (--config FILE).",
            f"broker = {_toml(config.broker_url)}",
            f"cluster = {_toml(config.cluster)}",
            f"username = {_toml(identity.username)}",
            f"password = {_toml(password)}",
            f"ca_file = {_toml(str(self.ca_file))}",
        ]
        if identity.role == "device":
            lines.append(f"device_id = {_toml(identity.name)}")
            if member.trusted:
                lines.append("trusted = true")
        _write_private(path, "\n".join(lines) + "\n", None)
        log.info("wrote %s (mode 0600)", path)
        return path


def _members(
    identities: Iterable[Identity | Member] | None, devices: Iterable[str], trusted_devices: Iterable[str],
    clients: Iterable[str],
) -> tuple[Member, ...]:
    chosen = DEFAULT_IDENTITIES if identities is None else identities
    given = [m if isinstance(m, Member) else Member(m) for m in chosen]
    given += [Member(_identity("device", name)) for name in devices]
    given += [Member(_identity("device", name), trusted=True) for name in trusted_devices]
    given += [Member(_identity("client", name)) for name in clients]
    members: dict[Identity, Member] = {}
    for m in given:
        if m.identity in members and members[m.identity] != m:
            raise ConfigError(f"{m.identity} is given twice, once trusted and once not")
        members[m.identity] = m
    return tuple(members.values())


def _write_private(path: Path, text: str, owner: tuple[int, int] | None) -> None:
    pki.write_private(path, text.encode(), owner)


def _broker_owner() -> tuple[int, int] | None:
    """uid and gid Mosquitto runs as when started by root; None when not root (it runs as us)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(BROKER_USER)
    except KeyError:
        log.warning("there is no user %r: Mosquitto started as root will not find its files readable", BROKER_USER)
        return None
    return user.pw_uid, user.pw_gid


def _check_reachable(folder: Path, owner: tuple[int, int], cluster: str) -> None:
    """ConfigError naming the first folder on the way to ``folder`` (itself included, if it
    exists) that user mosquitto may not enter."""
    uid, gid = owner
    groups = set(os.getgrouplist(BROKER_USER, gid))
    resolved = folder.resolve()
    for path in [*reversed(resolved.parents), resolved]:
        try:
            st = path.stat()
        except FileNotFoundError:
            break  # made by init, mode 0755
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise ConfigError(
                f"Mosquitto drops root and runs as user {BROKER_USER!r}, which cannot enter {path} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}), so it could not read its files in {folder} nor keep its "
                f"data there. Use a folder it can reach, such as /var/lib/lime-mqtt/{cluster}, or let it "
                f"through (chmod o+x {path})."
            )


def mosquitto_conf(folder: BrokerFolder, config: FolderConfig) -> str:
    """The broker's configuration: the project's settings (broker/mosquitto.conf) without
    its open-broker lines, then authentication, ACL, persistence and one TLS listener."""
    if not _PROJECT_CONF.is_file():
        raise ConfigError(f"{_PROJECT_CONF} is missing: run lime-mqtt from a checkout (pip install -e .)")
    project = [line.strip() for line in _PROJECT_CONF.read_text().splitlines()]
    kept = [line for line in project if line and not line.startswith("#") and line.split()[0] not in _MANAGED]
    return "\n".join([
        f"# Mosquitto configuration for lime-mqtt cluster {config.cluster!r} (docs/broker.md),",
        "# written by `lime-mqtt broker init`. Run it with `lime-mqtt broker run FOLDER`.",
        "",
        "# First, before any listener: one set of security settings for every listener.",
        "per_listener_settings false",
        "",
        "# The project's settings, from broker/mosquitto.conf (set_tcp_nodelay: no Nagle delay per hop).",
        *kept,
        "",
        "# Nobody connects without a user name and password; the ACL says what each identity may do.",
        "allow_anonymous false",
        f"password_file {folder.password_file}",
        f"acl_file {folder.acl_file}",
        "",
        "# Retained status and plans, and clients' sessions, survive a restart.",
        "persistence true",
        f"persistence_location {folder.data_dir}/",
        "",
        "# `lime-mqtt broker add/rotate/remove` send SIGHUP to this pid: passwords and ACL reload.",
        f"pid_file {folder.pid_file}",
        "",
        f"log_dest file {folder.log_file}",
        "log_dest stdout",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
        "# The one listener: TLS 1.2 or later, with the broker's certificate from the private CA.",
        f"listener {config.port} {config.bind}",
        f"cafile {folder.ca_file}",
        f"certfile {folder.cert_file}",
        f"keyfile {folder.key_file}",
        "tls_version tlsv1.2",
        "",
    ])
