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
from sqlalchemy import update

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.models import Trial
from app.services import keys
from tests.browser import Browser, find_chromium
from tests.conftest import ROOT, make_settings
from tests.factories import API, client_for, study_spec
from tests.study_rows import finalize, write_trials
from workers import leasing

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
    assert "checkpoints0 B" in browser.js("document.getElementById('study-info').textContent")  # none kept
    browser.wait_for("document.getElementById('detail').dataset.number === '3'")
    detail = browser.js("document.getElementById('detail-info').textContent")
    assert "pruned" in detail and browser.js("document.querySelector('#detail-chart canvas') !== null")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-study.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 20_000


def _option(chart: str) -> str:
    """JS for a chart's current ECharts option (functions such as label formatters included)."""
    return f"echarts.getInstanceByDom(document.getElementById({json.dumps(chart)})).getOption()"


def test_charts_draw_epoch_n_at_n_and_pruned_here_at_the_last_epoch(server: tuple[str, Settings, Database],
                                                                     browser: Browser) -> None:
    """Workers number epochs from 1; the charts once added 1, so the last epoch fell off the axis."""
    base, _, _ = server
    browser.open(f"{base}/")
    got = browser.js_await("""import('/static/charts.js').then((c) => {
      const curves = [{ number: 1, state: 'complete', epoch: [1, 2, 3], val_metric: [0.5, 0.7, 0.8] },
                      { number: 2, state: 'pruned', epoch: [1, 2], val_metric: [0.4, 0.45] }];
      const o = c.curvesOption(curves, { objective: 'val_accuracy', epochs: 3, selected: null });
      const t = c.trialOption([1, 2, 3].map((e) => ({ epoch: e, val_metric: e / 10, val_loss: 1, train_loss: 1 })),
                              { objective: 'val_accuracy', epochs: 3 });
      return { complete: o.series[0].data, pruned: o.series[1].data, cut: o.series[2].data, max: o.xAxis.max,
               trial: t.series[0].data.map((p) => p[0]), trialMax: t.xAxis.max };
    })""")
    assert got["complete"] == [[1, 0.5], [2, 0.7], [3, 0.8]]
    assert got["pruned"] == [[1, 0.4], [2, 0.45]]
    assert got["cut"] == [{"value": [2, 0.45], "number": 2}]  # pruned after its second epoch
    assert got["max"] == 3 and got["trial"] == [1, 2, 3] and got["trialMax"] == 3


def test_chart_rules_tick_labels_best_line_and_axis_choice(server: tuple[str, Settings, Database],
                                                           browser: Browser) -> None:
    base, _, _ = server
    browser.open(f"{base}/")
    got = browser.js_await("""import('/static/charts.js').then((c) => {
      const steps = [[0, 0.5], [3, 0.7], [5, 0.9]];
      c.addToBest(steps, 2, 0.8, 'maximize');  // a late finisher becomes a step and hides #3
      c.addToBest(steps, 4, 0.8, 'maximize');  // a tie with the best before it: the earlier trial stays
      const axes = c.chooseAxes({ varying: ['n_layers', 'units', 'dropout', 'learning_rate', 'batch_size'],
                                  searched: ['batch_size'], importantFirst: ['learning_rate', 'dropout', 'units'],
                                  max: 3 });
      return { ticks: [1e-7, 3e-6, 0.01, 250, 2e5].map(c.formatTick), steps, axes };
    })""")
    assert got["ticks"] == ["1e-7", "3e-6", "0.01", "250", "2e5"]
    assert got["steps"] == [[0, 0.5], [2, 0.8], [5, 0.9]]
    # The searched parameter is always an axis, however unimportant; the rule is said in words.
    assert got["axes"]["names"] == ["dropout", "learning_rate", "batch_size"]
    assert got["axes"]["rule"] == "3 of 5 parameters: the 1 searched in the spec and the 2 most important"


