"""Stop criteria in the SQL queue: judged on complete trials, and the timeout ends running trials on request."""

from __future__ import annotations

from datetime import timedelta

import optuna
import pytest
from sqlalchemy import update

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml.space import Context, resolve_space
from app.models import Study, TrialState
from app.models.base import utcnow
from app.schemas.study import StudySpec
from app.services import studies
from tests.factories import create_study_via_service, study_spec
from workers import closing, leasing
from workers.asking import ask_trial, open_study
from workers.search import make_sampler


def _finish(db: Database, number: int, state: TrialState, value: float | None) -> str | None:
    """One trial claimed, bound and finished as a worker would; the stop verdict that follows."""
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert lease is not None
    lease = leasing.bind_trial(db, lease, number=number, optuna_trial_id=1000 + number, params={})
    finished = leasing.finish_trial(db, lease, state=state, value=value) if lease is not None else None
    assert finished is not None
    return finished.stop_reason


def test_target_value_ignores_pruned_trials(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 10, "max_parallel": 1}, stop={"target_value": 0.8})
    assert _finish(db, 0, TrialState.PRUNED, 0.95) is None  # a pruned trial's last epoch is not a result
    assert _finish(db, 1, TrialState.COMPLETE, 0.7) is None
    assert _finish(db, 2, TrialState.COMPLETE, 0.85) == "target_value"


def test_no_improvement_counts_pruned_trials_as_not_improving(db: Database, settings: Settings) -> None:
    create_study_via_service(db, settings, budget={"n_trials": 10, "max_parallel": 1},
                             stop={"no_improvement_trials": 2})
    # Had the pruned 0.99 been the best, neither complete trial after it would improve on it.
    outcomes = [(TrialState.COMPLETE, 0.5), (TrialState.PRUNED, 0.99), (TrialState.COMPLETE, 0.6),
                (TrialState.COMPLETE, 0.7)]
    assert [_finish(db, n, state, value) for n, (state, value) in enumerate(outcomes)] == [None] * 4
    assert _finish(db, 4, TrialState.FAIL, None) is None
    assert _finish(db, 5, TrialState.PRUNED, 0.99) == "no_improvement"


@pytest.mark.parametrize("running,verdict", [("cancel", "stop"), ("finish", "ok")])
def test_the_timeout_stops_running_trials_only_when_asked(db: Database, settings: Settings, running: str,
                                                          verdict: str) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 5, "timeout_s": 3600}, stop={"running": running})
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert lease is not None
    lease = leasing.bind_trial(db, lease, number=0, optuna_trial_id=1, params={})
    assert lease is not None

    def epoch(n: int) -> str:
        return leasing.record_epoch(db, lease, epoch=n, train_loss=1.0, val_loss=1.0, val_metric=0.5,
                                    learning_rate=0.01, seconds=0.1)

    assert epoch(0) == "ok"
    deadline = utcnow() - timedelta(seconds=1)
    with db.session() as session:
        session.execute(update(Study).where(Study.id == sid).values(deadline_at=deadline))
    assert epoch(1) == verdict
    assert leasing.claim_trial(db, worker_id="w2", device="cpu", trial_deadline_s=600) is None
    assert leasing.finish_trial(db, lease, state=TrialState.FAIL, error="stopped")
    job = closing.claim_finalization(db, worker_id="w1")
    assert job is not None and job.reason == "timeout"
    closing.complete_study(db, job, worker_id="w1", test_metrics=None)
    study = studies.get_study(db, owner="alice", study_id=sid)
    assert study.stop_reason == "timeout" and study.stopped_at == deadline


SPACE = resolve_space({"learning_rate": {"low": 1e-4, "high": 1e-1, "log": True}, "units": {"low": 8, "high": 256},
                       "optimizer": {"choices": ["adam", "momentum", "sgd"]}}, Context("mlp"))


@pytest.mark.parametrize("name", ["cmaes", "gp", "qmc", "nsga2"])
def test_model_based_samplers_keep_a_partial_configuration_and_fill_the_rest(sqlite_url: str, name: str) -> None:
    """Optuna's enqueue semantics, on the samplers the worker asks without its mirror."""
    options = {"n_startup_trials": 2} if name in ("cmaes", "gp") else {"population_size": 2} if name == "nsga2" else {}
    spec = StudySpec.model_validate(study_spec(sampler={"name": name, "seed": 1, **options}))
    sampler = make_sampler(spec, SPACE)
    storage = optuna_storage(sqlite_url)
    optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study = open_study(storage, name, sampler, optuna.pruners.NopPruner())
    fixed = {"units": 100, "optimizer": "sgd"}
    for turn in range(5):  # past the startup trials, so the model proposes the rest
        number, _trial_id, params = ask_trial(study, SPACE, fixed if turn % 2 else None)
        if turn % 2:
            assert {k: params[k] for k in fixed} == fixed and "learning_rate" in params
        study.tell(number, -abs(params["units"] - 100) / 100)
