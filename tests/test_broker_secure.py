"""A secure broker in one command (docs/broker.md): a broker folder made by
``BrokerFolder.init`` or ``lime-mqtt broker init``, run by a real Mosquitto 2.0.

Unit tests check the files (password hashes, the ACL, certificates, modes, refusals);
integration tests start Mosquitto from a folder and show that TLS, passwords and the
ACL hold: anonymous clients, wrong passwords and a foreign CA are refused, every
identity publishes only under its own name and reads only what is addressed to it, a
retained status survives a restart, and an identity added while the broker runs can
connect at once. Folders live under /tmp (0755): the user mosquitto cannot enter pytest's
own tmp folder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from lime_mqtt.broker import BrokerFolder, Member
from lime_mqtt.broker.acl import acl_text
from lime_mqtt.broker.passwords import ITERATIONS, SALT_BYTES, hash_password, parse_password_file, verify_password
from lime_mqtt.broker.pki import load_cert
from lime_mqtt.cli.settings import load_settings
from lime_mqtt.core.errors import ConfigError, PublishRefused, TransportError
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.transport.base import Connection, Message
from lime_mqtt.transport.mosquitto import SecureBroker, free_port, wait_for_port
from lime_mqtt.transport.mqtt import MqttTransport

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A folder in /tmp that the user mosquitto may enter."""
    path = Path(tempfile.mkdtemp(prefix="lime-secure-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _cluster() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _init(base: Path, cluster: str, **options: object) -> BrokerFolder:
    folder = BrokerFolder(base / "broker")
    folder.init(cluster, ["broker.test"], port=free_port(), bind="127.0.0.1", **options)  # type: ignore[arg-type]
    return folder


async def _next(conn: Connection, timeout_s: float = 5.0) -> Message:
    async with asyncio.timeout(timeout_s):
        return await anext(conn.messages())


# -- unit: the files


def test_a_password_hash_is_pbkdf2_sha512_as_mosquitto_writes_it() -> None:
    salt = bytes(range(SALT_BYTES))
    hashed = hash_password("s3cret", salt)
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 101)
    assert hashed == f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(expected).decode()}"
    assert ITERATIONS == 101
    fresh = hash_password("s3cret")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", fresh), fresh
    assert fresh != hash_password("s3cret")  # a new salt each time
    assert verify_password("s3cret", fresh) and not verify_password("s3cret!", fresh)
    assert not verify_password("s3cret", "$6$abc$def")


