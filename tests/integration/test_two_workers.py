"""Two worker processes on one PostgreSQL study: every trial runs once, limits hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from app.core.db import Database
from app.models import Trial, Worker
from tests.conftest import make_settings
from tests.factories import client_for, create_study_via_api, start_worker, study_spec, wait_for_status
from tests.integration.processes import processes
from tests.recorded import peak_running


@pytest.mark.postgres
def test_two_workers_share_a_study_without_running_a_trial_twice(postgres_url: str, tmp_path: Path) -> None:
    settings = make_settings(postgres_url, tmp_path / "home")
    db = Database(postgres_url)
    client = client_for(settings, db)
    sid = create_study_via_api(client, study_spec(budget={"n_trials": 8, "epochs": 2, "max_parallel": 3}))
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    with processes() as workers:
        # This test's own timings (the settings' grace, not the process tests' short one).
        leases = {"HPSEARCH_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
                  "HPSEARCH_LEASE_GRACE_S": str(settings.lease_grace_s)}
        workers += [start_worker(settings, p, per_device=2, extra_env=leases) for p in logs]
        study = wait_for_status(client, sid, {"completed"}, timeout_s=120)
    assert study["progress"]["finished"] == study["progress"]["complete"] == 8
    assert peak_running(db, sid) <= 3  # from the recorded claim and finish times
    with db.read_session() as session:
        rows = session.execute(select(Trial.number, Trial.worker_id, Trial.attempt).where(Trial.study_id == sid)).all()
    numbers = sorted(r.number for r in rows)
    # No number twice. Optuna may skip a number: a proposal drawn for a number the other worker took is
    # dropped (it came from that number's seed), so the two never train one configuration.
    assert len(set(numbers)) == len(numbers) == 8
    assert all(r.attempt == 1 for r in rows)
    with db.read_session() as session:
        registered = set(session.scalars(select(Worker.id)))
    assert len(registered) == 2 and {r.worker_id for r in rows} <= registered  # which one won is not the point
    started = [json.loads(line) for p in logs for line in p.read_text().splitlines()
               if line.startswith("{") and "trial started" in line]
    assert sorted(e["trial"] for e in started) == numbers  # each trial started exactly once
    db.dispose()