def test_study_page_axes_best_trial_and_pause_resume_cancel(server: tuple[str, Settings, Database],
                                                            browser: Browser) -> None:
    base, settings, db = server
    client = client_for(settings, db)
    space = {"learning_rate": {"type": "float", "low": 1e-7, "high": 1e-1, "log": True},
             "batch_size": {"type": "categorical", "choices": [128, 32, 64]}, "optimizer": "adam"}
    study = client.post("/api/v1/studies", json=study_spec(name="controls", search_space=space,
                                                           budget={"n_trials": 30, "max_parallel": 1})).json()
    write_trials(db, settings, study_id=study["id"], n=12)
    key = keys.create_key(db, owner="alice")
    browser.open(f"{base}/studies/{study['id']}#key={key}")
    browser.wait_for("document.body.dataset.ready === 'true'")

    # Parallel coordinates: numeric choices on a category axis in numeric order, log ticks as 1e-7.
    axes = browser.js(f"{_option('parallel-chart')}.parallelAxis.map((a) => [a.name, a.type, a.data || null])")
    by_name = {name: (kind, data) for name, kind, data in axes}
    assert by_name["batch_size"] == ("category", ["32", "64", "128"])
    assert by_name["learning_rate"][0] == "log"
    assert browser.js(f"{_option('parallel-chart')}.parallelAxis.find((a) => a.name === 'learning_rate')"
                      ".axisLabel.formatter(1e-7)") == "1e-7"
    note = browser.js("document.getElementById('parallel-note').textContent")
    assert "parameters" in note
    # The user picks the axes; "Automatic" goes back to the rule.
    browser.js("document.getElementById('axes-picker').open = true;"
               "document.querySelector('#axes-list input[value=\"learning_rate\"]').click()")
    assert "learning_rate" not in browser.js("document.getElementById('parallel-chart').dataset.axes")
    assert "as chosen" in browser.js("document.getElementById('parallel-note').textContent")
    browser.js("document.getElementById('axes-auto').click()")
    assert "learning_rate" in browser.js("document.getElementById('parallel-chart').dataset.axes").split(",")

    # The history's last trial is inside the axis, not on its edge.
    last = max(client.get(f"/api/v1/studies/{study['id']}/history").json()["number"])
    assert browser.js(f"{_option('history-chart')}.xAxis[0].max") > last

    # The trial panel opens on the best trial, without putting it in the address.
    best = client.get(f"/api/v1/studies/{study['id']}").json()["best_trial"]
    browser.wait_for(f"document.getElementById('detail').dataset.number === '{best['number']}'")
    assert "trial=" not in browser.js("location.href")

    # Pause, resume, and cancel only after confirming.
    browser.wait_for("!document.getElementById('pause').classList.contains('hidden')")
    browser.js("document.getElementById('pause').click()")
    browser.wait_for("document.getElementById('study-status').textContent === 'paused'")
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "paused"
    browser.js("document.getElementById('resume').click()")
    browser.wait_for("document.getElementById('study-status').textContent === 'running'")
    browser.js("document.getElementById('cancel').click()")
    assert browser.js("!document.getElementById('cancel-confirm').classList.contains('hidden')")
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "running"  # not yet
    browser.js("document.getElementById('cancel-no').click()")
    assert browser.js("document.getElementById('cancel-confirm').classList.contains('hidden')")
    browser.js("document.getElementById('cancel').click(); document.getElementById('cancel-yes').click()")
    browser.wait_for("document.getElementById('study-status').textContent === 'cancelled'")
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "cancelled"
    assert browser.js("document.getElementById('cancel').classList.contains('hidden')")

    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "dashboard-controls.png")


