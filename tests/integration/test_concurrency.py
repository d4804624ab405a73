"""Many workers and many requests at once: no deadlock, no "database is locked", no trial twice, one study
per Idempotency-Key."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study, TrialState, Worker
from tests.conftest import make_settings
from tests.factories import API, auth_headers, client_for, create_study_via_api, start_worker, study_spec
from tests.integration.processes import (
    alive,
    assert_study_settled,
    free_port,
    log_lines,
    processes,
    start_api,
    study_status,
    wait_until,
)
from tests.recorded import peak_running

TROUBLE = ("database is locked", "deadlock", "Traceback", "too many clients")


def _run_many_workers(url: str, tmp_path: Path, n_workers: int, n_trials: int, max_parallel: int) -> None:
    settings = make_settings(url, tmp_path / "home")
    db = Database(url)
    client = client_for(settings, db)
    spec = study_spec(budget={"n_trials": n_trials, "epochs": 1, "max_parallel": max_parallel})
    sid = create_study_via_api(client, spec)
    assert client.post(f"{API}/studies/{sid}/pause").status_code == 200
    logs = [tmp_path / f"w{i}.log" for i in range(n_workers)]
    with processes() as procs:
        procs += [start_worker(settings, log) for log in logs]
        wait_until(lambda: _live_workers(db) == n_workers, 180, f"{n_workers} workers to register", 0.2)
        # Every worker polls already: on resume they all race for the first claims at once.
        assert client.post(f"{API}/studies/{sid}/resume").status_code == 200
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 120, "the study to end", 0.2)
        assert all(alive(p.pid) for p in procs)  # nobody crashed
    assert study_status(db, sid) == "completed"
    assert 1 <= peak_running(db, sid) <= max_parallel  # from the recorded claim and finish times
    rows = assert_study_settled(db, sid, n_trials)
    numbers = sorted(r.number for r in rows)
    assert len(set(numbers)) == n_trials  # no number twice (a proposal dropped in a race leaves a gap)
    assert all(r.state == TrialState.COMPLETE.value and r.attempt == 1 for r in rows)
    events = [e for log in logs for e in log_lines(log)]
    started = sorted(e["trial"] for e in events if e["msg"] == "trial started")
    assert started == numbers  # each trial ran exactly once
    assert [e["msg"] for e in events if e["msg"] == "study finalized (n_trials)"] == ["study finalized (n_trials)"]
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [t for t in TROUBLE if t in text], text[-3000:]
    db.dispose()


def _live_workers(db: Database) -> int:
    with db.read_session() as session:
        return session.scalar(select(func.count()).select_from(Worker).where(Worker.stopped_at.is_(None))) or 0


@pytest.mark.postgres
def test_sixteen_workers_starting_together_on_postgres_share_one_study(postgres_url: str, tmp_path: Path) -> None:
    _run_many_workers(postgres_url, tmp_path, n_workers=16, n_trials=10, max_parallel=4)


def test_four_workers_starting_together_on_sqlite_share_one_study(sqlite_url: str, tmp_path: Path) -> None:
    _run_many_workers(sqlite_url, tmp_path, n_workers=4, n_trials=8, max_parallel=3)


def test_concurrent_posts_with_one_idempotency_key_create_one_study(db_url: str, tmp_path: Path) -> None:
    settings = make_settings(db_url, tmp_path / "home")
    db = Database(db_url)
    headers = {**auth_headers(db), "Idempotency-Key": "retry-1"}
    port = free_port()
    spec = study_spec(name="once")
    replies: list[httpx.Response] = []
    barrier = threading.Barrier(8)

    def post() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}{API}", timeout=60,
                          headers=headers) as http:
            barrier.wait()
            replies.append(http.post("/studies", json=spec))

    with processes() as procs:
        procs.append(start_api(settings, tmp_path / "api.log", port=port))
        threads = [threading.Thread(target=post) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}{API}", timeout=60,
                          headers=headers) as http:
            changed = http.post("/studies", json={**spec, "name": "another"})
    assert sorted(r.status_code for r in replies) == [200] * 7 + [201], [r.text for r in replies]
    assert len({r.json()["id"] for r in replies}) == 1
    assert changed.status_code == 409  # the same key with a different body is not a retry
    with db.read_session() as session:
        rows = session.scalars(select(Study).where(Study.owner == "alice")).all()
    assert [(r.name, r.idempotency_key) for r in rows] == [("once", "retry-1")]
    names = [s.study_name for s in optuna_storage(db_url).get_all_studies()]
    assert names == [rows[0].optuna_name]  # the losers' Optuna studies were removed
    db.dispose()
