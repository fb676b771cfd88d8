"""The layering holds: import contracts (import-linter) and strict types on the pure layers.

The contracts live in pyproject.toml under ``[tool.importlinter]``; these tests run the
same checks as ``make lint`` so that ``make test`` fails when a layer imports upwards.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PURE_PACKAGES = ("lime_mqtt/core", "lime_mqtt/planning", "lime_mqtt/model")
PURE_MODULES = {"lime_mqtt.core.*", "lime_mqtt.planning.*", "lime_mqtt.model.*"}
CONTRACTS = {
    "pure-no-io",
    "core-bottom",
    "transport-below-services",
    "services-below-cli",
    "mqtt-only-in-transport-mqtt",
}
SERVICES = {"lime_mqtt.device", "lime_mqtt.coordinator", "lime_mqtt.planner", "lime_mqtt.weights", "lime_mqtt.client",
            "lime_mqtt.watch", "lime_mqtt.http"}
# --strict, flag by flag (see the comment in pyproject.toml)
STRICT_FLAGS = {
    "disallow_any_generics",
    "disallow_subclassing_any",
    "disallow_untyped_calls",
    "disallow_untyped_defs",
    "disallow_incomplete_defs",
    "check_untyped_defs",
    "disallow_untyped_decorators",
    "warn_unused_ignores",
    "warn_return_any",
    "no_implicit_reexport",
    "strict_equality",
    "extra_checks",
}


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def test_import_contracts_are_declared() -> None:
    config = _pyproject()["tool"]["importlinter"]
    assert config["root_package"] == "lime_mqtt"
    contracts = {c["id"]: c for c in config["contracts"]}
    assert set(contracts) >= CONTRACTS
    for contract in contracts.values():
        assert contract["type"] == "forbidden"
        assert contract["source_modules"] and contract["forbidden_modules"], contract["id"]
    pure = contracts["pure-no-io"]
    assert set(pure["source_modules"]) == {"lime_mqtt.core", "lime_mqtt.planning", "lime_mqtt.model"}
    assert set(pure["forbidden_modules"]) == {"lime_mqtt.transport", "lime_mqtt.cli"} | SERVICES
    assert set(contracts["core-bottom"]["forbidden_modules"]) == {"lime_mqtt.planning", "lime_mqtt.model"}
    assert set(contracts["transport-below-services"]["forbidden_modules"]) == {"lime_mqtt.cli"} | SERVICES
    assert set(contracts["services-below-cli"]["source_modules"]) == SERVICES
    mqtt = contracts["mqtt-only-in-transport-mqtt"]
    assert mqtt["source_modules"] == ["lime_mqtt"]
    assert set(mqtt["forbidden_modules"]) == {"aiomqtt", "paho"}
    assert {i.split("->")[0].strip() for i in mqtt["ignore_imports"]} == {"lime_mqtt.transport.mqtt"}
    web = contracts["web-only-in-http"]
    assert set(web["forbidden_modules"]) == {"starlette", "uvicorn", "prometheus_client"}
    assert {i.split("->")[0].strip() for i in web["ignore_imports"]} == {"lime_mqtt.http.**"}


def test_pure_layers_are_strictly_typed_in_config() -> None:
    overrides = _pyproject()["tool"]["mypy"]["overrides"]
    strict = [o for o in overrides if set(o["module"]) >= PURE_MODULES]
    assert strict, "no [[tool.mypy.overrides]] for the pure layers"
    assert all(strict[0].get(flag) is True for flag in STRICT_FLAGS), strict[0]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = _run([str(lint_imports), "--no-logo"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pure_layers_pass_mypy_strict() -> None:
    """About 35 s with a cold mypy cache, 3 s with a warm one."""
    result = _run([sys.executable, "-m", "mypy", *PURE_PACKAGES], timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