def test_a_line_from_mosquitto_passwd_verifies_here() -> None:
    """The other way round: Mosquitto's own tool makes a hash our check accepts."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    with public_dir() as base:
        path = base / "pw"
        subprocess.run([tool, "-c", "-b", str(path), "device/pi-1", "from-the-tool"], check=True, capture_output=True)
        entries = parse_password_file(path.read_text())
    assert entries["device/pi-1"].startswith("$7$101$")
    assert verify_password("from-the-tool", entries["device/pi-1"])


def test_the_acl_has_exactly_the_v2_layout() -> None:
    identities = [Identity("planner", "main"), Identity("coordinator", "main"), Identity("device", "pi-1"),
                  Identity("client", "a"), Identity("operator", "admin")]
    text = acl_text("C", identities)
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern write lime/v2/C/%u/#",
        "pattern read lime/v2/C/+/+/to/%u/#",
        "user planner/main",
        "topic read lime/v2/C/device/+/status",
        "topic read lime/v2/C/device/+/telemetry",
        "topic read lime/v2/C/planner/+/plan",
        "topic read lime/v2/C/planner/+/status",
        "user coordinator/main",
        "topic read lime/v2/C/device/+/status",
        "topic read lime/v2/C/device/+/telemetry",
        "topic read lime/v2/C/device/+/weights",
        "topic read lime/v2/C/planner/+/plan",
        "topic read lime/v2/C/planner/+/status",
        "topic read lime/v2/C/coordinator/+/status",
        "topic read lime/v2/C/client/+/requests",
        "user device/pi-1",
        "topic read lime/v2/C/planner/+/plan",
        "topic read lime/v2/C/coordinator/+/control",
        "topic read lime/v2/C/coordinator/+/status",
        "topic read lime/v2/C/device/+/weights",
        "user client/a",
        "topic read lime/v2/C/coordinator/+/status",
        "user operator/admin",
        "topic read lime/v2/C/+/+/status",
        "topic read lime/v2/C/device/+/telemetry",
        "topic read lime/v2/C/coordinator/+/telemetry",
        "topic read lime/v2/C/planner/+/plan",
    ]
    assert "# every identity writes only under its own name, and reads what is addressed to it" in text
    assert text.count("\n# ") >= 5  # a comment before each user block


def test_init_writes_a_complete_folder() -> None:
    cluster = _cluster()
    with public_dir() as base:
        folder = _init(base, cluster, devices=["pi-1"], trusted_devices=["pi-2"], clients=["a"])
        names = {p.name for p in folder.path.iterdir()}
        assert names >= {"ca.crt", "ca.key", "broker.crt", "broker.key", "passwords", "acl", "mosquitto.conf",
                         "data", "identities", "lime-broker.toml", "run"}
        for secret in (folder.ca_key, folder.key_file, folder.password_file, folder.acl_file):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
        files = sorted(folder.identities_dir.iterdir())
        assert [f.name for f in files] == ["client-a.toml", "client-default.toml", "coordinator-main.toml",
                                           "device-pi-1.toml", "device-pi-2.toml", "operator-admin.toml",
                                           "planner-main.toml"]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        device = folder.identity_settings("device", "pi-2")
        assert device["broker"] == f"mqtts://broker.test:{folder.config().port}"
        assert (device["cluster"], device["username"], device["device_id"], device["trusted"]) == \
            (cluster, "device/pi-2", "pi-2", True)
        assert Path(device["ca_file"]).is_absolute() and Path(device["ca_file"]) == folder.ca_file
        assert "device_id" not in folder.identity_settings("planner", "main")
        # Each identity's password verifies against its line in the password file.
        hashes = parse_password_file(folder.password_file.read_text())
        assert set(hashes) == {"planner/main", "coordinator/main", "operator/admin", "client/default", "client/a",
                               "device/pi-1", "device/pi-2"}
        assert verify_password(device["password"], hashes["device/pi-2"])
        assert not verify_password(device["password"], hashes["device/pi-1"])
        config = folder.config()
        assert config.member(Identity("device", "pi-2")) == Member(Identity("device", "pi-2"), trusted=True)
        assert config.member(Identity("device", "pi-1")) == Member(Identity("device", "pi-1"))
        conf = folder.config_file.read_text()
        for line in ("per_listener_settings false", "allow_anonymous false", "set_tcp_nodelay true",
                     f"password_file {folder.password_file}", f"acl_file {folder.acl_file}", "persistence true",
                     f"persistence_location {folder.data_dir}/", f"pid_file {folder.pid_file}",
                     f"listener {config.port} 127.0.0.1", f"cafile {folder.ca_file}", f"keyfile {folder.key_file}",
                     "tls_version tlsv1.2"):
            assert line in conf.splitlines(), line
        assert "allow_anonymous true" not in conf
        assert conf.splitlines().index("per_listener_settings false") < \
            conf.splitlines().index(f"listener {config.port} 127.0.0.1")
        if IS_ROOT:  # what Mosquitto must read or write is its own
            for path in (folder.key_file, folder.password_file, folder.acl_file, folder.data_dir, folder.log_file):
                assert path.stat().st_uid != 0, path
        assert "cluster=" in repr(folder)


def test_the_certificates_are_a_ca_and_a_tls_server_for_every_host() -> None:
    with public_dir() as base:
        folder = BrokerFolder(base / "b")
        folder.init("C", ["broker.plant.local", "10.0.0.5"], port=8883)
        ca, server = load_cert(folder.ca_file), load_cert(folder.cert_file)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.plant.local", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1", "::1"]
    usage = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_refuses_what_cannot_work() -> None:
    with public_dir() as base:
        folder = BrokerFolder(base / "b")
        for bad, match in (
            ({"hosts": ["not a host"]}, "neither an IP address nor a host name"),
            ({"hosts": ["-bad.example"]}, "neither an IP address nor a host name"),
            ({"cluster": "a/b"}, "cluster name"),
            ({"port": 0}, "port"),
            ({"bind": "no such thing"}, "neither"),
            ({"devices": ["pi/1"]}, "device/pi/1"),
            ({"clients": ["has space"]}, "client/has space"),
        ):
            options = {"cluster": "C", "hosts": [], **bad}
            with pytest.raises(ConfigError, match=match):
                folder.init(**options)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="only devices"):
            Member(Identity("planner", "main"), trusted=True)
        assert not folder.initialised
        folder.init("C", [], port=18883)
        first_ca = folder.ca_file.read_bytes()
        with pytest.raises(ConfigError, match="already holds a broker"):
            folder.init("C", [])
        assert folder.ca_file.read_bytes() == first_ca
        folder.init("C", [], force=True)
        assert folder.ca_file.read_bytes() != first_ca
        with pytest.raises(ConfigError, match="already exists"):
            folder.add("planner", "main")
        with pytest.raises(ConfigError, match="not an identity"):
            folder.remove("device", "ghost")
        with pytest.raises(ConfigError, match="role"):
            folder.add("admin", "x")
        with pytest.raises(ConfigError, match="not a broker folder"):
            BrokerFolder(base / "empty").add("device", "x")


def test_add_and_remove_rewrite_passwords_acl_and_identity_files() -> None:
    with public_dir() as base:
        folder = _init(base, "C")
        assert not folder.reload()  # no broker runs from it
        path = folder.add("device", "pi-7", trusted=True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "user device/pi-7" in folder.acl_file.read_text().splitlines()
        hashes = parse_password_file(folder.password_file.read_text())
        assert verify_password(folder.identity_settings("device", "pi-7")["password"], hashes["device/pi-7"])
        assert folder.config().member(Identity("device", "pi-7")) == Member(Identity("device", "pi-7"), True)
        old = folder.identity_settings("device", "pi-7")["password"]
        folder.rotate("device", "pi-7")
        new = folder.identity_settings("device", "pi-7")["password"]
        hashes = parse_password_file(folder.password_file.read_text())
        assert new != old
        assert verify_password(new, hashes["device/pi-7"]) and not verify_password(old, hashes["device/pi-7"])
        folder.remove("device", "pi-7")
        assert "device/pi-7" not in folder.acl_file.read_text()
        assert "device/pi-7" not in parse_password_file(folder.password_file.read_text())
        assert not path.exists()
        assert len(parse_password_file(folder.password_file.read_text())) == 4  # the defaults remain


@pytest.mark.skipif(not IS_ROOT, reason="only root's broker drops to the user mosquitto")
def test_init_as_root_names_the_folder_mosquitto_cannot_enter(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"cannot enter .*/var/lib/lime-mqtt/C") as refused:
        BrokerFolder(closed / "broker").init("C", [])
    blocked = re.search(r"cannot enter (\S+)", str(refused.value))
    assert blocked is not None and not os.stat(blocked.group(1)).st_mode & stat.S_IXOTH
    assert not (closed / "broker").exists()  # nothing written


def test_plaintext_to_another_host_is_refused_unless_insecure() -> None:
    with pytest.raises(ConfigError, match=r"use mqtts://.*insecure"):
        MqttTransport("mqtt://broker.plant.local:1883")
    with pytest.raises(ConfigError, match="mqtts://"):
        MqttTransport("mqtt://10.0.0.5")
    for loopback in ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.5", "mqtt://localhost", "mqtt://[::1]:1883"):
        MqttTransport(loopback)
    assert MqttTransport("mqtt://broker.plant.local", insecure=True).insecure
    MqttTransport("mqtts://broker.plant.local")  # TLS with the system's CAs
    with pytest.raises(ConfigError, match="ca_file"):
        MqttTransport("mqtts://broker.plant.local", ca_file="/no/such/ca.crt")
    with pytest.raises(ConfigError, match="key_file"):
        MqttTransport("mqtts://broker.plant.local", key_file="/etc/hostname")


def test_settings_carry_tls_files_and_a_password_file(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LIME_PASSWORD", "LIME_PASSWORD_FILE", "LIME_CA_FILE", "LIME_INSECURE", "LIME_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    with public_dir() as base:
        folder = _init(base, "C")
        settings = load_settings(str(folder.identity_file("planner", "main")))
        transport = settings.transport()
        assert (transport.username, transport.tls.ca_file) == ("planner/main", str(folder.ca_file))
        (base / "pw").write_text("from-a-file\nignored\n")
        (base / "settings.toml").write_text('broker = "mqtts://localhost:1"\npassword_file = "pw"\n'
                                            'ca_file = "broker/ca.crt"\nusername = "client/default"\n')
        settings = load_settings(str(base / "settings.toml"))
        assert settings.password_file == str(base / "pw")  # relative to the settings file
        assert settings.resolved_password() == "from-a-file"
        assert settings.transport().tls.ca_file == str(base / "broker" / "ca.crt")
        monkeypatch.setenv("LIME_INSECURE", "1")
        assert load_settings(None, broker="mqtt://broker.plant.local").transport().insecure
        monkeypatch.delenv("LIME_INSECURE")
        with pytest.raises(ConfigError, match="mqtts://"):
            load_settings(None, broker="mqtt://broker.plant.local").transport()
        with pytest.raises(ConfigError, match="password_file"):
            load_settings(None, password_file=str(base / "missing")).resolved_password()


# -- integration: a real Mosquitto from a folder


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureBroker]:
    """One secure broker for the tests that only connect and publish."""
    with public_dir() as base:
        folder = _init(base, _cluster(), devices=["pi-1", "pi-2", "pi-3"], clients=["a", "b"])
        with SecureBroker(folder) as running:
            yield running


def _topics(broker: SecureBroker) -> Topics:
    return Topics(broker.folder.config().cluster)


@pytest.mark.integration
async def test_an_anonymous_client_is_refused(secure: SecureBroker) -> None:
    with pytest.raises(TransportError, match="refused the login of an anonymous client"):
        async with MqttTransport(secure.url, ca_file=secure.folder.ca_file).connection():
            pass


@pytest.mark.integration
async def test_a_wrong_password_is_refused_at_once_even_when_reconnecting(secure: SecureBroker) -> None:
    transport = MqttTransport(secure.url, "device/pi-1", "not-the-password", ca_file=secure.folder.ca_file)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TransportError, match=r"refused the login of user 'device/pi-1'.*Not authorized"):
        async with transport.connection(reconnect=True):
            pass
    assert loop.time() - started < 5  # the first connect fails; it does not retry a refused login


@pytest.mark.integration
async def test_a_client_that_trusts_another_ca_is_refused(secure: SecureBroker) -> None:
    with public_dir() as base:
        other = _init(base, "other")
        good = secure.folder.identity_settings("device", "pi-1")
        for ca_file in (other.ca_file, None):  # another private CA; the system's CAs
            transport = MqttTransport(secure.url, good["username"], good["password"], ca_file=ca_file)
            with pytest.raises(TransportError, match=r"TLS handshake .* failed.*certificate verify failed"):
                async with transport.connection():
                    pass


@pytest.mark.integration
async def test_the_broker_name_is_checked_against_its_certificate() -> None:
    """A broker reached by an address its certificate does not name is refused: 127.0.0.2
    is loopback, but the certificate holds only 127.0.0.1 (and localhost, ::1, broker.test)."""
    with public_dir() as base:
        folder = BrokerFolder(base / "b")
        folder.init("C", ["broker.test"], port=free_port(), bind="127.0.0.2")
        with SecureBroker(folder) as broker:
            assert broker.url.startswith("mqtts://127.0.0.2:")
            with pytest.raises(TransportError, match=r"TLS handshake .*127\.0\.0\.2"):
                async with broker.transport("planner", "main").connection():
                    pass


@pytest.mark.integration
async def test_the_right_identity_connects_over_tls(secure: SecureBroker) -> None:
    topics = _topics(secure)
    transport = secure.transport("device", "pi-1")
    assert transport.address.tls and transport.username == "device/pi-1"
    async with transport.connection() as conn, secure.transport("operator", "admin").connection() as operator:
        await operator.subscribe(topics.device_status("pi-1"))
        await conn.publish(topics.device_status("pi-1"), b"online", qos=1)
        message = await _next(operator)
    assert (message.topic, message.payload) == (topics.device_status("pi-1"), b"online")


@pytest.mark.integration
async def test_a_device_publishes_only_under_its_own_name(secure: SecureBroker) -> None:
    """%u with a '/' in it (device/pi-1) is two topic levels in Mosquitto 2.0.11, as the ACL needs."""
    topics = _topics(secure)
    async with secure.transport("device", "pi-1").connection() as conn:
        with pytest.raises(PublishRefused, match="Not authorized"):
            await conn.publish(topics.plan("main"), b"{}", qos=1, retain=True)
        with pytest.raises(PublishRefused):
            await conn.publish(topics.device_status("pi-2"), b"forged", qos=1, retain=True)
        with pytest.raises(PublishRefused):
            await conn.publish(topics.requests("default"), b"{}", qos=1)
        await conn.publish(topics.device_status("pi-1"), b"mine", qos=1)  # accepted: no error


@pytest.mark.integration
async def test_a_device_cannot_send_a_step_in_another_devices_name(secure: SecureBroker) -> None:
    topics = _topics(secure)
    async with secure.transport("device", "pi-1").connection() as pi1, \
            secure.transport("device", "pi-3").connection() as pi3:
        await pi3.subscribe(topics.stage_inbox("pi-3"))
        with pytest.raises(PublishRefused):
            await pi1.publish(topics.stage_in(Identity("device", "pi-2"), "pi-3", 1), b"forged", qos=1)
        await pi1.publish(topics.stage_in(Identity("device", "pi-1"), "pi-3", 1), b"real", qos=1)
        message = await _next(pi3)
    assert (message.topic, message.payload) == (topics.stage_in(Identity("device", "pi-1"), "pi-3", 1), b"real")
    route = topics.parse(message.topic)
    assert route is not None and route.sender == Identity("device", "pi-1")


@pytest.mark.integration
async def test_a_client_reads_only_its_own_answers(secure: SecureBroker) -> None:
    topics = _topics(secure)
    async with secure.transport("client", "a").connection() as a, \
            secure.transport("client", "b").connection() as b, \
            secure.transport("coordinator", "main").connection() as coordinator:
        await a.subscribe(topics.answers_inbox("a"))
        await b.subscribe(topics.answers_inbox("a"), topics.answers_inbox("b"))  # a's inbox: the ACL says no
        await coordinator.publish(topics.answer("main", "a", "r1"), b"for a", qos=1)
        message = await _next(a)
        assert (message.topic, message.payload) == (topics.answer("main", "a", "r1"), b"for a")
        # Then a sentinel to b itself: once it is there, anything for a would have come before it.
        await coordinator.publish(topics.answer("main", "b", "sentinel"), b"for b", qos=1)
        seen_by_b = await _next(b)
    assert (seen_by_b.topic, seen_by_b.payload) == (topics.answer("main", "b", "sentinel"), b"for b")


@pytest.mark.integration
async def test_a_retained_status_survives_a_broker_restart() -> None:
    with public_dir() as base:
        folder = _init(base, _cluster(), devices=["pi-1"])
        topics = Topics(folder.config().cluster)
        with SecureBroker(folder) as broker:
            async with broker.transport("device", "pi-1").connection() as conn:
                await conn.publish(topics.device_status("pi-1"), b"online", qos=1, retain=True)
            broker.restart()
            async with broker.transport("planner", "main").connection() as planner:
                await planner.subscribe(topics.all_device_status)
                message = await _next(planner)
        assert (message.topic, message.payload, message.retain) == (topics.device_status("pi-1"), b"online", True)
        assert (folder.data_dir / "mosquitto.db").is_file()


async def _connects(broker: SecureBroker, role: str, name: str, password: str | None = None) -> bool:
    settings = broker.folder.identity_settings(role, name) if password is None else {}
    transport = MqttTransport(broker.url, f"{role}/{name}", password or settings["password"],
                              ca_file=broker.folder.ca_file)
    try:
        async with transport.connection():
            return True
    except TransportError as exc:
        assert "refused the login" in str(exc), exc
        return False


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Until ``check()`` is true: Mosquitto reloads on SIGHUP soon, not at once."""
    async with asyncio.timeout(timeout_s):
        while True:  # polling another process: there is no event to wait on
            if await check():
                return
            await asyncio.sleep(0.05)


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


