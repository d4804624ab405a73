"""The dashboard's reads at 10,000 trials, side by side with optuna-dashboard serving the same database;
and the study page in Chromium at 100,000 trials, this version beside an earlier one.

Builds a finished study of N trials x 8 reported epochs in bulk (our tables and Optuna's, see
dashboard_data.py), serves it with hpsearch (uvicorn) and with optuna-dashboard (its WSGI app under
wsgiref, as `optuna-dashboard <url>` runs it), and times each HTTP read over loopback. optuna-dashboard
keeps the study's trials in memory for 10 s and importances until a trial completes, so its reads are
timed both cold (caches cleared: what a live study costs every few seconds) and warm.

    pip install -e '.[bench]'
    python -m benchmarks.dashboard --trials 10000 --backends sqlite,postgresql --out /tmp/dashboard.json

The page mode serves the same API with the pages of this checkout and of an earlier commit (`--before`,
its app/web taken with `git archive`), and times each in headless Chromium: navigation start to every panel
drawn (`body[data-ready]`), then, with the study running, the longest main-thread task while trials stream
in over the event stream:

    python -m benchmarks.dashboard --reads page --trials 100000 --backends sqlite --before c37796a
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import numpy as np
import optuna.distributions as od
import uvicorn
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url

from app.core import migrate
from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.models import Study
from app.services import importance as our_importance
from benchmarks import dashboard_data
from benchmarks.common import machine, write_json
from benchmarks.dashboard_data import BuiltStudy, build_study

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGETS_MS = {"page of 100 trials": 30.0, "study summary": 30.0, "importance (cold)": 1000.0}


@dataclass
class Timing:
    name: str
    ours_ms: list[float] = field(default_factory=list)
    theirs_ms: list[float] = field(default_factory=list)
    note: str = ""

    @staticmethod
    def _median(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 2) if xs else None

    def row(self) -> dict[str, Any]:
        ours, theirs = self._median(self.ours_ms), self._median(self.theirs_ms)
        ratio = round(theirs / ours, 1) if ours and theirs else None
        return {"read": self.name, "hpsearch_ms": ours, "optuna_dashboard_ms": theirs, "ratio": ratio,
                "target_ms": TARGETS_MS.get(self.name), "runs": [len(self.ours_ms), len(self.theirs_ms)],
                "note": self.note}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _database(backend: str, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    name = f"hpsearch_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


CLEAR_PATH = "/__bench/clear"  # benchmark servers only: drop in-process caches for a cold read


def serve_ours(url: str, port: int, web_dir: str | None = None) -> None:
    """hpsearch's API as `hpsearch serve --workers 0` runs it, plus the cache-clearing route; with web_dir,
    the dashboard pages and scripts from there (an earlier version's app/web) over this version's API."""
    if web_dir:
        from app.api.routes import dashboard

        dashboard.WEB_DIR = Path(web_dir)
    settings = Settings(home=Path(tempfile.mkdtemp()), database_url=url, rate_limit_per_s=1e6,
                        rate_limit_burst=10**6)
    app = create_app(settings)

    @app.get(CLEAR_PATH, include_in_schema=False)
    def clear() -> dict[str, bool]:
        with our_importance._cache_lock:
            our_importance._cache.clear()
        return {"cleared": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def serve_theirs(url: str, port: int) -> None:
    """optuna-dashboard's WSGI app (what `optuna-dashboard <url>` serves), threaded, plus cache clearing."""
    from optuna_dashboard import _importance, wsgi

    app = wsgi(url)

    def with_clear(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == CLEAR_PATH:
            app._inmemory_cache.clear()
            with _importance.param_importance_cache_lock:
                _importance.param_importance_cache.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"cleared": true}']
        return app(environ, start_response)

    make_server("127.0.0.1", port, with_clear, server_class=_ThreadingWSGIServer,
                handler_class=_QuietHandler).serve_forever()


@contextmanager
def _server(kind: str, url: str, ready_path: str, *extra: str) -> Iterator[str]:
    """A server in its own process, so client and server never share an interpreter lock."""
    port = _free_port()
    command = [sys.executable, "-m", "benchmarks.dashboard", kind, "--url", url, "--port", str(port), *extra]
    proc = subprocess.Popen(command)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + ready_path, timeout=5).status_code < 500:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{kind} did not start")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # an open event stream holds a graceful shutdown
            proc.kill()
            proc.wait(20)


