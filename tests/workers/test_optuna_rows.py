"""A new trial written in one short transaction must read back as Optuna's own `create_new_trial` writes it,
and trials created at once, by it and by Optuna, must keep Optuna's numbering: 0, 1, 2... without a gap."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages._rdb import models as om
from optuna.trial import TrialState
from sqlalchemy import func, select

from app.core.optuna_store import optuna_storage
from workers.optuna_rows import create_running

DISTRIBUTIONS = {"learning_rate": FloatDistribution(1e-4, 0.1, log=True), "units": IntDistribution(8, 256, step=8),
                 "optimizer": CategoricalDistribution(["adam", "sgd", None])}
PARAMS = {"learning_rate": 0.003, "units": 64, "optimizer": None}


def test_a_trial_written_in_one_go_reads_back_as_optunas_own(db_url: str) -> None:
    storage = optuna_storage(db_url)
    ours = optuna.create_study(study_name="ours", storage=storage)
    theirs = optuna.create_study(study_name="theirs", storage=storage)
    theirs.enqueue_trial({})  # a first trial, so that numbers are not all 0
    ours.enqueue_trial({})
    template = optuna.trial.create_trial(state=TrialState.RUNNING, params=PARAMS, distributions=DISTRIBUTIONS)
    expected = storage.get_trial(storage.create_new_trial(theirs._study_id, template_trial=template))

    before = datetime.now()
    trial_id, number = create_running(storage, ours._study_id, PARAMS, DISTRIBUTIONS)
    got = storage.get_trial(trial_id)

    assert (number, got.number, got._trial_id) == (1, 1, trial_id)
    for field in ("state", "params", "distributions", "user_attrs", "system_attrs", "intermediate_values",
                  "values", "datetime_complete"):
        assert getattr(got, field) == getattr(expected, field), field
    assert before - timedelta(seconds=1) <= got.datetime_start <= datetime.now()  # local time, as Optuna's
    assert [t.number for t in ours.get_trials(states=(TrialState.RUNNING,))] == [1]


def test_only_the_sampled_parameters_are_optunas(db_url: str) -> None:
    storage = optuna_storage(db_url)
    study = optuna.create_study(study_name="fixed", storage=storage)
    trial_id, _ = create_running(storage, study._study_id, {**PARAMS, "epochs_fixed": 3}, DISTRIBUTIONS)
    assert storage.get_trial(trial_id).params == PARAMS
    trial_id, _ = create_running(storage, study._study_id, {"epochs_fixed": 3}, {})  # nothing sampled
    assert storage.get_trial(trial_id).params == {}
    with storage.engine.connect() as conn:  # and no row without a trial
        assert conn.execute(select(func.count()).select_from(om.TrialParamModel.__table__)).scalar() == len(PARAMS)


def test_a_trial_of_a_study_that_does_not_exist_is_refused(db_url: str) -> None:
    storage = optuna_storage(db_url)
    with pytest.raises(KeyError):
        create_running(storage, 10_000, PARAMS, DISTRIBUTIONS)
    assert storage.get_all_studies() == []


def test_trials_created_at_once_by_it_and_by_optuna_are_numbered_without_gaps(db_url: str) -> None:
    storage = optuna_storage(db_url)
    study = optuna.create_study(study_name="busy", storage=storage)
    created: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def create(ours: bool) -> None:
        try:
            for _ in range(8):
                if ours:
                    created.append(create_running(storage, study._study_id, PARAMS, DISTRIBUTIONS))
                else:
                    trial_id = storage.create_new_trial(study._study_id)
                    created.append((trial_id, storage.get_trial_number_from_id(trial_id)))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=create, args=(i % 4 != 3,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stored = sorted((t._trial_id, t.number) for t in study.get_trials(deepcopy=False))
    assert sorted(created) == stored
    assert [number for _, number in stored] == list(range(32))  # by trial id, as Optuna counts them
