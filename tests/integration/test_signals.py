"""Real signals to real worker processes: a frozen worker's late result is refused, SIGTERM hands trials
back at a checkpoint."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from app.core.db import Database, is_sqlite
from app.models import Trial, TrialState
from tests.conftest import make_settings
from tests.factories import GRACE_S, client_for, create_study_via_api, start_worker, study_spec
from tests.integration.processes import (
    assert_study_settled,
    log_lines,
    optuna_trials,
    processes,
    running_with_epochs,
    study_status,
    training_spec,
    trials_of,
    wait_until,
)


def _mine(rows: list[Trial], pid: int) -> list[Trial]:
    """Trials leased by the worker process pid (worker ids are host-pid-random)."""
    return [t for t in rows if t.worker_id and t.worker_id.split("-")[-2] == str(pid)]


def _lease_moved(db: Database, trial: Trial) -> bool:
    now = next(t for t in trials_of(db, trial.study_id) if t.id == trial.id)
    return now.attempt > trial.attempt


def _freeze_outside_a_transaction(proc: subprocess.Popen[bytes], url: str) -> None:
    """SIGSTOP proc at a moment it holds no SQLite write lock. Frozen inside a write transaction, it would
    stop every writer of the file until it resumes: SQLite's nature, not what these tests are about."""
    for _ in range(100):
        proc.send_signal(signal.SIGSTOP)
        if not is_sqlite(url) or _can_write(url):
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the worker always held the write lock")


def _can_write(url: str) -> bool:
    conn = sqlite3.connect(str(make_url(url).database), timeout=0.5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def test_a_worker_frozen_past_the_grace_has_its_late_result_refused_and_survives(db_url: str,
                                                                                 tmp_path: Path) -> None:
    settings = make_settings(db_url, tmp_path / "home")
    db = Database(db_url)
    client = client_for(settings, db)
    spec = training_spec(20, n_trials=3, max_parallel=2, max_attempts=2)
    spec["checkpoint_every"] = 1000  # never: a reaped trial without a checkpoint starts over (test_resume.py)
    sid = create_study_via_api(client, spec)
    logs = [tmp_path / "frozen.log", tmp_path / "other.log"]
    with processes() as procs:
        frozen, other = start_worker(settings, logs[0]), start_worker(settings, logs[1])
        procs += [frozen, other]
        running = wait_until(lambda: running_with_epochs(db, sid, 2), 90, "both workers mid-trial")
        stolen = _mine(running, frozen.pid)[0]
        _freeze_outside_a_transaction(frozen, db_url)
        # The other worker's reaper hands the silent lease to a second attempt.
        wait_until(lambda: _lease_moved(db, stolen), 10 * GRACE_S, "the frozen worker's lease to be reaped")
        frozen.send_signal(signal.SIGCONT)
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 120, "the study to end")
        assert frozen.poll() is None and other.poll() is None  # both survived
    assert study_status(db, sid) == "completed"
    rows = assert_study_settled(db, sid, 3)
    again = next(r for r in rows if r.id == stolen.id)
    assert (again.state, again.attempt, again.params) == (TrialState.COMPLETE.value, 2, stolen.params)
    events = [e for p in logs for e in log_lines(p)]
    lost = [e for e in events if e["msg"].startswith("lease lost")]
    assert [(e["trial"], e["attempt"]) for e in lost] == [(stolen.number, 1)]
    completions = sorted(e["trial"] for e in events if e["msg"].startswith("trial complete"))
    assert completions == sorted(r.number for r in rows)  # each trial counted once
    told = next(t for t in optuna_trials(db, sid) if t._trial_id == again.optuna_trial_id)  # attempt 2's own
    assert told.value == again.value and told.system_attrs["failed_trial"] == stolen.number
    db.dispose()


def test_sigterm_hands_running_trials_back_without_counting_an_attempt(db_url: str, tmp_path: Path) -> None:
    settings = make_settings(db_url, tmp_path / "home")
    db = Database(db_url)
    client = client_for(settings, db)
    spec = study_spec(budget={"n_trials": 4, "epochs": 200, "patience": None, "max_parallel": 2})
    sid = create_study_via_api(client, spec)
    with processes() as procs:
        worker = start_worker(settings, tmp_path / "w.log", per_device=2, args=("--shutdown-grace", "1"))
        procs.append(worker)
        running = wait_until(lambda: running_with_epochs(db, sid, 2), 90, "two trials mid-training")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        rows = trials_of(db, sid)
        assert sorted(r.id for r in rows) == sorted(r.id for r in running)  # nothing claimed after SIGTERM
        for r in rows:
            assert (r.state, r.attempt, r.worker_id) == (TrialState.WAITING.value, 1, None)
        messages = [e["msg"] for e in log_lines(tmp_path / "w.log")]
        assert messages.count("trial handed back at shutdown") == 2 and "worker stopped" in messages

        # Another worker takes them up as the same first attempts, with the same parameters.
        procs.append(start_worker(settings, tmp_path / "w2.log", per_device=2, args=("--shutdown-grace", "0.5")))
        resumed = wait_until(lambda: running_with_epochs(db, sid, 2), 90, "the trials to run again")
        assert {(r.id, r.attempt, r.number) for r in resumed} == {(r.id, 1, r.number) for r in running}
        assert {r.id: r.params for r in resumed} == {r.id: r.params for r in running}
    db.dispose()


def test_sigterm_hands_every_running_trial_back_at_its_next_checkpoint_within_the_grace(
        sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    spec = training_spec(15, n_trials=6, max_parallel=2)
    sid = create_study_via_api(client, spec)
    with processes() as procs:
        worker = start_worker(settings, tmp_path / "w.log", per_device=2, args=("--shutdown-grace", "30"))
        procs.append(worker)
        running = wait_until(lambda: running_with_epochs(db, sid, 2), 90, "two trials mid-training")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    rows = trials_of(db, sid)
    assert sorted(r.id for r in rows) == sorted(r.id for r in running)  # no claim after SIGTERM
    # Neither trial ran to its end nor starts over: each waits at a checkpoint of its last recorded epoch,
    # with no attempt spent, and its Optuna trial still runs for the worker that resumes it.
    assert [(r.state, r.attempt, r.worker_id) for r in rows] == [(TrialState.WAITING.value, 1, None)] * 2
    assert all(r.checkpoint_epoch is not None and 2 <= r.checkpoint_epoch < 15 for r in rows)
    assert {t.number: t.state.name for t in optuna_trials(db, sid)} == {r.number: "RUNNING" for r in rows}
    assert study_status(db, sid) == "running"
    db.dispose()

