"""Unit: the example device profiles in devices/ are valid settings files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lime_mqtt.cli.settings import load_settings
from lime_mqtt.core.topics import valid_device_id

PROFILES = sorted((Path(__file__).resolve().parent.parent / "devices").glob("*.toml"))


def test_there_are_profiles() -> None:
    assert len(PROFILES) >= 3


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profile_has_what_a_device_needs(profile: Path) -> None:
    settings = load_settings(str(profile))
    assert settings.device_id is not None and valid_device_id(settings.device_id)
    assert settings.memory_mb is not None and settings.memory_mb > 0
    assert settings.broker.startswith("mqtts://")  # TLS, with the device's own identity
    assert settings.username == f"device/{settings.device_id}" and settings.ca_file and settings.password_file


def test_a_device_id_is_one_topic_level_without_whitespace() -> None:
    assert valid_device_id("pi-4") and valid_device_id("x" * 64)
    assert not any(valid_device_id(bad) for bad in ("", "x" * 65, "a/b", "a+", "a#", "a b", "a\tb", "a\x00"))
