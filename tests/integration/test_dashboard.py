"""Given a dispatcher on the real broker with its admin API, when an operator opens the
dashboard in headless Chromium, then the page shows the topology and the counts move as
messages flow, a failing caller's fingerprint and dead letters appear with their
traceback, and the Pause button pauses the caller.

Pause is asserted on this instance; that it reaches every instance of the group is the
group-wide control's test (issue #12, other half). Reads ``Pipeline.status()`` (the
lead's half of issue #12): passes once that is merged.

Screenshots: set SHUNTER_DASHBOARD_SCREENSHOTS=<dir> to keep them (docs/ has the
committed ones)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shunter
from admintools import TOKEN, Api, admin_config, free_port, handlers_module
from kafkatools import Broker
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Debian's headless Chromium through its own chromedriver; selenium-manager is never
    asked to download anything."""
    if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
        pytest.fail("apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager, if ever reached: no network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1440,900",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    keep = os.environ.get("SHUNTER_DASHBOARD_SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / name)


def test_dashboard_shows_live_counts_failures_and_pauses_a_caller(
    broker: Broker, unique: str, tmp_path: Path, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SHUNTER_ADMIN_TOKEN", TOKEN)
    module, handlers = handlers_module(tmp_path, unique)
    port = free_port()
    app = shunter.Dispatcher(admin_config(broker, unique, module, port, partitions=3))
    gift, api = f"gift-{unique}", Api(port)
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)

    def text(selector: str) -> str:
        """The element's text, read in one step (the page redraws every second)."""
        found = browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null",
            selector,
        )
        return "" if found is None else str(found)

    def cell(caller: str, name: str) -> str:
        return text(f'#callers tr[data-caller="{caller}"] td.{name}')

    def number(caller: str, name: str) -> int:
        found = cell(caller, name)
        return int(found) if found.isdigit() else -1

    def click(selector: str) -> None:
        """A real click, found again if a redraw replaced the element meanwhile."""
        for _ in range(20):
            try:
                browser.find_element(By.CSS_SELECTOR, selector).click()
                return
            except StaleElementReferenceException:
                continue
        raise AssertionError(f"{selector} kept being redrawn")

    with DispatcherThread(app) as running:
        broker.produce(
            gift, [{"n": i, "user": {"id": i}} for i in range(20)], key=lambda i, v: f"u{i}"
        )
        running.wait_for(lambda: len(handlers.RANK) == 20, timeout=60)
        browser.get(f"http://127.0.0.1:{port}/")

        # the topology graph: topic → category → callers
        wait.until(lambda d: text('#graph .node.caller[data-name="rank"]'))
        nodes = browser.execute_script(
            "return [...document.querySelectorAll('#graph .node')].map(n => n.dataset.name)"
        )
        assert {gift, "revenue", "medal", "rank"} <= set(nodes)

        # the counts move as messages flow
        wait.until(lambda d: number("rank", "ok") == 20)
        broker.produce(
            gift, [{"n": 100 + i, "user": {"id": i}} for i in range(30)], key=lambda i, v: f"v{i}"
        )
        wait.until(lambda d: number("rank", "ok") == 50)
        assert number("medal", "ok") == 50

        # a failing caller: its dead letters, errors and fingerprint show up
        broker.produce(gift, [{"n": 200 + i} for i in range(3)], key=lambda i, v: f"w{i}")
        wait.until(lambda d: number("medal", "dlq") == 3)
        assert number("medal", "retries") == 3 * 3  # 2 fast + 1 slow each
        fingerprint_cell = '#fingerprints tr[data-caller="medal"] .fingerprint'
        wait.until(lambda d: text(fingerprint_cell))
        fingerprint = text(fingerprint_cell)
        assert fingerprint.startswith("KeyError at ") and fingerprint.endswith(" in on_medal")
        screenshot(browser, tmp_path, "dashboard.png")

        # the dead-letter browser shows each record's traceback
        click("#dlq-filter button[type=submit]")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#dlq-list tbody tr")) == 3)
        click("#dlq-list tbody tr:first-child")
        wait.until(lambda d: text("#dlq-detail pre.traceback"))
        trace = text("#dlq-detail pre.traceback")
        assert 'user_id = msg.value["user"]["id"]' in trace
        assert "KeyError: 'user'" in trace
        browser.execute_script("document.querySelector('#dlq').scrollIntoView()")
        screenshot(browser, tmp_path, "dashboard-deadletters.png")
        browser.execute_script("window.scrollTo(0, 0)")

        # without a token the buttons are disabled; with one, Pause pauses the caller
        toggle = '#callers tr[data-caller="medal"] button.toggle'
        assert not browser.find_element(By.CSS_SELECTOR, toggle).is_enabled()
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-set").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, toggle).is_enabled())
        assert text(toggle) == "Pause"
        click(toggle)
        wait.until(lambda d: cell("medal", "state") == "paused")
        status, stats = api.get("/stats")
        assert status == 200 and stats["callers"]["medal"]["paused"] is True
        assert stats["callers"]["rank"]["paused"] is False

        # then medal gets nothing more on this instance while rank goes on
        medal_before = len(handlers.MEDAL)
        broker.produce(
            gift, [{"n": 300 + i, "user": {"id": i}} for i in range(10)], key=lambda i, v: f"x{i}"
        )
        wait.until(lambda d: number("rank", "ok") == 63)
        assert len(handlers.MEDAL) == medal_before
        wait.until(lambda d: "PAUSED" in text('#graph .node.caller[data-name="medal"]'))
        screenshot(browser, tmp_path, "dashboard-paused.png")

        # and Resume lets it go on
        assert text(toggle) == "Resume"
        click(toggle)
        wait.until(lambda d: cell("medal", "state") == "running")
        running.wait_for(lambda: len(handlers.MEDAL) >= medal_before + 10, timeout=60)
