"""Asking through the windowed storage: a plain study.ask() whose new trial is written in two short writes.

It must propose what Optuna's own ask on its own storage would, keep Optuna's numbering, and see other
workers' trials.
"""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState as OptunaState

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml.space import Context, resolve_space, sample_params
from app.schemas.study import StudySpec
from app.services import enqueue, studies
from tests.factories import study_spec
from workers import asking, leasing
from workers.asking import ask_trial
from workers.attempt import Slot, bind
from workers.prepared import PreparedStudies
from workers.search import SeededByTrial

SPACE_SPEC = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
              "units": {"type": "int", "low": 8, "high": 256},
              "optimizer": {"type": "categorical", "choices": ["adam", "momentum", "sgd"]}}
SPACE = resolve_space(SPACE_SPEC, Context("mlp"))


def _objective(params: dict[str, Any]) -> float:
    return -abs(params["units"] - 100) / 100 - abs(params["learning_rate"] - 0.01)


def _optuna_study(url: str, name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """The study as a worker opens it, on the windowed storage."""
    optuna.create_study(study_name=name, storage=optuna_storage(url), direction="maximize", load_if_exists=True)
    return asking.open_study(optuna_storage(url), name, sampler, optuna.pruners.NopPruner())


def _optunas_own(study: optuna.Study, resolved: dict[str, Any], fixed: Any = None) -> tuple[int, int, dict[str, Any]]:
    trial = study.ask()
    return trial.number, -1, sample_params(trial, resolved)


def _run(study: optuna.Study, n: int, ask: Any) -> list[tuple[int, dict[str, Any]]]:
    proposals = []
    for _ in range(n):
        number, _trial_id, params = ask(study, SPACE, None)
        study.tell(number, _objective(params))
        proposals.append((number, params))
    return proposals


@pytest.mark.parametrize("seed", [None, 11])
@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_the_windowed_ask_proposes_what_optunas_own_ask_would(db_url: str, sampler: str, seed: int | None) -> None:
    def build(s: int) -> optuna.samplers.BaseSampler:
        if sampler == "tpe":
            return optuna.samplers.TPESampler(seed=s, n_startup_trials=4, multivariate=True, group=True,
                                              constant_liar=True)
        return optuna.samplers.RandomSampler(seed=s)

    def make() -> optuna.samplers.BaseSampler:
        return build(3) if seed is None else SeededByTrial(build, seed)

    own = optuna.create_study(study_name=f"direct-{sampler}", storage=optuna_storage(db_url), sampler=make(),
                              direction="maximize")
    direct = _run(own, 12, _optunas_own)
    mirrored_study = _optuna_study(db_url, f"mirrored-{sampler}", make())
    mirrored = _run(mirrored_study, 12, ask_trial)
    assert mirrored == direct
    stored = optuna.load_study(study_name=mirrored_study.study_name, storage=optuna_storage(db_url)).trials
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
        number, trial_id, params = ask_trial(study, SPACE)
        assert storage.get_trial_number_from_id(trial_id) == number
        proposed[number] = params
        if turn % 3 != 2:  # some trials stay RUNNING: the other worker's sampler must see them too
            study.tell(number, _objective(params))
    assert list(proposed) == list(range(8))
    stored = {t.number: t.params for t in optuna.load_study(study_name="shared", storage=storage).trials}
    assert stored == proposed  # every parameter written with the trial, in one go


def test_an_enqueued_configuration_is_proposed_with_its_fixed_values(db_url: str) -> None:
    study = _optuna_study(db_url, "fixed", optuna.samplers.TPESampler(seed=0))
    fixed = {"learning_rate": 0.02, "units": 64, "optimizer": "momentum"}
    number, trial_id, params = ask_trial(study, SPACE, fixed)
    assert {k: params[k] for k in fixed} == fixed and "momentum" in params  # the sampler fills the rest
    assert optuna_storage(db_url).get_trial(trial_id).params == params


def test_telling_by_id_stores_what_tell_would_and_leaves_finished_trials_alone(db_url: str) -> None:
    told = _optuna_study(db_url, "told", optuna.samplers.TPESampler(seed=0))
    by_id = _optuna_study(db_url, "by-id", optuna.samplers.TPESampler(seed=0))
    for state, values in ((OptunaState.COMPLETE, [0.75]), (OptunaState.FAIL, None)):
        number, _, _ = ask_trial(told, SPACE)
        told.tell(number, values, state=state)
        number, trial_id, _ = ask_trial(by_id, SPACE)
        asking.tell(by_id, trial_id, state, values)
        a, b = told.trials[-1], by_id.trials[-1]
        assert (b.state, b.values, b.params) == (a.state, a.values, a.params)
        assert b.datetime_complete is not None
    asking.tell(by_id, trial_id, OptunaState.COMPLETE, [0.1])  # finished already: kept as it was
    assert by_id.trials[-1].state == OptunaState.FAIL
    assert by_id.best_value == 0.75


def test_a_parameter_whose_distribution_changed_is_refused_before_any_trial_is_written(db_url: str) -> None:
    """As Optuna refuses a suggest whose distribution is incompatible with an earlier record of the name."""
    study = _optuna_study(db_url, "changed", optuna.samplers.RandomSampler(seed=0))  # reads no history itself
    _run(study, 3, ask_trial)
    changed = resolve_space({**SPACE_SPEC, "units": {"type": "categorical", "choices": [8, 16, 32]}}, Context("mlp"))
    with pytest.raises(ValueError, match="incompatible|Cannot set different distribution"):
        ask_trial(study, changed)
    assert len(optuna.load_study(study_name="changed", storage=optuna_storage(db_url)).trials) == 3


def _bound_configurations(db: Database, settings: Settings, study_id: str, workers: int, n: int) -> dict[int, Any]:
    """n trials bound in turn by `workers` supervisors, each with its own prepared study: {number: params}."""
    slots = [Slot(db, settings, f"w{i}", PreparedStudies(db, settings), None, 1, lambda: False)
             for i in range(workers)]
    out = {}
    for i in range(n):
        slot = slots[i % workers]
        lease = leasing.claim_trial(db, worker_id=slot.worker_id, device="cpu", trial_deadline_s=600)
        assert lease is not None
        bound = bind(slot, lease, slot.studies.get(study_id))
        assert bound is not None and bound.number is not None
        out[bound.number] = bound.params
    return out


@pytest.mark.parametrize("sampler", ["random", "tpe", "grid"])
def test_workers_sharing_a_seed_never_replay_it_and_the_seed_reproduces_the_study(
        settings: Settings, db: Database, sampler: str) -> None:
    def create() -> str:
        grid = {"optimizer": "adam", "dropout": 0.0, "weight_decay": 0.0, "batch_size": 64, "activation": "relu",
                "batch_norm": "none", "weight_init": "he_normal", "lr_schedule": "constant", "layer_shape": "constant",
                "learning_rate": 0.01, "units": {"type": "int", "low": 32, "high": 40}}  # 18 points with n_layers
        spec = StudySpec.model_validate(study_spec(sampler={"name": sampler, "seed": 5},
                                                   search_space=grid if sampler == "grid" else {},
                                                   budget={"n_trials": 8, "max_parallel": 8}))
        return studies.create_study(db, settings, owner="alice", spec=spec)[0].id

    two_workers = _bound_configurations(db, settings, create(), workers=2, n=8)
    configs = [json.dumps(p, sort_keys=True) for p in two_workers.values()]
    assert len(set(configs)) == len(configs) == 8
    assert _bound_configurations(db, settings, create(), workers=1, n=8) == two_workers


GRID_FIXED = {"optimizer": "adam", "units": 32, "n_layers": 1, "dropout": 0.0, "weight_decay": 0.0, "batch_size": 64,
              "activation": "relu", "batch_norm": "none", "weight_init": "he_normal", "lr_schedule": "constant",
              "augmentation": "none"}


@pytest.mark.parametrize("enqueued_point", [0, 1, 2, 3])
def test_an_enqueued_grid_configuration_takes_its_own_grid_point(settings: Settings, db: Database,
                                                                 enqueued_point: int) -> None:
    """Every point of a 4-point grid runs once when one of them was enqueued: none is marked taken unrun."""
    space = {**GRID_FIXED, "layer_shape": {"type": "categorical", "choices": ["constant", "funnel"]},
             "learning_rate": {"type": "categorical", "choices": [1e-3, 1e-2]}}
    spec = StudySpec.model_validate(study_spec(sampler={"name": "grid", "seed": 0}, search_space=space,
                                               budget={"n_trials": 4, "max_parallel": 4}))
    sid = studies.create_study(db, settings, owner="alice", spec=spec)[0].id
    shape, rate = divmod(enqueued_point, 2)
    enqueue.enqueue_trial(db, settings, owner="alice", study_id=sid,
                          params={"layer_shape": ["constant", "funnel"][shape], "learning_rate": [1e-3, 1e-2][rate]})
    ran = _bound_configurations(db, settings, sid, workers=1, n=4).values()
    assert sorted((p["layer_shape"], p["learning_rate"]) for p in ran) == [
        ("constant", 1e-3), ("constant", 1e-2), ("funnel", 1e-3), ("funnel", 1e-2)]
