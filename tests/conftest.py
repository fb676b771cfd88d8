"""Shared fixtures: a real Mosquitto per test session, models, and a unique cluster per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lime_mqtt.model.builtin import smollm2_folder, tiny_folder
from lime_mqtt.transport.mosquitto import LocalBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A real Mosquitto on a free loopback port, with the project's configuration."""
    with LocalBroker(folder=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def cluster_name() -> str:
    """Every test gets its own topic tree."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_folder()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    return smollm2_folder()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tier of each test, from what it uses: a test that needs the real broker is an
    integration test, one that needs neither it nor processes (e2e) nor SmolLM2 is a unit test."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if item.get_closest_marker("e2e"):
            continue
        if "broker" in fixtures or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        elif not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.unit)
