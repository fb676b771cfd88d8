"""A coordinator for a model no device can run says so at start, not on every request."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lime_mqtt.coordinator.service import Coordinator
from lime_mqtt.core.errors import ModelError
from lime_mqtt.transport.memory import MemoryBroker


def _unsupported_copy(tiny_model: Path, folder: Path) -> Path:
    """The tiny model's files with a config of a family the adapters do not know."""
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_coordinator_refuses_a_model_family_no_device_can_run(tiny_model: Path, tmp_path: Path) -> None:
    folder = _unsupported_copy(tiny_model, tmp_path / "odd-model")
    with pytest.raises(ModelError, match=r"model type 'gpt2' is not supported \(supported: .*llama"):
        Coordinator(MemoryBroker(), "c", folder)


def test_the_coordinator_command_exits_at_once_with_the_reason(tiny_model: Path, tmp_path: Path) -> None:
    folder = _unsupported_copy(tiny_model, tmp_path / "odd-model")
    # Port 1 on loopback: nothing listens, so a coordinator that tried to serve would fail differently.
    done = subprocess.run(
        [sys.executable, "-m", "lime_mqtt.cli", "coordinator", "--model", str(folder), "--broker", "mqtt://127.0.0.1:1"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "model type 'gpt2' is not supported" in done.stderr


async def test_a_weight_source_that_fails_leaves_the_coordinator_serving(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator's weight source is supervised: if it breaks, requests are still answered."""
    from lime_mqtt.client import ask_final
    from lime_mqtt.weights.source import WeightSource
    from tests.helpers import running

    async def broken(self: WeightSource) -> None:
        raise OSError("the model folder went away")

    monkeypatch.setattr(WeightSource, "run", broken)
    broker = MemoryBroker()
    coordinator = Coordinator(broker, "c", tiny_model, serve_weights=True)
    async with running({"coordinator": coordinator}):
        answer = await ask_final(broker, "c", {"id": "q", "prompt": "Valve", "max_tokens": 2}, timeout_s=10)
    assert answer["type"] == "error" and answer["error"]["code"] == "no_plan"  # answered: it still serves
