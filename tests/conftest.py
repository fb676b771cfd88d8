"""Shared fixtures: a real Mosquitto per test session, models, and a unique cluster per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lime_mqtt.transport.mosquitto import LocalBroker
from lime_mqtt.model.builtin import smollm2_folder, tiny_folder


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