@pytest.mark.integration
async def test_identities_added_rotated_and_removed_while_the_broker_runs() -> None:
    with public_dir() as base:
        folder = _init(base, _cluster())
        topics = Topics(folder.config().cluster)
        with SecureBroker(folder) as broker:
            assert folder.running_pid() == broker.process.pid  # type: ignore[union-attr]
            assert not await _connects(broker, "device", "pi-9", "guess")
            folder.add("device", "pi-9")  # SIGHUP, no restart
            await _eventually(lambda: _connects(broker, "device", "pi-9"))
            async with broker.transport("device", "pi-9").connection() as conn:  # and its ACL block is in force
                await conn.publish(topics.device_status("pi-9"), b"online", qos=1)
                with pytest.raises(PublishRefused):
                    await conn.publish(topics.plan("main"), b"{}", qos=1)
            old = folder.identity_settings("device", "pi-9")["password"]
            folder.rotate("device", "pi-9")
            await _eventually(lambda: _connects(broker, "device", "pi-9"))
            assert not await _connects(broker, "device", "pi-9", old)
            current = folder.identity_settings("device", "pi-9")["password"]
            async with broker.transport("device", "pi-9").connection() as live:
                folder.remove("device", "pi-9")

                async def dropped() -> bool:  # Mosquitto checks connected clients again on reload
                    return not live.connected

                await _eventually(dropped)
            await _eventually(lambda: _not(_connects(broker, "device", "pi-9", current)))
            assert broker.process is not None and broker.process.poll() is None  # the same process throughout