def _time_get(client: httpx.Client, path: str, *, cold: bool = False) -> float:
    if cold:
        client.get(CLEAR_PATH).raise_for_status()
    start = time.perf_counter()
    response = client.get(path)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed


def measure(backend: str, built: BuiltStudy, url: str, repeat: int, cold_repeat: int,
            reads: set[str]) -> list[Timing]:
    sid, oid, n = built.study_id, built.optuna_study_id, built.n_trials
    api = f"/api/v1/studies/{sid}"
    timings: list[Timing] = []
    auth = {"Authorization": f"Bearer {built.key}"}
    with _server("serve-ours", url, "/healthz") as ours_base, \
            _server("serve-theirs", url, "/api/meta") as theirs_base, \
            httpx.Client(base_url=ours_base, headers=auth, timeout=120) as ours, \
            httpx.Client(base_url=theirs_base, timeout=300) as theirs:
        for path in (api, f"{api}/trials?limit=100"):  # connections, imports and the first query plans
            ours.get(path).raise_for_status()
        theirs.get("/api/meta").raise_for_status()

        def add(name: str, ours_fn: Callable[[], float] | None, theirs_fn: Callable[[], float] | None,
                runs: int, note: str = "") -> None:
            t = Timing(name, note=note)
            # One server at a time, after one unmeasured run: neither pays for the other's work.
            for fn, out in ((ours_fn, t.ours_ms), (theirs_fn, t.theirs_ms)):
                if fn is not None:
                    fn()
                    out.extend(fn() for _ in range(runs))
            timings.append(t)
            print(f"  [{backend}] {t.row()}", flush=True)

        if "http" in reads:
            full_cold = lambda: _time_get(theirs, f"/api/studies/{oid}", cold=True)  # noqa: E731
            add("first full render data",
                lambda: sum(_time_get(ours, p) for p in (api, f"{api}/history", f"{api}/trials?limit=50",
                                                         f"{api}/curves?top=8&recent=6")),
                full_cold, cold_repeat,
                "ours: summary + all trials in columns + first table page + 14 curves; "
                "theirs: GET /api/studies/{id} (every trial), cold")
            add("first plot data (summary + history)",
                lambda: _time_get(ours, api) + _time_get(ours, f"{api}/history"), full_cold, cold_repeat)
            add("page of 100 trials", lambda: _time_get(ours, f"{api}/trials?limit=100"),
                lambda: _time_get(theirs, f"/api/studies/{oid}"), repeat,
                "theirs has no paging: its table pages the full study in the browser (warm cache)")
            add("page of 100 trials, by value", lambda: _time_get(ours, f"{api}/trials?limit=100&sort=value"),
                None, repeat)
            add("study summary", lambda: _time_get(ours, api), lambda: _time_get(theirs, "/api/studies"), repeat,
                "theirs: GET /api/studies (every study's summary, incl. best trial)")
            add("incremental poll (cold)", lambda: _time_get(ours, f"{api}/history?after={n - 10}"),
                lambda: _time_get(theirs, f"/api/studies/{oid}?after={n - 10}", cold=True), cold_repeat,
                "theirs reloads every trial whenever its 10 s cache expired")
            add("incremental poll (warm)", lambda: _time_get(ours, f"{api}/trials?after={n - 10}"),
                lambda: _time_get(theirs, f"/api/studies/{oid}?after={n - 10}"), repeat)
            add("importance (cold)", lambda: _time_get(ours, f"{api}/importance", cold=True),
                lambda: _time_get(theirs, f"/api/studies/{oid}/param_importances", cold=True), cold_repeat,
                "both PED-ANOVA at this size")
            add("importance (warm)", lambda: _time_get(ours, f"{api}/importance"),
                lambda: _time_get(theirs, f"/api/studies/{oid}/param_importances"), repeat)
            add("CSV export of every trial", lambda: _time_get(ours, f"{api}/trials.csv"),
                lambda: _time_get(theirs, f"/csv/{oid}", cold=True), max(1, cold_repeat // 2))
        with _browser(enabled="browser" in reads) as browser:
            if browser is not None:
                ours_page = f"{ours_base}/studies/{sid}#key={built.key}"
                theirs_page = f"{theirs_base}/dashboard/studies/{oid}"
                add("page usable in Chromium (first plot drawn)",
                    lambda: _time_page(browser, ours_page, "#history-chart[data-drawn] canvas"),
                    lambda: _time_page(browser, theirs_page, "#plot-history .scatterlayer .point", theirs, cold=True),
                    cold_repeat, "navigation start to the optimization history drawn; theirs cold")
    return timings


@contextmanager
def _browser(enabled: bool) -> Iterator[Any]:
    """Headless Chromium (tests/browser.py), or None with a message when it is not installed."""
    from tests.browser import Browser, find_chromium

    if not enabled:
        yield None
        return
    chromium = find_chromium()
    if chromium is None:
        print("  chromium is not installed: the in-browser timing is skipped", flush=True)
        yield None
        return
    with tempfile.TemporaryDirectory() as profile:
        browser = Browser(Path(profile), chromium)
        try:
            yield browser
        finally:
            browser.close()


def _time_page(browser: Any, url: str, drawn_selector: str, server: httpx.Client | None = None, *,
               cold: bool = False) -> float:
    if cold and server is not None:
        server.get(CLEAR_PATH).raise_for_status()
    browser.call("Page.navigate", session=True, url="about:blank")
    browser.wait_for("location.href === 'about:blank'")
    start = time.perf_counter()
    browser.call("Page.navigate", session=True, url=url)
    browser.wait_for(f"document.querySelector({drawn_selector!r}) !== null", timeout_s=120)
    return (time.perf_counter() - start) * 1000


# ---- the study page, this version beside an earlier one ------------------------------------------------------

LONG_TASKS = """window.__longTasks = [];
try {
  new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__longTasks.push(e.duration); })
    .observe({ type: "longtask", buffered: true });
} catch (e) { /* no long-task timing in this browser */ }"""


def _web_dir(rev: str, into: Path) -> Path:
    """app/web as it was at `rev`, unpacked under `into`."""
    archive = subprocess.run(["git", "archive", rev, "app/web"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "app" / "web"


def _reopen_study(url: str, built: BuiltStudy, n_trials: int) -> None:
    """Make the built study running again with room for more trials, so its event stream stays open."""
    db = Database(url)
    with db.session() as session:
        session.execute(update(Study).where(Study.id == built.study_id)
                        .values(status="running", finished_at=None, stop_reason=None, n_trials=n_trials))
    db.dispose()


def _stream_trials(url: str, built: BuiltStudy, first: int, count: int, per_s: int, seed: int) -> None:
    """Write `count` finished trials (numbered from `first`, with their epochs) at `per_s` a second, as a
    fleet of workers would: the page reads them from its event stream."""
    rng = np.random.default_rng(seed)
    db = Database(url)
    described = dashboard_data.data.describe(dashboard_data.data.load_builtin(dashboard_data.SPEC["dataset"]))
    resolved = dashboard_data.resolve_space({}, dashboard_data.Context.of(described, dashboard_data.SPEC["model"]))
    dists = {k: d for k, d in resolved.items() if isinstance(d, od.BaseDistribution)}
    batch = max(1, per_s // 4)
    for start in range(first, first + count, batch):
        now = datetime.now(UTC)
        trials = [dashboard_data._trial(rng, n, dists, 4, now) for n in range(start, min(start + batch, first + count))]
        for t in trials:
            t["began"], t["ended"], t["optuna_trial_id"] = now, datetime.now(UTC), None
        dashboard_data._write_ours(db, built.study_id, trials)
        time.sleep(0.25)
    db.dispose()


def _page_ms(browser: Any, url: str) -> tuple[float, float]:
    """Navigation start to the history plot drawn, and to every panel drawn (polled every 0.1 s)."""
    browser.call("Page.navigate", session=True, url="about:blank")
    browser.wait_for("location.href === 'about:blank'")
    start = time.perf_counter()
    browser.call("Page.navigate", session=True, url=url)
    browser.wait_for("document.querySelector('#history-chart[data-drawn] canvas') !== null", timeout_s=300)
    history = time.perf_counter()
    browser.wait_for("document.body && document.body.dataset.ready === 'true'", timeout_s=300)
    return (history - start) * 1000, (time.perf_counter() - start) * 1000


def measure_page(backend: str, built: BuiltStudy, url: str, before: str, runs: int,
                 stream: int) -> list[dict[str, Any]]:
    """First full draw, then responsiveness while `stream` trials arrive, for each version of the page."""
    rows: list[dict[str, Any]] = []
    n = built.n_trials
    _reopen_study(url, built, n + 2 * stream)
    with tempfile.TemporaryDirectory() as tmp, _browser(enabled=True) as browser:
        if browser is None:
            return rows
        browser.call("Page.enable", session=True)
        browser.call("Page.addScriptToEvaluateOnNewDocument", session=True, source=LONG_TASKS)
        versions = [(f"before ({before})", ("--web-dir", str(_web_dir(before, Path(tmp))))), ("after", ())]
        for i, (label, extra) in enumerate(versions):
            with _server("serve-ours", url, "/healthz", *extra) as base:
                page = f"{base}/studies/{built.study_id}#key={built.key}"
                cold = _page_ms(browser, page)  # the first open: no server cache, no query plans yet
                draws = [_page_ms(browser, page) for _ in range(runs)]
                load_tasks = browser.js("window.__longTasks.slice()") or []
                browser.wait_for("document.getElementById('live').textContent === 'live'", timeout_s=60)
                browser.js("window.__longTasks = []")
                first = n + i * stream
                started = time.perf_counter()
                writer = threading.Thread(target=_stream_trials, args=(url, built, first, stream, 200, i))
                writer.start()
                writer.join()
                written = time.perf_counter()
                shown = f"{first + stream}/"
                browser.wait_for(f"document.getElementById('progress-counts').textContent.includes({shown!r})",
                                 timeout_s=300)
                lag = time.perf_counter() - written
                time.sleep(3)  # the throttled redraws after the last event
                tasks = browser.js("window.__longTasks.slice()") or []
                row = {"page": label, "history_drawn_ms": round(statistics.median(d[0] for d in draws)),
                       "first_full_draw_ms": round(statistics.median(d[1] for d in draws)),
                       "first_open_ms": [round(x) for x in cold],
                       "draws_ms": [[round(x) for x in d] for d in draws],
                       "longest_task_at_load_ms": round(max(load_tasks, default=0)),
                       "streamed_trials": stream, "stream_s": round(written - started, 1),
                       "longest_task_streaming_ms": round(max(tasks, default=0)),
                       "long_task_total_streaming_ms": round(sum(tasks)),
                       "shown_after_last_write_s": round(lag, 2)}
                rows.append(row)
                print(f"  [{backend}] {row}", flush=True)
    return rows


def run(backend: str, n_trials: int, epochs: int, repeat: int, cold_repeat: int,
        reads: set[str], before: str = "HEAD", stream: int = 2000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, _database(backend, Path(tmp)) as url:
        migrate.upgrade(url)
        started = time.perf_counter()
        built = build_study(url, n_trials=n_trials, epochs=epochs)
        took = time.perf_counter() - started
        print(f"[{backend}] built {n_trials} trials x {epochs} epochs in {took:.1f}s", flush=True)
        out: dict[str, Any] = {"backend": backend, "trials": n_trials, "epochs": epochs}
        if reads & {"http", "browser"}:
            out["rows"] = [t.row() for t in measure(backend, built, url, repeat, cold_repeat, reads)]
        if "page" in reads:
            out["page"] = measure_page(backend, built, url, before, cold_repeat, stream)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "serve-ours", "serve-theirs"))
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=30, help="runs of each warm read")
    parser.add_argument("--cold-repeat", type=int, default=5, help="runs of each cold read")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--reads", default="http,browser",
                        help="http reads, browser (first plot, beside optuna-dashboard), page (this version's "
                             "study page beside --before's: first full draw and streaming)")
    parser.add_argument("--before", default="HEAD", help="page: the git revision of the earlier pages")
    parser.add_argument("--stream", type=int, default=2000, help="page: trials streamed in while it is open")
    parser.add_argument("--web-dir", help="serve-ours: the dashboard's pages and scripts from here")
    parser.add_argument("--out", default=None)
    parser.add_argument("--url", help="serve-*: the database")
    parser.add_argument("--port", type=int, help="serve-*: the loopback port")
    args = parser.parse_args()
    if args.mode == "serve-ours":
        serve_ours(args.url, args.port, args.web_dir)
    elif args.mode == "serve-theirs":
        serve_theirs(args.url, args.port)
    else:
        reads = set(args.reads.split(","))
        results = [run(backend, args.trials, args.epochs, args.repeat, args.cold_repeat, reads, args.before,
                       args.stream) for backend in args.backends.split(",")]
        write_json(args.out, {"machine": machine(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
