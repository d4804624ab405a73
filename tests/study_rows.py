"""Trials written through the real queue functions and Optuna, without training: fast studies with known rows.

Each trial is claimed, bound to an Optuna trial with sampled parameters, reports its epochs and finishes,
exactly as a worker would record it; `finalize` ends the study with test metrics as a worker would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml.space import sample_params
from app.models import Study, TrialState
from app.services.importance import study_space
from workers import closing, leasing

WORKER = "test-worker"


@dataclass(frozen=True)
class Outcome:
    """How a trial ends: its state, the objective per epoch, and an error for failed ones."""

    state: TrialState
    curve: list[float]
    error: str | None = None


OutcomeFn = Callable[[int, dict[str, Any]], Outcome]


def default_outcome(number: int, params: dict[str, Any]) -> Outcome:
    """Accuracy driven by the learning rate; every 4th trial pruned after one epoch, every 7th failed."""
    final = round(0.9 - abs(params.get("learning_rate", 0.01) - 0.01) * 5, 6)
    if number % 7 == 6:
        return Outcome(TrialState.FAIL, [], error="trial process died (exit code -9)")
    if number % 4 == 3:
        return Outcome(TrialState.PRUNED, [final * 0.5])
    return Outcome(TrialState.COMPLETE, [final * 0.6, final * 0.9, final][-3:])


def write_trials(db: Database, settings: Settings, *, study_id: str, n: int,
                 outcome: OutcomeFn = default_outcome, seed: int = 0) -> list[int]:
    """Run n trials of the study through the queue; returns their numbers."""
    with db.read_session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        owner, spec, optuna_name = study.owner, study.config, study.optuna_name
    resolved = study_space(db, settings, owner=owner, spec=spec)
    assert resolved is not None
    ostudy = optuna.load_study(study_name=optuna_name, storage=optuna_storage(db.url),
                               sampler=optuna.samplers.RandomSampler(seed=seed))
    numbers = []
    for _ in range(n):
        lease = leasing.claim_trial(db, worker_id=WORKER, device="cpu", trial_deadline_s=600)
        assert lease is not None, "the study has no room for another trial"
        trial = ostudy.ask()
        params = sample_params(trial, resolved)
        lease = leasing.bind_trial(db, lease, number=trial.number, optuna_trial_id=trial._trial_id,
                                   params=params)
        result = outcome(trial.number, params)
        _record(db, lease, trial, result, params)
        numbers.append(trial.number)
    return numbers


def _record(db: Database, lease: leasing.Lease, trial: optuna.Trial, result: Outcome,
            params: dict[str, Any]) -> None:
    for epoch, value in enumerate(result.curve, start=1):  # workers number epochs from 1
        leasing.record_epoch(db, lease, epoch=epoch, train_loss=1.0 - value, val_loss=1.1 - value,
                             val_metric=value, learning_rate=params.get("learning_rate"), seconds=0.01)
        trial.report(value, epoch)
    study = trial.study
    if result.state is TrialState.COMPLETE:
        value = result.curve[-1]
        assert leasing.finish_trial(db, lease, state=TrialState.COMPLETE, value=value, values=[value],
                                    metrics={"val_accuracy": value, "val_loss": 1.1 - value},
                                    epochs_run=len(result.curve), best_epoch=len(result.curve))
        study.tell(trial, value)
    elif result.state is TrialState.PRUNED:
        assert leasing.finish_trial(db, lease, state=TrialState.PRUNED, value=result.curve[-1],
                                    epochs_run=len(result.curve))
        study.tell(trial, state=OptunaState.PRUNED)
    else:
        assert leasing.finish_trial(db, lease, state=TrialState.FAIL, error=result.error)
        study.tell(trial, state=OptunaState.FAIL)


def finalize(db: Database, *, test_metrics: dict[str, Any] | None = None) -> str:
    """End the study whose budget is spent, as a worker's finalization does; returns its id."""
    job = closing.claim_finalization(db, worker_id=WORKER)
    assert job is not None, "no study is ready to finalize"
    closing.complete_study(db, job, worker_id=WORKER, test_metrics=test_metrics or {"test_accuracy": 0.91})
    return job.study_id
