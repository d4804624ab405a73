"""The dashboard in a real headless Chromium and a real server: sign in, watch a study, read it finished.

Uses Debian's `chromium` in its own headless mode (no browser download), driven over the DevTools protocol
through `--remote-debugging-pipe` (JSON messages on file descriptors 3 and 4, so no websocket client is
needed). Skips when chromium is missing, except in CI, where it must run. The screenshot lands in
test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.services import keys
from tests.conftest import ROOT, make_settings
from tests.factories import client_for, study_spec
from tests.study_rows import finalize, write_trials

ARTIFACTS = ROOT / "test-artifacts"
WAIT_S = 20.0
WIDTH, HEIGHT = 1440, 2300
# dup() first: the new fds are the lowest free ones, so moving them onto 3 and 4 never clobbers the other.
_LAUNCHER = ("import os, sys; r, w = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); os.dup2(r, 3); "
             "os.dup2(w, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
             "os.execvp(sys.argv[3], sys.argv[3:])")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is missing; CI installs it in .ci/run")
    pytest.skip("chromium is not installed (apt-get install chromium)")


class Browser:
    """A headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--no-first-run", "--disable-extensions", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}"]
        # The protocol expects its pipe on fds 3 (commands in) and 4 (replies out); a launcher puts it there.
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(to_browser_r), str(from_browser_w),
                                      _chromium(), *flags, "about:blank"],
                                     pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], WAIT_S)
            chunk = os.read(self._from_browser, 1 << 16) if ready else b""
            if not chunk:
                raise RuntimeError("the browser stopped answering")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(raw))

    def open(self, url: str) -> None:
        """A fresh document (about:blank first: a URL differing only in its fragment would not reload)."""
        self.call("Page.navigate", session=True, url="about:blank")
        self.wait_for("location.href === 'about:blank'")
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("location.href !== 'about:blank' && document.readyState !== 'loading'")

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:  # e.g. the document is still being replaced
                value = None
            if value:
                return value
            time.sleep(0.1)
        state = self.js("document.getElementById('notice') && document.getElementById('notice').textContent")
        raise AssertionError(f"timed out waiting for {expression!r}; page notice: {state!r}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, Settings, Database]]:
    """The real app under uvicorn on a free loopback port."""
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(settings.database_url)
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(settings, db), host="127.0.0.1", port=port,
                                             log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        thread.join(0.05)
    try:
        yield f"http://127.0.0.1:{port}", settings, db
    finally:
        instance.should_exit = True
        thread.join(10)
        db.dispose()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    _chromium()
    instance = Browser(tmp_path / "profile")
    try:
        yield instance
    finally:
        instance.close()


def _count(selector: str) -> str:
    return f"document.querySelectorAll({json.dumps(selector)}).length"


def test_sign_in_watch_a_study_live_then_read_it_finished(server: tuple[str, Settings, Database],
                                                          browser: Browser) -> None:
    base, settings, db = server
    client = client_for(settings, db)
    study = client.post("/api/v1/studies", json=study_spec(name="browser-study",
                                                           budget={"n_trials": 14, "max_parallel": 1})).json()
    write_trials(db, settings, study_id=study["id"], n=6)
    key = keys.create_key(db, owner="alice")

    # Sign in through the form on the studies page.
    browser.open(f"{base}/")
    browser.wait_for("document.getElementById('api-key') !== null")
    browser.js(f"document.getElementById('api-key').value = {json.dumps(key)};"
               "document.querySelector('form.signin').requestSubmit()")
    browser.wait_for("document.body.dataset.ready === 'true'")
    listing = browser.js("document.querySelector('#studies-table tbody').textContent")
    assert listing.count("browser-study") == 1

    # The running study: 6 trials now, 8 more arrive over the event stream without a reload.
    browser.open(f"{base}/studies/{study['id']}")
    browser.wait_for("document.body.dataset.ready === 'true'")
    assert browser.js(_count("#trials-table tbody tr[data-number]")) == 6
    browser.wait_for("document.getElementById('live').textContent === 'live'")
    write_trials(db, settings, study_id=study["id"], n=8, seed=1)
    finalize(db, test_metrics={"test_accuracy": 0.9321, "test_loss": 0.2468})
    browser.wait_for("document.getElementById('study-status').textContent === 'completed'")
    browser.wait_for(f"{_count('#trials-table tbody tr[data-number]')} === 14")
    browser.wait_for("document.getElementById('test-metrics').textContent.includes('0.9321')")
    browser.wait_for("document.getElementById('progress-counts').textContent.startsWith('14/14 finished')")

    # Read it finished, from a link with the key in the fragment and a trial selected.
    best = client.get(f"/api/v1/studies/{study['id']}").json()["best_trial"]
    browser.js("sessionStorage.clear()")
    browser.open(f"{base}/studies/{study['id']}#key={key}&trial=3")
    browser.wait_for("document.body.dataset.ready === 'true'")
    assert key not in browser.js("location.href")  # moved to sessionStorage, out of the address bar
    for chart in ("history-chart", "parallel-chart", "curves-chart", "importance-chart"):
        assert browser.js(f"document.querySelector('#{chart}[data-drawn] canvas') !== null"), chart
    assert browser.js("document.getElementById('best-value').dataset.value") == str(best["value"])
    assert browser.js("document.getElementById('study-name').textContent") == "browser-study"
    browser.wait_for("document.getElementById('detail').dataset.number === '3'")
    detail = browser.js("document.getElementById('detail-info').textContent")
    assert "pruned" in detail and browser.js("document.querySelector('#detail-chart canvas') !== null")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-study.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 20_000