def test_the_trial_panel_pauses_and_resumes_a_running_trial(server: tuple[str, Settings, Database],
                                                            browser: Browser) -> None:
    base, settings, db = server
    client = client_for(settings, db)
    study = client.post("/api/v1/studies", json=study_spec(name="trial controls")).json()
    write_trials(db, settings, study_id=study["id"], n=2)
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)  # a trial mid-run
    assert lease is not None
    leasing.bind_trial(db, lease, number=2, optuna_trial_id=10**6, params={"learning_rate": 0.01})
    key = keys.create_key(db, owner="alice")
    browser.open(f"{base}/studies/{study['id']}#trial=2&key={key}")
    browser.wait_for("document.getElementById('detail').dataset.number === '2'")
    browser.wait_for("!document.getElementById('trial-pause').classList.contains('hidden')")
    assert browser.js("document.getElementById('trial-resume').classList.contains('hidden')")

    browser.js("document.getElementById('trial-pause').click()")  # asked: its worker pauses it at a boundary
    browser.wait_for("document.getElementById('detail-info').textContent.includes('pausing at its next epoch')")
    assert client.get(f"/api/v1/studies/{study['id']}/trials/2").json()["pause_requested_at"] is not None
    assert browser.js("document.getElementById('trial-pause').classList.contains('hidden')")
    browser.js("document.getElementById('trial-resume').click()")  # called off before it happened
    browser.wait_for("!document.getElementById('trial-pause').classList.contains('hidden')")
    assert client.get(f"/api/v1/studies/{study['id']}/trials/2").json()["pause_requested_at"] is None


def test_the_trial_panel_extends_a_complete_trial_that_keeps_its_checkpoint(
        server: tuple[str, Settings, Database], browser: Browser) -> None:
    base, settings, db = server
    client = client_for(settings, db)
    study = client.post("/api/v1/studies", json=study_spec(name="extend")).json()
    bare, kept = write_trials(db, settings, study_id=study["id"], n=2)
    with db.session() as session:  # as a worker leaves a completed trial whose checkpoint is kept
        session.execute(update(Trial).where(Trial.study_id == study["id"], Trial.number == kept).values(
            checkpoint_epoch=3, checkpoint_path="checkpoints/trial-1-1/epoch-000003.safetensors"))
    key = keys.create_key(db, owner="alice")
    browser.open(f"{base}/studies/{study['id']}#trial={bare}&key={key}")
    browser.wait_for(f"document.getElementById('detail').dataset.number === '{bare}'")
    assert browser.js("document.getElementById('trial-extend-box').classList.contains('hidden')")  # none kept

    browser.open(f"{base}/studies/{study['id']}#trial={kept}&key={key}")
    browser.wait_for("!document.getElementById('trial-extend-box').classList.contains('hidden')")
    browser.js("document.getElementById('trial-extend-epochs').value = '4'")
    browser.js("document.getElementById('trial-extend').click()")
    browser.wait_for("document.getElementById('detail-info').textContent.includes('extending to epoch 7')")
    trial = client.get(f"/api/v1/studies/{study['id']}/trials/{kept}").json()
    assert (trial["state"], trial["epochs_target"]) == ("waiting", 7)
    assert browser.js("document.getElementById('trial-extend-box').classList.contains('hidden')")


def test_study_list_tells_studies_apart_and_says_when_a_key_is_rejected(
        server: tuple[str, Settings, Database], browser: Browser) -> None:
    base, settings, db = server
    client = client_for(settings, db)
    older = client.post("/api/v1/studies", json=study_spec(name="same-name")).json()
    newer = client.post("/api/v1/studies", json=study_spec(name="same-name")).json()
    key = keys.create_key(db, owner="alice")
    browser.open(f"{base}/#key={key}")
    browser.wait_for("document.body.dataset.ready === 'true'")
    rows = browser.js("[...document.querySelectorAll('#studies-table tbody tr')].map((r) => "
                      "[r.dataset.id, r.querySelector('.short-id').textContent, r.title])")
    assert [r[0] for r in rows] == [newer["id"], older["id"]]  # newest first
    assert [r[1] for r in rows] == [newer["id"][:8], older["id"][:8]]
    assert all(f"id {sid}" in title and "created" in title for sid, _, title in rows)

    browser.js("sessionStorage.setItem('hpsearch.apiKey', 'hps_wrong0123456789')")
    browser.open(f"{base}/")
    browser.wait_for("document.getElementById('key-rejected') !== null")
    bar = browser.js("document.getElementById('signin').textContent")
    assert "rejected" in bar and "signed in" not in bar
    assert browser.js("document.getElementById('api-key') !== null")  # the field to try another key
    assert "rejected" in browser.js("document.getElementById('notice').textContent")