@pytest.mark.integration
def test_the_cli_inits_a_folder_and_runs_its_broker() -> None:
    cli = [sys.executable, "-m", "lime_mqtt.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIME_")}
    cluster, port = _cluster(), free_port()
    with public_dir() as base:
        folder = base / "broker"
        init = [*cli, "broker", "init", str(folder), "--cluster", cluster, "--host", "broker.test",
                "--port", str(port), "--bind", "127.0.0.1", "--device", "pi-1", "--client", "a"]
        done = subprocess.run(init, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "device-pi-1.toml" in done.stdout and "client-a.toml" in done.stdout and "ca.crt" in done.stdout
        again = subprocess.run(init, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        assert again.returncode == 2 and "already holds a broker" in again.stderr

        added = subprocess.run([*cli, "broker", "add", str(folder), "device", "pi-2", "--trusted"],
                               capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        assert added.returncode == 0, added.stderr
        identity = folder / "identities" / "device-pi-2.toml"
        assert stat.S_IMODE(identity.stat().st_mode) == 0o600
        assert "trusted = true" in identity.read_text()

        with open(base / "run.log", "wb") as out:
            running = subprocess.Popen([*cli, "broker", "run", str(folder)], stdout=out, stderr=out, cwd=ROOT,
                                       env=env)
        try:
            wait_for_port("127.0.0.1", port, process=running)
            # The identity file is a settings file: the broker URL of a test's port, the rest as written.
            settings = load_settings(str(identity), broker=f"mqtts://localhost:{port}")

            async def echo() -> Message:
                topics = Topics(cluster)
                async with settings.transport().connection() as conn:
                    await conn.subscribe(topics.echo("pi-2"))
                    await conn.publish(topics.echo("pi-2"), b"ping", qos=1)
                    return await _next(conn)

            message = asyncio.run(echo())
            assert (message.topic, message.payload) == (Topics(cluster).echo("pi-2"), b"ping")
        finally:
            running.send_signal(signal.SIGTERM)
            assert running.wait(timeout=10) == 0
        assert "mosquitto for cluster" in (base / "run.log").read_text()
