"""A worker's heartbeat set holds each lease it runs, keyed by attempt: a slot whose lease was reaped and
re-claimed by another slot of the same worker must not drop the other slot's lease when it ends."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.core.config import Settings
from app.core.db import Database
from app.models import Trial
from app.models.base import utcnow
from tests.factories import create_study_via_service
from workers import leasing, retries, supervisor
from workers.supervisor import Supervisor


def test_a_slot_that_lost_its_lease_leaves_the_next_attempts_lease_beating(
        settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 1, "max_parallel": 1, "max_attempts": 3})
    worker = Supervisor(db, settings, devices=["cpu"], per_device=2, worker_id="w1")
    entered = {1: threading.Event(), 2: threading.Event()}
    leave = {1: threading.Event(), 2: threading.Event()}

    def attempt(_slot: Any, lease: leasing.Lease, _device: str) -> None:  # stands in for binding and training
        if lease.number is None:
            leasing.bind_trial(db, lease, number=0, optuna_trial_id=1, params={"units": 32})
        entered[lease.attempt].set()
        assert leave[lease.attempt].wait(30)

    monkeypatch.setattr(supervisor, "run_attempt", attempt)
    first = threading.Thread(target=worker._step, args=("cpu",))
    first.start()
    assert entered[1].wait(30)
    with db.session() as session:  # this worker looked dead for a moment: the reaper re-queues the trial
        session.execute(update(Trial).values(heartbeat_at=utcnow() - timedelta(seconds=600)))
    assert [r.requeued for r in retries.reap(db, grace_s=5)] == [True]
    second = threading.Thread(target=worker._step, args=("cpu",))  # the other slot takes attempt 2
    second.start()
    assert entered[2].wait(30)
    leave[1].set()  # the first slot's attempt ends
    first.join(30)
    held = sorted(worker._active)
    leave[2].set()
    second.join(30)
    assert [attempt for _trial, attempt in held] == [2]  # attempt 2 still beats
