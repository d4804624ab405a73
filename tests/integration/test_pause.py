"""A client pauses a running trial and resumes it later; a worker stopped gracefully hands its trial back
checkpointed. Real worker processes: the trial stops at an epoch boundary with a checkpoint of that very
epoch, frees its slot, keeps its Optuna trial and attempt, and once resumed ends exactly as the same trial run
without a stop (same study seed and trial number), each epoch recorded once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.models import Trial, TrialState
from tests.factories import create_study_via_api
from tests.integration.processes import (
    optuna_trials,
    processes,
    start_worker,
    study_status,
    training_spec,
    trials_of,
    wait_until,
)
from tests.integration.resumes import assert_same_trial_as, curve, only_trial, reference_database, resume_env

EPOCHS = 24  # about 2.5 s of training: a pause asked at epoch 1 lands at epoch 2 or 3
EVERY = 5  # checkpoint_every: a pause between two regular checkpoints writes one of its own


def _spec() -> dict[str, object]:
    spec = training_spec(EPOCHS, n_trials=1, max_parallel=1, max_attempts=1)
    spec["checkpoint_every"] = EVERY
    return spec


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           sqlite_template: Path) -> Iterator[tuple[str, str]]:
    """(database URL, reference study id): the uninterrupted run of _spec(), made once per database for every
    test here; each test runs its own study of the same spec in that database and stops it."""
    yield from reference_database(request.param, tmp_path_factory.mktemp("pause"), sqlite_template, _spec())


def _running_with_an_epoch(db, sid: str) -> Trial | None:  # type: ignore[no-untyped-def]
    rows = [t for t in trials_of(db, sid) if t.state == TrialState.RUNNING.value and t.number is not None]
    return rows[0] if rows and curve(db, rows[0]) else None


def _assert_parked_at_its_checkpoint(db, parked: Trial, state: TrialState) -> None:  # type: ignore[no-untyped-def]
    """Stopped at a boundary: the checkpoint is of the last recorded epoch, nothing trained since is lost, and
    its Optuna trial still runs (it continues there)."""
    assert parked.state == state.value and parked.attempt == 1, parked.error
    epochs = [e[0] for e in curve(db, parked)]
    assert parked.checkpoint_epoch is not None and 1 < parked.checkpoint_epoch < EPOCHS
    assert epochs == list(range(1, parked.checkpoint_epoch + 1))
    assert parked.worker_id is None and parked.pause_requested_at is None
    (theirs,) = optuna_trials(db, parked.study_id)
    assert theirs.state.name == "RUNNING" and theirs._trial_id == parked.optuna_trial_id


def test_a_paused_trial_waits_with_its_checkpoint_and_resumes_as_if_never_paused(shared: tuple[str, str],
                                                                                  tmp_path: Path) -> None:
    db_url, reference_id = shared
    db, client, settings = resume_env(db_url, tmp_path)

    sid = create_study_via_api(client, _spec())
    with processes() as procs:
        procs.append(start_worker(settings, tmp_path / "w0.log"))
        running = wait_until(lambda: _running_with_an_epoch(db, sid), 120, "the trial's first epoch")
        answer = client.post(f"/api/v1/studies/{sid}/trials/{running.number}/pause")
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == "running" and answer.json()["pause_requested_at"] is not None
        wait_until(lambda: only_trial(db, sid).state == TrialState.PAUSED.value, 60, "the trial to pause")
        paused = only_trial(db, sid)
        _assert_parked_at_its_checkpoint(db, paused, TrialState.PAUSED)
        assert settings.artifact_dir is not None and paused.checkpoint_path is not None
        assert (settings.artifact_dir / paused.checkpoint_path).is_file()
        assert study_status(db, sid) == "running"  # the study waits for its paused trial
        listed = client.get(f"/api/v1/studies/{sid}").json()["progress"]
        assert (listed["paused"], listed["running"], listed["finished"]) == (1, 0, 0)

        assert client.post(f"/api/v1/studies/{sid}/trials/{running.number}/resume").status_code == 200
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")

    resumed = only_trial(db, sid)
    assert resumed.attempt == 1  # a pause spends no attempt
    assert_same_trial_as(db, resumed, only_trial(db, reference_id), running.optuna_trial_id, EPOCHS)
    refused = client.post(f"/api/v1/studies/{sid}/trials/{running.number}/pause")
    assert refused.status_code == 409
    assert "cannot pause a complete trial: it has ended" in refused.json()["detail"]


def test_a_worker_stopped_gracefully_hands_its_trial_back_checkpointed_and_the_next_one_resumes_it(
        shared: tuple[str, str], tmp_path: Path) -> None:
    db_url, reference_id = shared
    db, client, settings = resume_env(db_url, tmp_path)

    sid = create_study_via_api(client, _spec())
    with processes() as procs:
        procs.append(start_worker(settings, tmp_path / "w0.log"))
        running = wait_until(lambda: _running_with_an_epoch(db, sid), 120, "the trial's first epoch")
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(60) == 0
        _assert_parked_at_its_checkpoint(db, only_trial(db, sid), TrialState.WAITING)
        procs.append(start_worker(settings, tmp_path / "w1.log"))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")

    resumed = only_trial(db, sid)
    assert resumed.attempt == 1  # a shutdown is not the trial's failure
    assert_same_trial_as(db, resumed, only_trial(db, reference_id), running.optuna_trial_id, EPOCHS)
