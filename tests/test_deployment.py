"""Deployment files: the systemd unit of a device agent passes `systemd-analyze verify`,
and `compose.yaml` passes a real compose implementation's validation (Debian's
docker-compose; no engine is needed to validate)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "devices" / "lime-mqtt-device.service"
INSTALLED = "/opt/lime-mqtt/.venv/bin/lime-mqtt"  # where docs/devices.md installs the project


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make setup-test` installs it from Debian")
    return path


def _verify(unit_text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    unit = folder / UNIT.name
    unit.write_text(unit_text)
    return subprocess.run([_tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)


def test_the_device_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} device --config /etc/lime-mqtt/device.toml" in text
    # Verified with the executable of this checkout where the unit expects the installed one.
    here = str(Path(sys.executable).with_name("lime-mqtt"))
    result = _verify(text.replace(INSTALLED, here), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # not even a warning
    for option in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                   "PrivateTmp=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet="):
        assert f"\n{option}\n" in text, option
    # The control: verify does reject a unit whose program does not exist.
    broken = _verify(text.replace(INSTALLED, str(tmp_path / "missing" / "lime-mqtt")), tmp_path)
    assert broken.returncode != 0


def test_compose_yaml_is_valid_for_docker_compose() -> None:
    tool = _tool("docker-compose")
    result = subprocess.run([tool, "-f", str(ROOT / "compose.yaml"), "config", "-q"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    services = subprocess.run([tool, "-f", str(ROOT / "compose.yaml"), "config", "--services"], capture_output=True,
                              text=True, timeout=60, cwd=ROOT, check=True).stdout.split()
    assert sorted(services) == ["broker", "coordinator", "device-1", "device-2", "device-3", "planner"]
    # The control: a compose file with a mistake is refused.
    broken = (ROOT / "compose.yaml").read_text().replace("services:", "servics:")
    result = subprocess.run([tool, "-f", "-", "config", "-q"], input=broken, capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode != 0
