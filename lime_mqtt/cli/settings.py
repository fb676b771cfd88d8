"""Settings shared by every role: command-line options over environment over file.

Environment variables are ``LIME_BROKER``, ``LIME_CLUSTER``, ``LIME_MODEL`` and so on;
a settings file (TOML) is named by ``--config`` or ``LIME_CONFIG``. A broker folder's
identity files (docs/broker.md) are such files. A password comes from the settings file,
``LIME_PASSWORD`` or a ``password_file``, never from the command line (where every user
of the machine can read it in the process list).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lime_mqtt.core.errors import ConfigError

if TYPE_CHECKING:
    from lime_mqtt.transport.mqtt import MqttTransport


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIME_", extra="ignore")

    broker: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    cluster: str = Field("default", description="cluster name, the second part of every topic")
    model: str = Field("smollm2", description="a local Hugging Face folder or a built-in name")
    username: str | None = None
    password: str | None = None
    password_file: str | None = Field(None, description="a file whose first line is the password; wins over password")
    ca_file: str | None = Field(None, description="the CA that signed the broker's certificate (mqtts://)")
    cert_file: str | None = Field(None, description="a client certificate, for a broker that asks for one")
    key_file: str | None = Field(None, description="the client certificate's key")
    insecure: bool = Field(False, description="allow plaintext mqtt:// to a host that is not this machine")
    log_level: str = "INFO"
    # A device profile (devices/*.toml) may carry these; the command line wins.
    device_id: str | None = None
    memory_mb: int | None = None
    threads: int | None = None
    trusted: bool = False  # a device profile may mark the device trusted (docs/security.md)

    def transport(self) -> MqttTransport:
        """The broker these settings name, with their credentials and TLS files: what every
        service is given."""
        from lime_mqtt.transport.mqtt import MqttTransport

        return MqttTransport(
            self.broker, self.username, self.resolved_password(), ca_file=self.ca_file, cert_file=self.cert_file,
            key_file=self.key_file, insecure=self.insecure,
        )

    def resolved_password(self) -> str | None:
        """The first line of ``password_file`` if there is one, else ``password``."""
        if self.password_file is None:
            return self.password
        try:
            lines = Path(self.password_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"password_file {self.password_file}: {exc.strerror or exc}") from exc
        if not lines or not lines[0]:
            raise ConfigError(f"password_file {self.password_file} is empty: the password goes on its first line")
        return lines[0]


# Paths in a settings file are relative to the file's folder.
_PATHS = ("password_file", "ca_file", "cert_file", "key_file")


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build settings: ``overrides`` (CLI, ``None`` means unset) > environment > file > defaults."""
    file_values: dict[str, Any] = {}
    path = config_file or os.environ.get("LIME_CONFIG")
    if path:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"settings file {path}: {exc}") from exc
        for key in _PATHS:
            if isinstance(file_values.get(key), str):
                file_values[key] = str(Path(path).parent / Path(file_values[key]).expanduser())
    env_values = Settings().model_dump(exclude_defaults=True)
    cli_values = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**{**file_values, **env_values, **cli_values})


def api_keys(path: str, settings: Settings) -> dict[str, MqttTransport]:
    """The HTTP bridge's API keys (``lime-mqtt http --api-keys FILE``, docs/http.md): each
    ``[[key]]`` gives the key (``key``, or ``key_file`` whose first line it is) and the
    settings file of the client identity its calls go out under (``config``). Keys that
    name the same settings file share one MQTT connection."""
    try:
        entries = tomllib.loads(Path(path).read_text()).get("key", [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"API keys file {path}: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"API keys file {path}: no [[key]] entries")
    folder = Path(path).parent
    transports: dict[Path, MqttTransport] = {}
    keys: dict[str, MqttTransport] = {}
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), str):
            raise ConfigError(f"API keys file {path}: key {number} needs config = \"<settings file>\"")
        key = entry.get("key")
        if isinstance(entry.get("key_file"), str):
            try:
                key = (folder / entry["key_file"]).read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"API keys file {path}: key {number}'s key_file: {exc}") from exc
        if not isinstance(key, str) or len(key) < 16:
            raise ConfigError(f"API keys file {path}: key {number} must be a string of at least 16 characters")
        if key in keys:
            raise ConfigError(f"API keys file {path}: key {number} is given twice")
        config = (folder / entry["config"]).resolve()
        if config not in transports:
            transports[config] = load_settings(str(config), broker=settings.broker, cluster=settings.cluster,
                                               insecure=settings.insecure or None).transport()
        keys[key] = transports[config]
    return keys
