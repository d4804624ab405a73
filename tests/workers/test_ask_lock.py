"""Samplers that coordinate through the storage (QMC counts its draws in a study attribute) ask one worker
at a time: two workers asking at once must not be handed the same draw."""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

import pytest
from optuna.storages import RDBStorage

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.lifecycle import OptunaTell
from app.models import TrialState
from tests.factories import create_study_via_service
from workers import leasing, optuna_sync
from workers.attempt import Slot, bind
from workers.prepared import PreparedStudies


def test_two_workers_asking_a_qmc_study_at_once_get_different_draws(
        settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    sid = create_study_via_service(db, settings, sampler={"name": "qmc", "seed": 1},
                                   budget={"n_trials": 4, "max_parallel": 2})
    # Two workers: each its own prepared study (its own Optuna study object and sampler).
    slots = [Slot(db, settings, f"w{i}", PreparedStudies(db, settings), mp.get_context("fork"), 1, lambda: False)
             for i in range(2)]
    prepared = [s.studies.get(sid) for s in slots]
    first = leasing.claim_trial(db, worker_id="w0", device="cpu", trial_deadline_s=600)
    done = bind(slots[0], first, prepared[0])  # type: ignore[arg-type]
    assert done is not None and done.optuna_trial_id is not None
    leasing.finish_trial(db, done, state=TrialState.COMPLETE, value=0.5, values=[0.5])
    optuna_sync.tell(optuna_storage(db.url), [OptunaTell(done.optuna_trial_id, TrialState.COMPLETE, [0.5])],
                     prepared[0].optuna_study)
    # From here QMC draws from its sequence, counting draws in a study attribute.
    leases = [leasing.claim_trial(db, worker_id=f"w{i}", device="cpu", trial_deadline_s=600) for i in range(2)]
    both_read = threading.Barrier(2)
    read_attrs = RDBStorage.get_study_system_attrs

    def read_together(self: RDBStorage, study_id: int) -> Any:
        """QMC reads its draw count here: let two askers read it at the same moment, if both may."""
        attrs = read_attrs(self, study_id)
        try:
            both_read.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass  # the other asker is held by the lock: it reads after this one wrote
        return attrs

    monkeypatch.setattr(RDBStorage, "get_study_system_attrs", read_together)
    bound: list[Any] = [None, None]

    def ask(i: int) -> None:
        bound[i] = bind(slots[i], leases[i], prepared[i])  # type: ignore[arg-type]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(b is not None for b in bound)
    assert bound[0].params != bound[1].params
