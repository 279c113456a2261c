"""The web UI in a real headless browser: Debian's ``chromium`` and ``chromium-driver`` driven
by selenium, against a real gateway (``unsafe-local`` backend, real Dask, the embedded proxy).

One flow: log in, create a cluster from the form (a bad value first: the form shows the API's
message), see it running, scale, open its dashboard (drawn, the worker in it), read its logs,
stop it; a non-admin is refused the admin page; a form posted without its CSRF token is
refused; an admin sees and stops another user's cluster. With ``GATEWAY_SCREENSHOTS=<dir>`` it
saves a PNG of each whole page there (the README's, ``docs/screenshots/``). Without chromium it
fails under CI (``CI`` set), as CI installs it (.ci/run), and is skipped elsewhere, saying
what to install.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("no_process_left_behind")]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver"

STEP = 120.0
"""Seconds one step may take (a cluster start, a worker joining) on a loaded 2-core machine."""
WHOLE_TEST = 600.0
DASHBOARD_PLOTS = 4
"""Canvases the dashboard's status page has drawn when it counts as shown (it has more)."""
SHOT_BYTES = 300_000
"""A screenshot bigger than this is taken again at the next of `SHOT_SCALES`."""
SHOT_SCALES = (1.0, 0.8, 0.65)

FAST: dict[str, Any] = {
    "cluster_start_timeout": 90.0,
    "worker_start_timeout": 90.0,
    "cluster_heartbeat_period": 1,
    "cluster_heartbeat_timeout": 30.0,
    "cluster_status_period": 0.2,
    "worker_status_period": 0.2,
    "backoff_base_delay": 0.01,
    "backoff_max_delay": 0.2,
    "sigint_timeout": 5.0,
    "sigterm_timeout": 2.0,
    "sigkill_timeout": 2.0,
}


def browser_available() -> None:
    """Fail (under CI) or skip (elsewhere) naming what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (core's testing extra)")
    if not missing:
        return
    why = f"the browser test needs {', '.join(missing)}: {INSTALL}, pip install selenium"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


class Browser:
    """A headless chromium and the few actions the flow takes, each waiting as a user would."""

    def __init__(self, base: str, shots: Path | None) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1280,860",
            "--disable-gpu",
            "--hide-scrollbars",
        ):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(STEP)
        self.base = base
        self.shots = shots

    def close(self) -> None:
        self.driver.quit()

    def go(self, path: str) -> None:
        self.driver.get(self.base + path)

    def find(self, css: str) -> Any:
        """The element ``css`` selects, waiting for it: a click that submits a form returns
        before the next page is there, and a loaded machine may take seconds to serve it."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait

        try:
            return WebDriverWait(self.driver, STEP, poll_frequency=0.2).until(
                expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
            )
        except TimeoutException:
            raise AssertionError(f"not seen within {STEP} s: {css}\npage:\n{self.text}") from None

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    @property
    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.CSS_SELECTOR, "body").text)

    @property
    def path(self) -> str:
        from urllib.parse import urlsplit

        return urlsplit(self.driver.current_url).path

    def until(self, check: Callable[[], bool], what: str, *, reload: bool = True) -> None:
        deadline = time.monotonic() + STEP
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen within {STEP} s: {what}\npage:\n{self.text}")
            time.sleep(0.5)
            if reload:
                self.driver.refresh()

    def shot(self, name: str) -> None:
        """Save the whole page (not only the window) as ``<name>.png``, through chromium's
        DevTools capture beyond the viewport."""
        if self.shots is None:
            return
        layout = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        viewport = layout["cssLayoutViewport"]
        height = max(viewport["clientHeight"], layout["cssContentSize"]["height"])
        clip = {"x": 0, "y": 0, "width": viewport["clientWidth"], "height": min(height, 2400)}
        for scale in SHOT_SCALES:  # smaller until the PNG fits the README's budget
            png = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True, "clip": {**clip, "scale": scale}},
            )
            data = base64.b64decode(png["data"])
            if len(data) <= SHOT_BYTES:
                break
        (self.shots / f"{name}.png").write_bytes(data)

    def drawn_plots(self) -> int:
        """How many canvases bokeh has drawn (they live in shadow roots)."""
        count: int = self.driver.execute_script(
            """
            const count = (root) => {
                let n = root.querySelectorAll('canvas').length;
                for (const e of root.querySelectorAll('*')) {
                    if (e.shadowRoot) n += count(e.shadowRoot);
                }
                return n;
            };
            return count(document);
            """
        )
        return count

    def log_in(self, user: str) -> None:
        self.go("/ui/login")
        self.find("#username").send_keys(user)
        self.find("#login").click()
        self.until(lambda: self.path == "/", f"{user} logged in", reload=False)

    def log_out(self) -> None:
        self.find("#logout").click()
        self.until(lambda: self.path == "/ui/login", "logged out", reload=False)


