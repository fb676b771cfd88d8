"""Settings shared by every role: command-line options over environment over file.

Environment variables are ``LIME_BROKER``, ``LIME_CLUSTER``, ``LIME_MODEL`` and so on;
a settings file (TOML) is named by ``--config`` or ``LIME_CONFIG``.
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
    log_level: str = "INFO"
    # A device profile (devices/*.toml) may carry these; the command line wins.
    device_id: str | None = None
    memory_mb: int | None = None
    threads: int | None = None
    trusted: bool = False  # a device profile may mark the device trusted (docs/security.md)

    def transport(self) -> MqttTransport:
        """The broker these settings name, with their credentials: what every service is given."""
        from lime_mqtt.transport.mqtt import MqttTransport

        return MqttTransport(self.broker, self.username, self.password)


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build settings: ``overrides`` (CLI, ``None`` means unset) > environment > file > defaults."""
    file_values: dict[str, Any] = {}
    path = config_file or os.environ.get("LIME_CONFIG")
    if path:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"settings file {path}: {exc}") from exc
    env_values = Settings().model_dump(exclude_defaults=True)
    cli_values = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**{**file_values, **env_values, **cli_values})
