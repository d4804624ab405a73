"""The dashboard's reads at 10,000 trials, side by side with optuna-dashboard serving the same database.

Builds a finished study of N trials x 8 reported epochs in bulk (our tables and Optuna's, see
dashboard_data.py), serves it with hpsearch (uvicorn) and with optuna-dashboard (its WSGI app under
wsgiref, as `optuna-dashboard <url>` runs it), and times each HTTP read over loopback. optuna-dashboard
keeps the study's trials in memory for 10 s and importances until a trial completes, so its reads are
timed both cold (caches cleared: what a live study costs every few seconds) and warm.

    pip install -e '.[bench]'
    python -m benchmarks.dashboard --trials 10000 --backends sqlite,postgresql --out /tmp/dashboard.json
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core import migrate
from app.core.config import Settings
from app.main import create_app
from app.services import importance as our_importance
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


def serve_ours(url: str, port: int) -> None:
    """hpsearch's API as `hpsearch serve --workers 0` runs it, plus the cache-clearing route."""
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
def _server(kind: str, url: str, ready_path: str) -> Iterator[str]:
    """A server in its own process, so client and server never share an interpreter lock."""
    port = _free_port()
    command = [sys.executable, "-m", "benchmarks.dashboard", kind, "--url", url, "--port", str(port)]
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


def run(backend: str, n_trials: int, epochs: int, repeat: int, cold_repeat: int,
        reads: set[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, _database(backend, Path(tmp)) as url:
        migrate.upgrade(url)
        started = time.perf_counter()
        built = build_study(url, n_trials=n_trials, epochs=epochs)
        took = time.perf_counter() - started
        print(f"[{backend}] built {n_trials} trials x {epochs} epochs in {took:.1f}s", flush=True)
        timings = measure(backend, built, url, repeat, cold_repeat, reads)
        return {"backend": backend, "trials": n_trials, "epochs": epochs, "rows": [t.row() for t in timings]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "serve-ours", "serve-theirs"))
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=30, help="runs of each warm read")
    parser.add_argument("--cold-repeat", type=int, default=5, help="runs of each cold read")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--reads", default="http,browser", help="http reads, the page in Chromium, or both")
    parser.add_argument("--out", default=None)
    parser.add_argument("--url", help="serve-*: the database")
    parser.add_argument("--port", type=int, help="serve-*: the loopback port")
    args = parser.parse_args()
    if args.mode == "serve-ours":
        serve_ours(args.url, args.port)
    elif args.mode == "serve-theirs":
        serve_theirs(args.url, args.port)
    else:
        reads = set(args.reads.split(","))
        results = [run(backend, args.trials, args.epochs, args.repeat, args.cold_repeat, reads)
                   for backend in args.backends.split(",")]
        write_json(args.out, {"machine": machine(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