def api(base: str, method: str, path: str, user: str, body: Any = None) -> Any:
    """A REST API call as ``user`` (another user acting beside the browser)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:".encode()).decode())
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=STEP) as resp:
        text = resp.read().decode()
    return json.loads(text) if text else None


def flow(base: str, shots: Path | None) -> None:
    """Everything the browser does (in a thread: the gateway serves on the test's loop)."""
    b = Browser(base, shots)
    try:
        # Logging in: any page leads to the login form.
        b.go("/")
        b.until(lambda: b.path == "/ui/login", "the login page", reload=False)
        b.shot("login")
        b.log_in("alice")
        assert "You have no clusters" in b.text

        # The new-cluster form: a bad value shows the API's message and creates nothing.
        b.find("#new-cluster").click()
        field = b.find("#opt-worker_cores")
        field.clear()
        field.send_keys("9")
        b.find("#create").click()
        assert "worker_cores" in b.find("#message").text and "9" in b.find("#message").text
        assert b.path == "/ui/new"
        b.shot("new-cluster-error")
        field = b.find("#opt-worker_cores")
        field.clear()
        field.send_keys("1")
        b.shot("new-cluster")
        b.find("#create").click()
        b.until(lambda: b.path.startswith("/ui/cluster/"), "the cluster page", reload=False)
        name = b.find("#cluster-name").text

        # It runs.
        b.until(lambda: b.find("#status").text == "RUNNING", "the cluster running")

        # Scaling: the worker joins.
        b.find("#count").send_keys("1")
        b.find("#scale").click()
        assert "Scaling to 1 workers" in b.find("#message").text
        b.until(lambda: "1 running" in b.find("#workers").text, "one running worker")
        b.shot("cluster")

        # Its dashboard opens through the proxy, and bokeh draws it (the worker in it).
        dashboard = b.find("#dashboard").get_attribute("href")
        assert dashboard.endswith(f"/clusters/{name}/status"), dashboard
        b.driver.get(dashboard)
        b.until(lambda: "Bokeh" in b.driver.page_source, "the dashboard", reload=False)
        b.until(lambda: b.drawn_plots() >= DASHBOARD_PLOTS, "the dashboard drawn", reload=False)
        time.sleep(2)  # a few of the dashboard's periodic updates, for the shot
        b.shot("dashboard")
        b.go(f"/ui/cluster/{name}")

        # Logs: the scheduler's and the worker's.
        b.find("#show-logs").click()
        logs = {e.get_attribute("data-component"): e.text for e in b.all("pre.log")}
        assert "scheduler" in logs and "Scheduler" in logs["scheduler"], logs
        assert any(k != "scheduler" for k in logs), logs
        b.shot("cluster-logs")

        b.go("/")
        row = b.find(f'tr[data-name="{name}"]')
        assert "RUNNING" in row.text and "dashboard" in row.text
        b.shot("my-clusters")
        b.find("#nav-quota").click()
        assert "user alice" in b.text
        b.shot("quota")

        # A form posted without its CSRF token is refused, and changes nothing.
        b.go(f"/ui/cluster/{name}")
        b.driver.execute_script("document.querySelector('#stop-form input[name=csrf]').remove()")
        b.find("#stop").click()
        assert b.find("#error-status").text == "403" and "CSRF" in b.text
        b.go(f"/ui/cluster/{name}")
        assert b.find("#status").text == "RUNNING"

        # Stopping.
        b.find("#stop").click()
        b.until(lambda: b.path == "/", "back to my clusters", reload=False)
        b.until(lambda: "STOPPED" in b.find(f'tr[data-name="{name}"]').text, "the cluster stopped")

        # A non-admin is refused the admin page.
        assert not b.all("#nav-admin")
        b.go("/ui/admin")
        assert b.find("#error-status").text == "403"
        b.log_out()

        # An admin sees and stops another user's cluster.
        bobs = api(base, "POST", "/api/v1/clusters/", "bob", {"cluster_options": {}})["name"]
        b.log_in("admin")
        b.find("#nav-admin").click()
        b.until(
            lambda: "RUNNING" in b.find(f'#all-clusters tr[data-name="{bobs}"]').text,
            "bob's cluster running on the admin page",
        )
        assert "bob" in b.find(f'#all-clusters tr[data-name="{bobs}"]').text
        assert "pass" in b.find("#health").text
        assert "gateway-core" in b.find("#plugins").text or "builtin" in b.find("#plugins").text
        b.shot("admin")
        b.find(f'#all-clusters tr[data-name="{bobs}"] button.stop-any').click()
        assert f"Stopped {bobs}" in b.find("#message").text
        status = api(base, "GET", f"/api/v1/clusters/{bobs}", "bob")["status"]
        assert status in ("STOPPING", "STOPPED"), status
    finally:
        b.close()


@pytest.fixture
def dask_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dask`` on PATH is this environment's."""
    bindir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


async def test_the_web_ui_in_a_real_browser(
    make_gateway: Any, tmp_path: Path, dask_on_path: None
) -> None:
    browser_available()
    shots_env = os.environ.get("GATEWAY_SCREENSHOTS")
    shots = Path(shots_env) if shots_env else None
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    config = {
        "gateway": {"backend": "unsafe-local", "admin_users": ["admin"]},
        "backend": {"unsafe-local": {**FAST, "clusters_directory": str(tmp_path / "clusters")}},
        "cluster": {"max_lifetime": "8h", "worker_memory": "1 GiB", "scheduler_memory": "1 GiB"},
        "options": {
            "worker_cores": {"type": "int", "min": 1, "max": 2, "default": 1, "label": "Cores"},
        },
        "quotas": {"default": {"max_clusters": 3, "max_cores": 8}},
    }
    async with asyncio.timeout(WHOLE_TEST):
        gw = await make_gateway(config)
        assert gw.proxy is not None, "the embedded proxy is not running"
        await asyncio.to_thread(flow, f"http://{gw.public_address}", shots)
