"""The dashboard in a real headless Chromium and a real server: sign in, watch a study, read it finished.

Skips when chromium is missing, except in CI, where it must run. The screenshot lands in test-artifacts/ for
a person to look at.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.services import keys
from tests.browser import Browser, find_chromium
from tests.conftest import ROOT, make_settings
from tests.factories import API, client_for, study_spec
from tests.study_rows import finalize, write_trials

ARTIFACTS = ROOT / "test-artifacts"


def _chromium() -> str:
    path = find_chromium()
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is missing; CI installs it in .ci/run")
    pytest.skip("chromium is not installed (apt-get install chromium)")


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
    instance = Browser(tmp_path / "profile", _chromium())
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
    study = client.post(f"{API}/studies", json=study_spec(name="browser-study",
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
    best = client.get(f"{API}/studies/{study['id']}").json()["best_trial"]
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
