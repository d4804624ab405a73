"""Errors in the supervisor itself, outside any trial's process: counted as attempts, so a study ends."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from app.core.config import Settings
from app.core.db import Database
from tests.app.test_uploads import npz_bytes, upload
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status
from workers import attempt


def test_a_runner_that_cannot_be_forked_fails_its_trials_after_max_attempts(
        settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(slot: attempt.Slot, job: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(attempt, "_spawn", no_memory)
    client = client_for(settings, db)
    spec = study_spec(budget={"n_trials": 1, "epochs": 1, "max_parallel": 1, "max_attempts": 2})
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=60)
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert [(t["state"], t["attempt"]) for t in trials] == [("fail", 2)]
    assert "Cannot allocate memory" in trials[0]["error"] and "2 attempt(s) used" in trials[0]["error"]
    assert study["status"] == "failed" and study["progress"]["fail"] == 1


def test_a_study_whose_data_this_worker_cannot_load_says_so(settings: Settings, db: Database) -> None:
    """No trial was started, so no attempt is spent; the owner reads the reason on the study."""
    client = client_for(settings, db)
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    uploaded = upload(client, "npz", {"file": ("d.npz", npz_bytes(X=x, y=np.arange(40) % 2))}).json()
    spec = {**study_spec(budget={"n_trials": 2, "epochs": 1}), "dataset": uploaded["id"]}
    sid = create_study_via_api(client, spec)
    for stored in (settings.data_dir / "datasets").glob("*.npz"):  # type: ignore[operator]
        stored.unlink()  # as on a worker whose shared folder is not mounted
    with running_supervisor(settings, db, slots=1):
        deadline = time.monotonic() + 60
        while not (study := client.get(f"{API}/studies/{sid}").json())["error"]:
            assert time.monotonic() < deadline, "the study never showed the worker's problem"
            time.sleep(0.2)
    assert study["status"] == "running" and "could not start a trial" in study["error"]
    assert "FileNotFoundError" in study["error"] or "No such file" in study["error"]
    assert client.get(f"{API}/studies/{sid}/trials").json()["count"] == 0


def lone_class_csv() -> bytes:
    """40 rows of classes a and b, and one row of class lone that the fixed test split takes from training."""
    rows = ["f1,f2,label"] + [f"{i},{i % 3},{'lone' if i == 2 else 'ab'[i % 2]}" for i in range(40)]
    return "\n".join(rows).encode()


def test_a_study_whose_dataset_cannot_be_split_fails_with_the_reason(settings: Settings, db: Database) -> None:
    """The split fails the same way on every worker and every retry: the study ends instead of looping."""
    client = client_for(settings, db)
    uploaded = upload(client, "csv", {"file": ("lone.csv", lone_class_csv(), "text/csv")}, label_column="label")
    assert uploaded.status_code == 201, uploaded.text
    spec = {**study_spec(budget={"n_trials": 3, "epochs": 1}), "dataset": uploaded.json()["id"]}
    created = client.post(f"{API}/studies", json=spec)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    with running_supervisor(settings, db, slots=2):
        study = wait_for_status(client, sid, {"completed", "failed", "cancelled"}, timeout_s=60)
    assert study["status"] == "failed" and "lone" in study["error"] and study["finished_at"] is not None
    assert client.get(f"{API}/studies/{sid}/trials").json()["count"] == 0  # no trial was ever bound


def test_a_step_the_database_failed_is_a_warning_and_any_other_error_a_traceback(
        settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A connection PostgreSQL cut (an outage, or a transaction it ended as idle) is the database's state, not
    a bug: a warning line, and the slot serves on; anything else keeps its traceback for whoever debugs it."""
    import logging

    from sqlalchemy.exc import OperationalError

    from workers import leasing

    real = leasing.claim_trial
    failures = [OperationalError("SELECT 1", {}, OSError("server closed the connection unexpectedly")),
                RuntimeError("a bug")]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(leasing, "claim_trial", flaky)
    client = client_for(settings, db)
    sid = create_study_via_api(client, study_spec(budget={"n_trials": 1, "epochs": 1, "max_parallel": 1}))
    with caplog.at_level(logging.WARNING, logger="hpsearch.worker"), running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=60)
    assert study["status"] == "completed"
    failed = [r for r in caplog.records if "failed a step" in r.getMessage()]
    assert [(r.levelno, r.exc_info is not None) for r in failed] == [(logging.WARNING, False), (logging.ERROR, True)]
    assert "server closed the connection unexpectedly" in failed[0].getMessage()