def test_the_api_docs_page_works_with_the_network_cut(server: tuple[str, Settings, Database],
                                                      tmp_path: Path) -> None:
    """/docs draws Swagger UI from the package's own files: every host but the server's fails to resolve."""
    base, _, _ = server
    offline = Browser(tmp_path / "offline-profile", _chromium(),
                      "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    try:
        offline.open(f"{base}/docs")
        offline.wait_for("document.querySelector('.swagger-ui .info .title') !== null")
        assert offline.js("document.querySelector('.swagger-ui .info .title').textContent").startswith("hpsearch")
        offline.wait_for(_count(".swagger-ui .opblock") + " > 10")  # the operations, from /openapi.json
        loaded = offline.js("performance.getEntriesByType('resource').map((e) => e.name)")
        assert loaded and all(url.startswith(base) for url in loaded), loaded
    finally:
        offline.close()


def test_trial_table_searched_columns_first_a_column_picker_and_whole_rows(
        server: tuple[str, Settings, Database], browser: Browser) -> None:
    base, settings, db = server
    client = client_for(settings, db)
    # Both searched parameters come late in the documented order, past the table's eight columns.
    space = {"lr_schedule": {"type": "categorical", "choices": ["constant", "cosine"]},
             "batch_size": {"type": "categorical", "choices": [32, 64]}, "optimizer": "adam"}
    spec = study_spec(name="columns", budget={"n_trials": 60, "max_parallel": 1})
    spec["search_space"] = space  # only these two searched
    study = client.post(f"{API}/studies", json=spec).json()
    write_trials(db, settings, study_id=study["id"], n=40)
    key = keys.create_key(db, owner="alice")
    browser.open(f"{base}/studies/{study['id']}#key={key}")
    browser.wait_for("document.body.dataset.ready === 'true'")
    header = "[...document.querySelectorAll('#trials-table thead th')].slice(6).map((th) => th.textContent)"
    shown = browser.js(header)
    assert shown[:2] == ["lr_schedule", "batch_size"] and len(shown) == 8, shown

    # The user picks the columns, as the parallel plot's axes; "Automatic" goes back to the rule.
    browser.js("document.getElementById('columns-picker').open = true;"
               "document.querySelectorAll('#columns-list input:checked').forEach((i) => i.click());"
               "document.querySelector('#columns-list input[value=\"optimizer\"]').click()")
    browser.wait_for(f"JSON.stringify({header}) === '[\"optimizer\"]'")
    assert browser.js("document.querySelector('#trials-table tbody tr[data-number] td:last-child').textContent") \
        == "adam"
    browser.js("document.getElementById('columns-auto').click()")
    browser.wait_for(f"{header}.length === 8")

    # The scroll box ends at a row's edge, not in the middle of a row.
    fit = browser.js("""(() => {
      const table = document.getElementById('trials-table'), wrap = table.parentElement;
      const row = table.tBodies[0].rows[0].getBoundingClientRect().height;
      const rows = (wrap.clientHeight - table.tHead.getBoundingClientRect().height) / row;
      return { scrolls: wrap.scrollHeight > wrap.clientHeight, rows };
    })()""")
    assert fit["scrolls"] and abs(fit["rows"] - round(fit["rows"])) < 0.05, fit

    # Parallel lines: even the worst stay visible (they were at a quarter opacity in a pale grey-blue).
    in_range = browser.js(f"{_option('parallel-chart')}.visualMap[0].inRange")
    assert min(in_range["opacity"]) >= 0.5, in_range
    # The trial chart's axis name sits under the axis, clear of the right axis's first tick ("0 epoch").
    browser.wait_for("document.getElementById('detail').dataset.number !== undefined")
    assert browser.js(f"{_option('detail-chart')}.xAxis[0].nameLocation") == "middle"
