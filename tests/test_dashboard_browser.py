"""The dashboard in a real headless browser (Debian's chromium, driven by selenium)
against a real cluster: device agents, coordinator, planner and bridge as OS processes.

The devices and the plan appear; a question typed in the chat box streams its answer (the
same text an MQTT client gets); a device that is stopped turns offline on the page.
``LIME_SCREENSHOT=docs/dashboard.png`` also saves the page there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask_final
from lime_mqtt.transport.mosquitto import LocalBroker, free_port

pytestmark = [pytest.mark.e2e]

CLUSTER = "dashboard"
DEVICES = ["panel-0", "panel-1", "panel-2"]
QUESTION = "Why does a pump lose pressure?"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[object]:
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("chromium and chromium-driver are missing: `make setup-test` installs them from Debian")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_shows_the_cluster_streams_an_answer_and_sees_a_device_go(
    broker: LocalBroker, tiny_model: Path, tmp_path: Path, browser: object
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    # Each layer 4 ms slower: the tiny model's 40 tokens take about a second, long enough for
    # the browser to be seen showing the answer grow (without it they take a tenth of that).
    devices = [DeviceSpec(d, 100, 1, ("--telemetry-interval", "0.5", "--emulate-layer-delay-ms", "4"))
               for d in DEVICES]
    with ProcessCluster(broker.url, CLUSTER, str(tiny_model), devices, tmp_path / "logs",
                        planner_args=("--strategy", "equal", "--heartbeat-timeout", "3"),
                        coordinator_args=("--telemetry-interval", "0.5")) as procs:
        plan = procs.wait_ready()
        assert len(plan.stages) == 3
        url = procs.start_bridge(free_port())
        driver.get(url)  # type: ignore[attr-defined]
        wait = WebDriverWait(driver, 20)

        def read(selector: str, *attributes: str) -> list[list[str]]:
            """Attributes of the elements now on the page, read in one go (the page redraws
            them at every update)."""
            return driver.execute_script(  # type: ignore[attr-defined, no-any-return]
                "return [...document.querySelectorAll(arguments[0])].map("
                "e => arguments[1].map(a => e.getAttribute(a)))", selector, list(attributes))

        def rows() -> dict[str, str]:
            return dict(read("#devices tbody tr", "data-device", "data-state"))  # type: ignore[arg-type]

        # The devices and the plan appear, live.
        wait.until(lambda _: rows() == {d: "ready" for d in DEVICES})
        wait.until(lambda _: driver.find_element(By.ID, "connection").text == "live")  # type: ignore[attr-defined]
        assert [d for (d,) in read("#plan .stage", "data-device")] == [s.device_id for s in plan.stages]
        assert f"epoch {plan.epoch}" in driver.find_element(By.ID, "plan-title").text  # type: ignore[attr-defined]

        # A question typed in the chat box streams its answer.
        expected = asyncio.run(ask_final(broker.url, CLUSTER, {"messages": [{"role": "user", "content": QUESTION}],
                                                               "max_tokens": 40}))
        assert expected["type"] == "final"
        driver.find_element(By.ID, "chat-input").send_keys(QUESTION)  # type: ignore[attr-defined]
        limit = driver.find_element(By.ID, "chat-max")  # type: ignore[attr-defined]
        limit.clear()
        limit.send_keys("40")
        driver.find_element(By.ID, "chat-send").click()  # type: ignore[attr-defined]
        answer = driver.find_element(By.ID, "chat-answer")  # type: ignore[attr-defined]
        seen: set[int] = set()

        def done() -> bool:
            seen.add(len(answer.text))
            return answer.get_attribute("data-done") == "true"

        WebDriverWait(driver, 60, poll_frequency=0.05).until(lambda _: done())
        assert answer.text == expected["text"].strip() or answer.text == expected["text"]
        assert len(seen) > 2, "the answer arrived all at once, not streamed"
        wait.until(lambda _: read("#recent tbody tr", "class"))
        if os.environ.get("LIME_SCREENSHOT"):
            driver.save_screenshot(os.environ["LIME_SCREENSHOT"])  # type: ignore[attr-defined]

        # A device that is stopped turns offline on the page.
        procs.kill(DEVICES[1], signal.SIGKILL)
        WebDriverWait(driver, 30).until(lambda _: rows().get(DEVICES[1]) == "offline")
        assert rows()[DEVICES[0]] != "offline"
