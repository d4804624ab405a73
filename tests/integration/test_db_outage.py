"""PostgreSQL kills every connection again and again while a study runs and the API serves: workers and
the API reconnect, no trial is lost, no process dies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core.db import Database
from app.models import TrialState
from app.services import keys
from tests.conftest import POSTGRES_ADMIN_URL, make_settings
from tests.factories import API, create_study_via_service, start_worker, study_spec
from tests.integration.processes import (
    alive,
    assert_study_settled,
    free_port,
    log_lines,
    processes,
    running_with_epochs,
    start_api,
    study_status,
    wait_until,
)

KILL_EVERY_S = 0.7
STORM_S = 8.0
TERMINATE_OTHERS = text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()")


class Killer(threading.Thread):
    """Terminates every other connection to the test database every KILL_EVERY_S, for STORM_S."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(url, isolation_level="AUTOCOMMIT")
        self.killed: list[int] = []

    def run(self) -> None:
        end = time.monotonic() + STORM_S
        with self.engine.connect() as conn:
            while time.monotonic() < end:
                self.killed.append(int(conn.execute(TERMINATE_OTHERS).scalar() or 0))
                time.sleep(KILL_EVERY_S)
        self.engine.dispose()


class Poller(threading.Thread):
    """A client polling the study and its trials the whole time; keeps every status code it got."""

    def __init__(self, base: str, key: str, study_id: str) -> None:
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.study_id, self.stop = study_id, threading.Event()
        self.codes: list[int] = []
        self.retry_after: list[str | None] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for path in (f"/studies/{self.study_id}", f"/studies/{self.study_id}/trials?limit=50"):
                response = self.http.get(path)
                self.codes.append(response.status_code)
                if response.status_code == 503:
                    self.retry_after.append(response.headers.get("retry-after"))
            time.sleep(0.05)
        self.http.close()


@pytest.mark.postgres
def test_killed_connections_lose_no_trial_and_kill_no_process(postgres_url: str, tmp_path: Path) -> None:
    settings = make_settings(postgres_url, tmp_path / "home")
    db = Database(postgres_url)
    key = keys.create_key(db, owner="alice")
    port = free_port()
    spec = study_spec(budget={"n_trials": 6, "epochs": 5, "patience": None, "max_parallel": 2, "max_attempts": 1})
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    with processes() as procs:
        procs.append(start_api(settings, tmp_path / "api.log", port=port))
        base = f"http://127.0.0.1:{port}{API}"
        created = httpx.post(f"{base}/studies", json=spec, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        procs += [start_worker(settings, log) for log in logs]
        wait_until(lambda: running_with_epochs(db, sid, 1), 90, "a trial mid-training")
        poller, killer = Poller(base, key, sid), Killer(postgres_url)
        poller.start()
        killer.start()
        killer.join()
        db.engine.dispose()  # this test's own pool was killed too
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 120, "the study to end")
        poller.stop.set()
        poller.join(30)
        assert all(alive(p.pid) for p in procs), [p.returncode for p in procs]
        after = httpx.get(f"{base}/studies/{sid}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert sum(killer.killed) >= len(killer.killed) >= 5  # the storm really hit connections
    assert after.status_code == 200 and after.json()["status"] == "completed"
    assert set(poller.codes) <= {200, 503}, sorted(set(poller.codes))  # never a 500
    assert all(ra is not None and int(ra) >= 1 for ra in poller.retry_after)
    assert poller.codes.count(200) > 10
    rows = assert_study_settled(db, sid, 6)
    assert [(r.state, r.attempt) for r in rows] == [(TrialState.COMPLETE.value, 1)] * 6
    events = [e for log in logs for e in log_lines(log)]
    started = sorted(e["trial"] for e in events if e["msg"] == "trial started")
    assert started == sorted(r.number for r in rows)  # retried in place: no trial had to start over
    db.dispose()


OUTAGE_S = 8.0  # longer than the lease grace period (2 s) and than any single retry pause


@pytest.mark.postgres
def test_an_outage_longer_than_the_grace_period_loses_no_trial(postgres_url: str, tmp_path: Path) -> None:
    """The database refuses every connection for OUTAGE_S, as during a restart; afterwards no lease is reaped
    for the silence it caused, every trial finishes in its first attempt and every process is alive."""
    settings = make_settings(postgres_url, tmp_path / "home")
    db = Database(postgres_url)
    name = make_url(postgres_url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    spec = study_spec(budget={"n_trials": 4, "epochs": 6, "patience": None, "max_parallel": 2, "max_attempts": 1})
    spec["search_space"] = {**spec["search_space"], "batch_size": 16}
    with processes() as procs:
        procs.append(start_api(settings, tmp_path / "api.log", port=free_port()))  # a second reaper
        sid = create_study_via_service(db, settings, spec=spec)
        procs.append(start_worker(settings, tmp_path / "worker.log", per_device=2))
        wait_until(lambda: running_with_epochs(db, sid, 1), 90, "a trial mid-training")
        db.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            try:
                end = time.monotonic() + OUTAGE_S
                while time.monotonic() < end:
                    conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = :name"), {"name": name})
                    time.sleep(0.2)
            finally:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")
        assert all(alive(p.pid) for p in procs), [p.returncode for p in procs]
    admin.dispose()
    rows = assert_study_settled(db, sid, 4)
    assert [(r.state, r.attempt, r.error) for r in rows] == [(TrialState.COMPLETE.value, 1, None)] * 4
    assert study_status(db, sid) == "completed"
    db.dispose()
