"""The windowed storage behind a worker's study: Optuna's own ask through it, in two short writes, and
nothing it holds is lost or written out of order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from sqlalchemy import event

from app.core.optuna_store import optuna_storage
from app.ml.space import Context, resolve_space, sample_params
from workers import asking, optuna_private

SPACE = resolve_space({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                       "units": {"type": "int", "low": 8, "high": 256},
                       "optimizer": {"type": "categorical", "choices": ["adam", "momentum", "sgd"]}},
                      Context("mlp"))


def _study(url: str, name: str) -> optuna.Study:
    optuna.create_study(study_name=name, storage=optuna_storage(url), direction="maximize")
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True, group=True,
                                         constant_liar=True)
    return asking.open_study(optuna_storage(url), name, sampler, optuna.pruners.NopPruner())


@contextmanager
def _writes(url: str) -> Iterator[list[str]]:
    """The INSERT and UPDATE statements sent to Optuna's database meanwhile (a multi-row insert counts once)."""
    engine = optuna_private.engine(optuna_storage(url))
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            seen.append(" ".join(statement.split()[:3]))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_an_ask_writes_the_trial_then_all_its_parameters_at_once(db_url: str) -> None:
    study = _study(db_url, "short")
    for _ in range(4):  # past TPE's startup trials, so its relative parameters are shared too
        number, _, params = asking.ask_trial(study, SPACE)
        study.tell(number, 0.5)
    with _writes(db_url) as writes:
        number, trial_id, params = asking.ask_trial(study, SPACE)
    assert writes.count("INSERT INTO trials") == 1 and writes.count("INSERT INTO trial_params") == 1
    assert len(writes) <= 3, writes  # the trial, its parameters, TPE's relative ones: none per parameter
    stored = optuna_storage(db_url).get_trial(trial_id)
    assert stored.number == number and stored.params == {k: params[k] for k in stored.params}
    assert set(stored.params) == {k for k, d in SPACE.items() if isinstance(d, optuna.distributions.BaseDistribution)
                                  and k in params}


def test_held_parameters_reach_the_database_before_the_trial_reports(db_url: str) -> None:
    """Optuna's cached storage promises as much: a trial's attributes are written before later writes to it."""
    study = _study(db_url, "held")
    trial = study.ask()  # a plain ask: the parameters are held until something writes the trial again
    params = sample_params(trial, SPACE)
    backend = optuna_storage(db_url)
    trial_id = backend.get_trial_id_from_study_id_trial_number(backend.get_study_id_from_name("held"), trial.number)
    assert backend.get_trial(trial_id).params == {}
    trial.report(0.25, 1)
    written = backend.get_trial(trial_id)
    assert written.params == {k: params[k] for k in written.params} and written.params
    assert written.intermediate_values == {1: 0.25}
    study.tell(trial.number, 0.5)
    assert backend.get_trial(trial_id).state == optuna.trial.TrialState.COMPLETE


def test_the_study_reads_its_window_and_the_best_trial_from_the_whole_study(db_url: str,
                                                                          monkeypatch: Any) -> None:
    monkeypatch.setattr(asking, "BEST_TRIALS", 1)
    monkeypatch.setattr(asking, "RECENT_TRIALS", 2)
    monkeypatch.setattr(asking, "SAMPLED_TRIALS", 0)
    study = _study(db_url, "best")
    for value in (0.9, 0.1, 0.2, 0.3, 0.4):
        number, _, _ = asking.ask_trial(study, SPACE)
        study.tell(number, value)
    assert [t.number for t in study.get_trials()] == [0, 3, 4]  # the best, the two latest
    assert study.best_trial.number == 0 and study.best_value == 0.9
