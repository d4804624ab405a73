"""Crashes lose nothing: killed workers, workers that died before their first heartbeat, hung trials,
non-finite losses and trials over the memory limit; real worker processes and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml.space import sample_params
from app.models import TrialState
from app.schemas.study import StudySpec
from app.services.validation import validate_spec
from tests.conftest import make_settings
from tests.factories import (
    API,
    GRACE_S,
    HEARTBEAT_S,
    client_for,
    create_study_via_api,
    running_supervisor,
    start_worker,
    study_spec,
    wait_for_status,
)
from tests.integration.processes import (
    alive,
    assert_study_settled,
    children_of,
    log_lines,
    optuna_trials,
    processes,
    running_with_epochs,
    study_status,
    training_spec,
    trials_of,
    wait_until,
)
from tests.integration.resumes import curve
from workers import leasing, registry


def _setup(db_url: str, tmp_path: Path, **overrides: object) -> tuple[Database, TestClient, Settings]:
    settings = make_settings(db_url, tmp_path / "home").model_copy(
        update={"heartbeat_interval_s": HEARTBEAT_S, "lease_grace_s": GRACE_S, **overrides})
    db = Database(db_url)
    return db, client_for(settings, db), settings


def test_all_workers_killed_mid_trial_then_a_new_worker_finishes_with_the_same_params(
        db_url: str, tmp_path: Path) -> None:
    db, client, settings = _setup(db_url, tmp_path)
    spec = training_spec(30, n_trials=3, max_parallel=2, max_attempts=2)
    sid = create_study_via_api(client, spec)
    with processes() as procs:
        procs += [start_worker(settings, tmp_path / f"w{i}.log") for i in range(2)]
        running = wait_until(lambda: running_with_epochs(db, sid, 2), 90, "two trials mid-training")
        runners = [c for p in procs for c in children_of(p.pid)]
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(10)
        # The runners die with their supervisor (no orphan keeps training).
        wait_until(lambda: not any(alive(c) for c in runners), 10, "the orphaned runners to die")
        killed = {t.number: t.params for t in running}
        assert all(t.state == TrialState.RUNNING.value for t in trials_of(db, sid) if t.number in killed)

        procs.append(start_worker(settings, tmp_path / "w2.log"))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 120, "the study to end")
    assert study_status(db, sid) == "completed"
    rows = assert_study_settled(db, sid, 3)
    assert all(r.state == TrialState.COMPLETE.value for r in rows)
    by_number = {r.number: r for r in rows}
    for number, params in killed.items():
        assert by_number[number].attempt == 2 and by_number[number].params == params
    assert all(r.attempt == 1 for r in rows if r.number not in killed)
    reaped = [e for e in log_lines(tmp_path / "w2.log") if e["msg"].startswith("reaped trial")]
    assert sorted(int(e["msg"].split()[2]) for e in reaped) == sorted(killed)
    db.dispose()


def test_leases_left_by_a_worker_that_died_before_its_first_heartbeat_are_recovered(
        db_url: str, tmp_path: Path) -> None:
    """A worker that died right after claiming, after asking Optuna, or after binding its parameters."""
    db, client, settings = _setup(db_url, tmp_path)
    spec = study_spec(budget={"n_trials": 3, "epochs": 2, "max_parallel": 3, "max_attempts": 2})
    sid = create_study_via_api(client, spec)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a real pid that no longer runs
    dead_id = f"crashed-{dead.pid}"
    registry.register_worker(db, worker_id=dead_id, hostname="elsewhere", pid=dead.pid, devices=["cpu"], slots=3)
    claim = {"worker_id": dead_id, "device": "cpu", "trial_deadline_s": 3600.0}
    claimed_only = leasing.claim_trial(db, **claim)
    asked_only = leasing.claim_trial(db, **claim)
    bound = leasing.claim_trial(db, **claim)
    assert claimed_only and asked_only and bound
    # What the dead worker did before dying, with the same calls a worker makes.
    ostudy = optuna.load_study(study_name=f"hpsearch-{sid}", storage=optuna_storage(db_url))
    resolved = validate_spec(db, settings, owner="alice", spec=StudySpec.model_validate(spec))
    orphan = ostudy.ask()
    trial = ostudy.ask()
    params = sample_params(trial, resolved)
    storage_study = optuna_storage(db_url).get_study_id_from_name(ostudy.study_name)
    leasing.bind_trial(db, bound, number=trial.number, params=params,
                       optuna_trial_id=optuna_storage(db_url).get_trial_id_from_study_id_trial_number(
                         storage_study, trial.number))

    with processes() as procs:
        procs.append(start_worker(settings, tmp_path / "w.log"))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 120, "the study to end")
    assert study_status(db, sid) == "completed"
    rows = assert_study_settled(db, sid, 3)
    assert all(r.state == TrialState.COMPLETE.value for r in rows)
    retried = next(r for r in rows if r.number == trial.number)
    assert retried.attempt == 2 and retried.params == params and retried.worker_id != dead_id
    assert next(t for t in optuna_trials(db, sid) if t.number == orphan.number).state == optuna.trial.TrialState.FAIL
    assert orphan.number not in {r.number for r in rows}
    db.dispose()


def test_a_hung_trial_is_stopped_at_its_deadline_and_resumes_from_its_checkpoint(sqlite_url: str,
                                                                                 tmp_path: Path) -> None:
    db, client, settings = _setup(sqlite_url, tmp_path)
    # Epochs enough that the trial seen mid-training is still training when its runner is stopped (an epoch
    # takes ~20 ms; with two, it could finish in between and the stopped runner be the next trial's), few
    # enough that the other trial completes well within the deadline.
    spec = study_spec(budget={"n_trials": 2, "epochs": 50, "max_parallel": 1, "trial_timeout_s": 6})
    sid = create_study_via_api(client, spec)
    with processes() as procs:
        worker = start_worker(settings, tmp_path / "w.log")
        procs.append(worker)
        hung = wait_until(lambda: [t for t in running_with_epochs(db, sid, 1) if t.checkpoint_epoch], 60,
                          "a trial mid-training with a checkpoint recorded")[0]
        runner = wait_until(lambda: children_of(worker.pid), 5, "the trial's runner")[0]
        os.kill(runner, signal.SIGSTOP)  # the runner hangs; its supervisor goes on beating for it
        beat = hung.heartbeat_at
        wait_until(lambda: next(t for t in trials_of(db, sid) if t.id == hung.id).heartbeat_at != beat, 5,
                   "a heartbeat for the hung trial")
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 60, "the study to end")
        assert not alive(runner)
        assert worker.poll() is None
    rows = assert_study_settled(db, sid, 2)
    killed = next(r for r in rows if r.id == hung.id)
    # It had checkpoints: stopped at its deadline, it continued from the last one under its next attempt.
    assert (killed.state, killed.attempt) == (TrialState.COMPLETE.value, 2), killed.error
    assert [e[0] for e in curve(db, killed)] == list(range(1, (killed.epochs_run or 0) + 1))  # one curve
    assert [r.state for r in rows if r.id != hung.id] == [TrialState.COMPLETE.value]
    db.dispose()


def test_a_non_finite_loss_fails_that_trial_with_its_reason_and_the_study_continues(sqlite_url: str,
                                                                                     tmp_path: Path) -> None:
    db, client, settings = _setup(sqlite_url, tmp_path)
    spec = study_spec(budget={"n_trials": 2, "epochs": 3, "max_parallel": 1},
                      search_space={"learning_rate": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
                                    "weight_init": {"type": "categorical", "choices": ["he_normal", "normal"]},
                                    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
                                    "batch_norm": "none", "n_layers": 2, "units": 64,
                                    # fixed, so that divergence does not hang on the sampler's draws
                                    "activation": "relu", "lr_schedule": "constant", "dropout": 0.0,
                                    "weight_decay": 0.0, "layer_shape": "constant", "batch_size": 32})
    sid = create_study_via_api(client, spec)
    diverging = {"learning_rate": 10.0, "weight_init": "normal", "optimizer": "sgd"}
    assert client.post(f"{API}/studies/{sid}/trials", json={"params": diverging}).status_code == 201
    sane = {"learning_rate": 0.003, "weight_init": "he_normal", "optimizer": "adam"}
    assert client.post(f"{API}/studies/{sid}/trials", json={"params": sane}).status_code == 201
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=60)
    assert study["status"] == "completed"
    rows = assert_study_settled(db, sid, 2)
    bad, good = sorted(rows, key=lambda r: r.number)
    assert (bad.state, bad.error, bad.attempt) == (TrialState.FAIL.value, "non_finite_loss", 1)
    assert good.state == TrialState.COMPLETE.value and study["best_trial"]["number"] == good.number
    db.dispose()


def test_a_trial_over_the_memory_limit_fails_out_of_memory_after_one_smaller_retry_and_the_next_starts_clean(
        sqlite_url: str, tmp_path: Path) -> None:
    # A grace of its own: the runner filling its memory limit can starve the heartbeat past the 2 s the other
    # tests use, and a reap would spend an attempt this test counts.
    db, client, settings = _setup(sqlite_url, tmp_path, trial_memory_mb=300, lease_grace_s=30.0)
    spec = study_spec(budget={"n_trials": 2, "epochs": 2, "max_parallel": 1, "max_attempts": 3},
                      search_space={"units": {"type": "int", "low": 32, "high": 4096, "log": True},
                                    "n_layers": {"type": "int", "low": 1, "high": 8}, "layer_shape": "constant"})
    sid = create_study_via_api(client, spec)
    # 4096 units x 8 layers: ~0.5 GB of weights, twice that with Adam's state, far over 300 MiB.
    for params in ({"units": 4096, "n_layers": 8}, {"units": 32, "n_layers": 1}):
        assert client.post(f"{API}/studies/{sid}/trials", json={"params": params}).status_code == 201
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=60)
    assert study["status"] == "completed"
    big, small = sorted(assert_study_settled(db, sid, 2), key=lambda r: r.number)
    # Retried once at half its batch size (its weights alone are over the limit), then failed for good.
    batch = big.params["batch_size"]
    assert (big.state, big.failure, big.attempt) == (TrialState.FAIL.value, "out_of_memory", 2)
    assert big.error == f"out_of_memory at batch size {batch}, after a retry at half of {batch * 2}"
    assert small.state == TrialState.COMPLETE.value and small.worker_id == big.worker_id
    db.dispose()


def test_a_final_evaluation_that_fails_ends_the_study_once_with_its_reason(sqlite_url: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A deterministic failure in the evaluation child would fail the same way on every retry."""
    from workers import final_evaluation

    def broken(job: final_evaluation.EnsembleJob) -> dict[str, object]:
        raise ValueError("weights do not match the config")

    monkeypatch.setattr(final_evaluation, "run", broken)  # the forked evaluation child inherits it
    db, client, settings = _setup(sqlite_url, tmp_path)
    sid = create_study_via_api(client, study_spec(budget={"n_trials": 2, "epochs": 1}))
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=60)
    assert study["status"] == "failed" and study["test_metrics"] is None
    assert study["error"].startswith("final evaluation failed: ValueError: weights do not match the config")
    rows = assert_study_settled(db, sid, 2)
    assert all(r.state == TrialState.COMPLETE.value for r in rows)  # every trial's result kept
    assert study["best_trial"]["number"] in {r.number for r in rows}
    db.dispose()
