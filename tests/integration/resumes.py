"""What the resume tests share: a study run to its end, a trial's curve, and the check that a trial that was
stopped and continued ends as the same trial run without a stop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.models import Trial, TrialEpoch, TrialState
from tests.conftest import fresh_database, make_settings
from tests.factories import GRACE_S, HEARTBEAT_S, client_for, create_study_via_api
from tests.integration.processes import optuna_trials, processes, start_worker, study_status, trials_of, wait_until


def resume_env(db_url: str, tmp_path: Path) -> tuple[Database, TestClient, Settings]:
    settings = make_settings(db_url, tmp_path / "home").model_copy(
        update={"heartbeat_interval_s": HEARTBEAT_S, "lease_grace_s": GRACE_S})
    db = Database(db_url)
    return db, client_for(settings, db), settings


def run_to_end(db: Database, settings: Settings, sid: str, log: Path) -> None:
    run_all_to_end(db, settings, [sid], log)


def run_all_to_end(db: Database, settings: Settings, sids: list[str], log: Path) -> None:
    """One worker process runs every study of sids to its end (one slot: one trial after the other)."""
    with processes() as procs:
        procs.append(start_worker(settings, log))
        wait_until(lambda: all(study_status(db, sid) in ("completed", "failed") for sid in sids), 180,
                   "the studies to end")
    assert [study_status(db, sid) for sid in sids] == ["completed"] * len(sids)


def reference_database(kind: str, home: Path, sqlite_template: Path, spec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """For a module-scoped fixture: a database of `kind` ("sqlite" or "postgresql") shared by a module's tests,
    and the id of the study of `spec` run to its end in it once, without a stop: the reference that each
    test's stopped and continued trial must end as (same spec, so the same study seed and trial number 0).
    Each test creates its own study in the database, with its own home and worker processes; the reference
    study is complete, so no worker of theirs claims anything of it."""
    databases = fresh_database(kind, home, sqlite_template)
    url = next(databases)
    try:
        db, client, settings = resume_env(url, home)
        reference_id = create_study_via_api(client, spec)
        run_to_end(db, settings, reference_id, home / "reference.log")
        db.dispose()
        yield url, reference_id
    finally:
        databases.close()


def curve(db: Database, row: Trial) -> list[tuple[int, float, float, float]]:
    with db.read_session() as session:
        return [(e.epoch, e.train_loss, e.val_loss, e.val_metric) for e in session.scalars(
            select(TrialEpoch).where(TrialEpoch.trial_id == row.id, TrialEpoch.attempt == row.attempt)
            .order_by(TrialEpoch.epoch))]


def only_trial(db: Database, sid: str) -> Trial:
    rows = trials_of(db, sid)
    assert len(rows) == 1, rows
    return rows[0]


def assert_same_weights_and_curve(db: Database, resumed: Trial, reference: Trial,
                                  epochs: int) -> list[tuple[int, float, float, float]]:
    """Same parameters, value, curve (returned) and final weights as the uninterrupted run, to 1e-6."""
    assert resumed.state == reference.state == TrialState.COMPLETE.value
    assert resumed.params == reference.params
    got, want = curve(db, resumed), curve(db, reference)
    assert [e[0] for e in got] == list(range(1, epochs + 1))
    assert [v for e in got for v in e] == pytest.approx([v for e in want for v in e], abs=1e-6)
    assert resumed.value == pytest.approx(reference.value, abs=1e-6)
    weights, expected = (load_file(f"{r.artifact}.safetensors") for r in (resumed, reference))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6)
    return got


def assert_same_trial_as(db: Database, resumed: Trial, reference: Trial, optuna_trial_id: int | None,
                         epochs: int) -> None:
    """Same parameters, curve and final weights as the uninterrupted run; one Optuna trial, each epoch once."""
    got = assert_same_weights_and_curve(db, resumed, reference, epochs)
    (theirs,) = optuna_trials(db, resumed.study_id)  # no fresh Optuna trial for the resumed attempt
    assert theirs._trial_id == resumed.optuna_trial_id == optuna_trial_id
    assert theirs.state.name.lower() == TrialState.COMPLETE.value
    assert sorted(theirs.intermediate_values) == list(range(1, epochs + 1))
    assert [theirs.intermediate_values[e[0]] for e in got] == pytest.approx([e[3] for e in got], abs=1e-6)
