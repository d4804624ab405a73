"""A solo trial whose runner or worker dies resumes from its last recorded checkpoint: real worker processes,
real SIGKILLs. The resumed trial ends exactly as the same trial run without a kill (same study seed and trial
number), on the same Optuna trial, each epoch recorded once; a checkpoint that cannot be read is passed over
with the reason on the trial, never a crash loop."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.models import Trial, TrialEpoch, TrialState
from tests.conftest import make_settings
from tests.factories import GRACE_S, HEARTBEAT_S, client_for, create_study_via_api
from tests.integration.processes import (
    alive,
    children_of,
    optuna_trials,
    processes,
    start_worker,
    study_status,
    training_spec,
    trials_of,
    wait_until,
)

EPOCHS = 12
EVERY = 3  # checkpoint_every


def _setup(db_url: str, tmp_path: Path) -> tuple[Database, TestClient, Settings]:
    settings = make_settings(db_url, tmp_path / "home").model_copy(
        update={"heartbeat_interval_s": HEARTBEAT_S, "lease_grace_s": GRACE_S})
    db = Database(db_url)
    return db, client_for(settings, db), settings


def _spec() -> dict[str, object]:
    spec = training_spec(EPOCHS, n_trials=1, max_parallel=1, max_attempts=2)
    spec["checkpoint_every"] = EVERY
    return spec


def _run_to_end(db: Database, settings: Settings, sid: str, log: Path) -> None:
    with processes() as procs:
        procs.append(start_worker(settings, log))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")
    assert study_status(db, sid) == "completed"


def _checkpointed_mid_run(db: Database, sid: str) -> Trial | None:
    """The running trial once a checkpoint of it is recorded and epochs remain to train."""
    rows = [t for t in trials_of(db, sid) if t.state == TrialState.RUNNING.value and t.checkpoint_epoch]
    return rows[0] if rows and rows[0].checkpoint_epoch < EPOCHS else None


def _kill_after_a_checkpoint(db: Database, settings: Settings, sid: str, procs: list[subprocess.Popen[bytes]],
                             tmp_path: Path, kill: str) -> Trial:
    """Start a worker on the study and SIGKILL its runner (`kill="runner"`) or the whole worker, with its
    orphaned runner gone too, once a checkpoint is recorded mid-run; the trial as it was then."""
    procs.append(start_worker(settings, tmp_path / "w0.log"))
    before = wait_until(lambda: _checkpointed_mid_run(db, sid), 120, "a checkpoint recorded mid-run")
    (runner,) = children_of(procs[0].pid)
    os.kill(procs[0].pid if kill == "worker" else runner, signal.SIGKILL)
    if kill == "worker":
        procs[0].wait(10)
        wait_until(lambda: not alive(runner), 10, "the orphaned runner to die")
    return before


def _curve(db: Database, row: Trial) -> list[tuple[int, float, float, float]]:
    with db.read_session() as session:
        return [(e.epoch, e.train_loss, e.val_loss, e.val_metric) for e in session.scalars(
            select(TrialEpoch).where(TrialEpoch.trial_id == row.id, TrialEpoch.attempt == row.attempt)
            .order_by(TrialEpoch.epoch))]


def _only_trial(db: Database, sid: str) -> Trial:
    rows = trials_of(db, sid)
    assert len(rows) == 1, rows
    return rows[0]


def _assert_same_trial_as(db: Database, resumed: Trial, reference: Trial, optuna_trial_id: int | None) -> None:
    """Same parameters, curve and final weights as the uninterrupted run; one Optuna trial, each epoch once."""
    assert resumed.state == reference.state == TrialState.COMPLETE.value
    assert resumed.params == reference.params
    got, want = _curve(db, resumed), _curve(db, reference)
    assert [e[0] for e in got] == list(range(1, EPOCHS + 1))
    assert [v for e in got for v in e] == pytest.approx([v for e in want for v in e], abs=1e-6)
    assert resumed.value == pytest.approx(reference.value, abs=1e-6)
    weights, expected = (load_file(f"{r.artifact}.safetensors") for r in (resumed, reference))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6)
    (theirs,) = optuna_trials(db, resumed.study_id)  # no fresh Optuna trial for the resumed attempt
    assert theirs._trial_id == resumed.optuna_trial_id == optuna_trial_id
    assert theirs.state.name.lower() == TrialState.COMPLETE.value
    assert sorted(theirs.intermediate_values) == list(range(1, EPOCHS + 1))
    assert [theirs.intermediate_values[e[0]] for e in got] == pytest.approx([e[3] for e in got], abs=1e-6)


def _assert_keeps_only_its_newest_checkpoint(settings: Settings, ended: Trial) -> None:
    """A completed trial (kept by the default keep_checkpoints, best_k) keeps its last checkpoint, that of its
    last epoch, written by its last attempt: on its row and on disk, and nothing else (no older epoch, not the
    first attempt's folder)."""
    assert settings.artifact_dir is not None
    assert ended.checkpoint_epoch == EPOCHS
    assert ended.checkpoint_path == f"{ended.study_id}/checkpoints/trial-{ended.number}-{ended.attempt}/" \
                                    f"epoch-{EPOCHS:06d}.safetensors"
    files = [p for p in (settings.artifact_dir / ended.study_id / "checkpoints").rglob("*") if p.is_file()]
    assert files == [settings.artifact_dir / ended.checkpoint_path]
    assert files[0].stat().st_size == ended.checkpoint_bytes


@pytest.mark.parametrize("kill", ["runner", "worker"])
def test_a_killed_trial_resumes_from_its_checkpoint_and_ends_as_if_never_killed(
        db_url: str, tmp_path: Path, kill: str) -> None:
    """`runner`: the trial's process dies, its worker lives and puts it back in line; `worker`: the whole
    worker dies, the reaper of another worker process re-queues the trial, which resumes there."""
    db, client, settings = _setup(db_url, tmp_path)
    reference_id = create_study_via_api(client, _spec())
    _run_to_end(db, settings, reference_id, tmp_path / "reference.log")

    sid = create_study_via_api(client, _spec())
    with processes() as procs:
        before = _kill_after_a_checkpoint(db, settings, sid, procs, tmp_path, kill)
        if kill == "worker":
            procs.append(start_worker(settings, tmp_path / "w1.log"))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")

    resumed = _only_trial(db, sid)
    assert before.attempt == 1 and resumed.attempt == 2, resumed.error
    assert resumed.number == before.number
    _assert_same_trial_as(db, resumed, _only_trial(db, reference_id), before.optuna_trial_id)
    _assert_keeps_only_its_newest_checkpoint(settings, resumed)


def test_a_truncated_checkpoint_is_passed_over_with_the_reason_recorded(db_url: str, tmp_path: Path) -> None:
    db, client, settings = _setup(db_url, tmp_path)
    reference_id = create_study_via_api(client, _spec())
    _run_to_end(db, settings, reference_id, tmp_path / "reference.log")

    sid = create_study_via_api(client, _spec())
    with processes() as procs:
        before = _kill_after_a_checkpoint(db, settings, sid, procs, tmp_path, "worker")
        recorded = _only_trial(db, sid)  # the last one recorded before the kill
        assert settings.artifact_dir is not None and recorded.checkpoint_path is not None
        path = settings.artifact_dir / recorded.checkpoint_path
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        procs.append(start_worker(settings, tmp_path / "w1.log"))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")

    resumed = _only_trial(db, sid)
    assert resumed.attempt == 2
    assert resumed.error is not None and \
        f"checkpoint of epoch {recorded.checkpoint_epoch} unusable (corrupt" in resumed.error, resumed.error
    # An older checkpoint or none (from scratch): the same trial either way, each epoch recorded once.
    _assert_same_trial_as(db, resumed, _only_trial(db, reference_id), before.optuna_trial_id)
    _assert_keeps_only_its_newest_checkpoint(settings, resumed)
