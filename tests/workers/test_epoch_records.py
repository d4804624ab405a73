"""What the service records of an epoch, Optuna records too: the epoch that meets a cancelled study included."""

from __future__ import annotations

import multiprocessing as mp

import optuna

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.services import studies
from tests.factories import create_study_via_service
from workers import leasing
from workers.attempt import Outcome, Slot, _on_epoch, bind
from workers.prepared import PreparedStudies


def test_the_epoch_that_meets_a_cancel_reaches_optuna_as_it_reached_the_trials_row(settings: Settings,
                                                                                      db: Database) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 2, "max_parallel": 1})
    slot = Slot(db, settings, "w1", PreparedStudies(db, settings), mp.get_context("fork"), 1, lambda: False)
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert lease is not None
    p = slot.studies.get(sid)
    bound = bind(slot, lease, p)
    assert bound is not None and bound.optuna_trial_id is not None
    trial = optuna.Trial(p.optuna_study, bound.optuna_trial_id)
    report = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "learning_rate": 0.01, "seconds": 0.1,
              "metrics": {"val_accuracy": 0.4, "val_loss": 0.9}}
    assert _on_epoch(slot, report, bound, trial, p) is None
    studies.change_state(db, owner="alice", study_id=sid, action="cancel")
    ending = _on_epoch(slot, {**report, "epoch": 2, "metrics": {"val_accuracy": 0.5, "val_loss": 0.8}}, bound,
                       trial, p)
    assert ending is not None and ending.outcome is Outcome.FAILED  # the study stopped the trial
    frozen = optuna_storage(db.url).get_trial(bound.optuna_trial_id)
    assert frozen.intermediate_values == {1: 0.4, 2: 0.5}  # as the trial's recorded epochs
