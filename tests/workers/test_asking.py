"""The in-memory mirror that asks TPE and random search with one database write per trial.

It must propose what Optuna's own ask would, keep Optuna's numbering, and see other workers' trials.
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.trial import TrialState as OptunaState

from app.core.optuna_store import optuna_storage
from app.ml.space import Context, resolve_space
from workers.asking import _ask_directly, ask_trial, finish_trial, finishes_directly

SPACE = resolve_space({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                       "units": {"type": "int", "low": 8, "high": 256},
                       "optimizer": {"type": "categorical", "choices": ["adam", "momentum", "sgd"]}},
                      Context("mlp"))


def _objective(params: dict[str, Any]) -> float:
    return -abs(params["units"] - 100) / 100 - abs(params["learning_rate"] - 0.01)


def _optuna_study(url: str, name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=optuna_storage(url), sampler=sampler,
                               direction="maximize", load_if_exists=True)


def _run(study: optuna.Study, url: str, n: int, ask: Any) -> list[tuple[int, dict[str, Any]]]:
    proposals = []
    for _ in range(n):
        number, _trial_id, params = ask(study, optuna_storage(url), SPACE, None)
        study.tell(number, _objective(params))
        proposals.append((number, params))
    return proposals


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_the_mirror_proposes_what_optunas_own_ask_would(db_url: str, sampler: str) -> None:
    def make() -> optuna.samplers.BaseSampler:
        if sampler == "tpe":
            return optuna.samplers.TPESampler(seed=3, n_startup_trials=4, multivariate=True, group=True,
                                              constant_liar=True)
        return optuna.samplers.RandomSampler(seed=3)

    direct = _run(_optuna_study(db_url, f"direct-{sampler}", make()), db_url, 12, _ask_directly)
    mirrored_study = _optuna_study(db_url, f"mirrored-{sampler}", make())
    mirrored = _run(mirrored_study, db_url, 12, ask_trial)
    assert mirrored == direct
    stored = mirrored_study.get_trials(deepcopy=False)
    assert [(t.number, t.params) for t in stored] == [(n, {k: p[k] for k in t.params}) for (n, p), t
                                                      in zip(mirrored, stored, strict=True)]
    assert all(t.state == OptunaState.COMPLETE for t in stored)


def test_two_workers_mirrors_keep_optunas_numbering_and_see_each_others_trials(db_url: str) -> None:
    """Two Study objects stand for two workers asking the same study in turns."""
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, constant_liar=True)
    first = _optuna_study(db_url, "shared", sampler)
    second = _optuna_study(db_url, "shared", optuna.samplers.TPESampler(seed=1, n_startup_trials=2, constant_liar=True))
    storage = optuna_storage(db_url)
    proposed: dict[int, dict[str, Any]] = {}
    for turn in range(8):
        study = first if turn % 2 == 0 else second
        number, trial_id, params = ask_trial(study, storage, SPACE)
        assert storage.get_trial_number_from_id(trial_id) == number
        proposed[number] = params
        if turn % 3 != 2:  # some trials stay RUNNING: the other worker's sampler must see them too
            study.tell(number, _objective(params))
    assert list(proposed) == list(range(8))
    stored = {t.number: t.params for t in first.get_trials(deepcopy=False)}
    assert stored == proposed  # every parameter written with the trial, in one go


def test_an_enqueued_configuration_is_proposed_with_its_fixed_values(db_url: str) -> None:
    study = _optuna_study(db_url, "fixed", optuna.samplers.TPESampler(seed=0))
    fixed = {"learning_rate": 0.02, "units": 64, "optimizer": "momentum"}
    number, trial_id, params = ask_trial(study, optuna_storage(db_url), SPACE, fixed)
    assert {k: params[k] for k in fixed} == fixed and "momentum" in params  # the sampler fills the rest
    assert optuna_storage(db_url).get_trial(trial_id).params == params


def test_finishing_directly_stores_what_tell_would_and_leaves_finished_trials_alone(db_url: str) -> None:
    storage = optuna_storage(db_url)
    told = _optuna_study(db_url, "told", optuna.samplers.TPESampler(seed=0))
    direct = _optuna_study(db_url, "direct", optuna.samplers.TPESampler(seed=0))
    assert finishes_directly(direct)
    assert not finishes_directly(_optuna_study(db_url, "cma", optuna.samplers.CmaEsSampler(seed=0)))
    for state, values in ((OptunaState.COMPLETE, [0.75]), (OptunaState.FAIL, None)):
        number, _, _ = ask_trial(told, storage, SPACE)
        told.tell(number, values, state=state)
        number, trial_id, _ = ask_trial(direct, storage, SPACE)
        finish_trial(direct, trial_id, state, values)
        a, b = told.trials[-1], direct.trials[-1]
        assert (b.state, b.values, b.params) == (a.state, a.values, a.params)
        assert b.datetime_complete is not None
    finish_trial(direct, trial_id, OptunaState.COMPLETE, [0.1])  # finished already: kept as it was
    assert direct.trials[-1].state == OptunaState.FAIL
    assert direct.best_value == 0.75
