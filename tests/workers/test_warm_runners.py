"""Runners that live across trials, in a real supervisor: one slot's trials of one study share one runner
process until `runner_trials` jobs, a leak past the bound, or a runner that died; results stay per trial."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from app.core.config import Settings
from app.core.db import Database
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status
from workers import attempt, warm_runners

TRIALS = 4


def _run_study(settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run a study of TRIALS one-epoch trials on one slot; the pid of each runner forked for it."""
    forked: list[int] = []
    spawn = attempt._spawn

    def counted(slot: attempt.Slot, job: Any) -> Any:
        proc, conn = spawn(slot, job)
        forked.append(proc.pid)
        return proc, conn

    monkeypatch.setattr(attempt, "_spawn", counted)
    client = client_for(settings, db)
    sid = create_study_via_api(client, study_spec(budget={"n_trials": TRIALS, "epochs": 1, "max_parallel": 1}))
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=120)
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert study["status"] == "completed"
    assert [(t["state"], t["attempt"], t["epochs_run"]) for t in trials] == [("complete", 1, 1)] * TRIALS
    return forked


def test_one_runner_serves_a_slots_trials_until_its_job_limit(settings: Settings, db: Database,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(_run_study(settings, db, monkeypatch)) == 1
    assert len(_run_study(settings.model_copy(update={"runner_trials": 3}), db, monkeypatch)) == 2
    assert len(_run_study(settings.model_copy(update={"runner_trials": 1}), db, monkeypatch)) == TRIALS


def test_a_runner_that_grew_past_its_bound_is_replaced(settings: Settings, db: Database,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm_runners, "GROWTH_MB", -1.0)  # any resident memory at all counts as a leak
    assert len(_run_study(settings, db, monkeypatch)) == TRIALS


def test_a_runner_that_died_idle_is_replaced(settings: Settings, db: Database,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while it waits for its next job: that job goes to a new runner, nothing is lost."""
    keep = warm_runners.keep_or_stop

    def kill_when_idle(runner: warm_runners.WarmRunner, **kwargs: Any) -> None:
        keep(runner, **kwargs)
        if runner.proc.is_alive():
            os.kill(runner.proc.pid, signal.SIGKILL)
            runner.proc.join(5)

    monkeypatch.setattr(warm_runners, "keep_or_stop", kill_when_idle)
    assert len(_run_study(settings, db, monkeypatch)) == TRIALS


def test_a_cpu_runner_under_a_memory_limit_serves_one_trial(settings: Settings, db: Database,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A second trial would find less of the limit free than a fresh runner gives it."""
    limited = settings.model_copy(update={"trial_memory_mb": 4096})
    assert len(_run_study(limited, db, monkeypatch)) == TRIALS
