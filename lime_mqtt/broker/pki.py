"""A private certificate authority and the broker's TLS server certificate.

Made with the ``cryptography`` library: ECDSA P-256 keys, SHA-256 signatures. The CA
signs only the broker's certificate; clients trust the CA (``ca_file``) and check the
broker's name against the certificate's subject alternative names, which hold every host
name and IP address the broker is reached by (always ``localhost``, ``127.0.0.1`` and
``::1``). Keys are written mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lime_mqtt.core.errors import ConfigError

CA_DAYS = 3650  # ten years
SERVER_DAYS = 3650  # as long as the CA: a private CA, renewed with `lime-mqtt broker init --force`
CLOCK_SKEW = dt.timedelta(minutes=5)  # valid a little before now: a device whose clock is behind
ALWAYS_HOSTS = ("localhost", "127.0.0.1", "::1")

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Hosts:
    """The names a broker is reached by, split as a certificate holds them."""

    dns: tuple[str, ...]
    ips: tuple[IpAddress, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return self.dns + tuple(str(ip) for ip in self.ips)


def check_host(host: str) -> str | IpAddress:
    """A host name (RFC 1123 labels) or an IP address; ConfigError for anything else."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    name = host.rstrip(".").lower()
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(
            f"host {host!r} is neither an IP address nor a host name (letters, digits and '-' between dots)"
        )
    return name


def broker_hosts(hosts: Iterable[str]) -> Hosts:
    """The given hosts, checked and without repeats, then localhost, 127.0.0.1 and ::1."""
    dns: list[str] = []
    ips: list[IpAddress] = []
    for host in [*hosts, *ALWAYS_HOSTS]:
        checked = check_host(host)
        if isinstance(checked, str):
            if checked not in dns:
                dns.append(checked)
        elif checked not in ips:
            ips.append(checked)
    return Hosts(tuple(dns), tuple(ips))


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, cluster: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lime-mqtt"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"cluster {cluster}"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(cluster: str, key: ec.EllipticCurvePrivateKey, days: int = CA_DAYS) -> x509.Certificate:
    """A self-signed CA certificate that may sign server certificates only (path length 0)."""
    name = _name(f"lime-mqtt CA for cluster {cluster}", cluster)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - CLOCK_SKEW)
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def make_server_cert(
    cluster: str,
    hosts: Hosts,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int = SERVER_DAYS,
) -> x509.Certificate:
    """The broker's certificate, signed by the CA: a TLS server (key usage digital
    signature, extended key usage server auth) for every name in ``hosts``."""
    public = key.public_key()
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in hosts.dns]
    alt_names += [x509.IPAddress(ip) for ip in hosts.ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(hosts.all[0], cluster))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - CLOCK_SKEW)
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The key as unencrypted PKCS#8 PEM, mode 0600 from the moment the file exists."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, pem)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def write_private(path: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to a file only its owner (``owner``: uid and gid, if given) can read,
    mode 0600 from the moment it exists; it replaces ``path`` whole (a reader never sees
    half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The subject alternative names of ``cert``, as strings."""
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def make_pki(folder: Path, cluster: str, hosts: Sequence[str]) -> Hosts:
    """Write ``ca.crt``, ``ca.key``, ``broker.crt`` and ``broker.key`` into ``folder``."""
    names = broker_hosts(hosts)
    ca_key, server_key = new_key(), new_key()
    ca_cert = make_ca(cluster, ca_key)
    write_key(folder / "ca.key", ca_key)
    write_cert(folder / "ca.crt", ca_cert)
    write_key(folder / "broker.key", server_key)
    write_cert(folder / "broker.crt", make_server_cert(cluster, names, server_key, ca_cert, ca_key))
    return names
