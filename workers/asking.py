"""Asking Optuna for a trial's parameters: a plain `study.ask()` over a bounded window, written in two short
transactions.

A worker's study is opened on a `WindowedStorage` (workers/window_storage.py): what its sampler reads is a
bounded window of the study, never the whole of it, so an ask's cost and memory stay flat at 100,000
trials. For TPE and random search the window holds every running trial, the best finished ones, the
latest ones and a systematic sample of the rest; TPE's good group (its 25 best trials) is exactly the full
history's. Other samplers (CMA-ES, grid, QMC, GP, NSGA-II) read the whole study, incrementally, as Optuna's
cached storage gives it, and coordinate through the storage: workers ask them one at a time.

The new trial is written in one transaction and its parameters, all at once, in a second one; Optuna's own
write takes three statements per parameter. Trials keep their real numbers, so Hyperband's brackets,
which hash the number, group them as Optuna's own ask does.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState as OptunaState

from app.ml.space import sample_params, sampled_distributions
from workers import pruning
from workers.search import GridSampler, algorithm
from workers.window_storage import WindowedStorage

WINDOWED_SAMPLERS = (optuna.samplers.TPESampler, optuna.samplers.RandomSampler)
# The window a proposal sees in a large study: the best finished trials by each objective, the latest ones,
# a systematic sample of the whole history (every k-th trial by number, so TPE's "bad" density is still
# estimated over every region the search visited), and every running trial. Below SAMPLED_TRIALS trials it
# is the whole history.
BEST_TRIALS = 100
RECENT_TRIALS = 100
SAMPLED_TRIALS = 600
HYPERBAND_BRACKETS = 4  # the best trials are kept per bracket, about: Hyperband's brackets split the history
_storages: weakref.WeakKeyDictionary[optuna.Study, WindowedStorage] = weakref.WeakKeyDictionary()
_storages_lock = threading.Lock()


def open_study(backend: RDBStorage, study_name: str, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The Optuna study a worker asks and tells, its sampler reading a window of the study; its pruner
    judges trials opened by `pruning.trial`. Open studies share nothing: each has its own windows."""
    kind = algorithm(sampler)
    if kind in WINDOWED_SAMPLERS:
        best, recent, sample = window_size(kind, pruner)
        storage = WindowedStorage(backend, best=best, recent=recent, sample=sample)
    else:
        storage = WindowedStorage(backend)  # the whole study, read incrementally
    # The grid counts points over the whole study, as Optuna's own does; under Hyperband Optuna would show
    # a sampler only the new trial's bracket.
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                              pruner=optuna.pruners.NopPruner() if kind is GridSampler else pruner)
    with _storages_lock:
        _storages[study] = storage
    pruning.open_view(study, backend, pruner)
    return study


def storage_of(study: optuna.Study) -> WindowedStorage:
    """The windowed storage of a study `open_study` opened."""
    with _storages_lock:
        storage = _storages.get(study)
    if storage is None:
        raise ValueError(f"study {study.study_name!r} was not opened by workers.asking.open_study")
    return storage


def asks_alone(study: optuna.Study) -> bool:
    """Whether workers must ask `study` one at a time: samplers that coordinate through the storage (the grid's
    free points, CMA-ES's generations, QMC's sequence) would hand two workers the same proposal. TPE and
    random search keep workers apart by themselves (constant liar, per-trial seeds)."""
    return algorithm(study.sampler) not in WINDOWED_SAMPLERS


def window_size(kind: type, pruner: optuna.pruners.BasePruner) -> tuple[int, int, int]:
    """(best, recent, sampled) finished trials a proposal sees. TPE's good group is at most its 25 best
    trials (Optuna's default gamma), so the window's best trials hold it whole, per Hyperband bracket; random
    search reads no history (one recent trial keeps the numbering)."""
    if issubclass(kind, optuna.samplers.RandomSampler):
        return 0, 1, 0
    brackets = HYPERBAND_BRACKETS if isinstance(pruner, optuna.pruners.HyperbandPruner) else 1
    return BEST_TRIALS * brackets, RECENT_TRIALS, SAMPLED_TRIALS


def ask_trial(study: optuna.Study, resolved: dict[str, Any],
              fixed: dict[str, Any] | None = None) -> tuple[int, int, dict[str, Any]]:
    """A new RUNNING trial of `study`: (number, Optuna trial id, every parameter of the configuration).

    `fixed` holds an enqueued configuration's values, written with the trial; the sampler decides the rest.
    Callers serialize calls per study.
    """
    storage = storage_of(study)
    space = {name: dist for name, dist in resolved.items() if isinstance(dist, BaseDistribution)}
    storage.prepare_next(space, fixed, sampled_distributions(resolved, fixed) if fixed is not None else None)
    try:
        trial = study.ask()
    finally:
        storage.clear_next()
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    try:
        params = sample_params(trial, resolved)
        storage.flush()
    except BaseException:
        storage.set_trial_state_values(trial_id, OptunaState.FAIL)
        raise
    return trial.number, trial_id, params


def retry_trial(study: optuna.Study, failed_trial_id: int) -> int:
    """A fresh RUNNING Optuna trial with the parameters of `failed_trial_id`, for another attempt.

    As Optuna's RetryFailedTrialCallback does: the new trial carries the old one's parameters, user and system
    attributes plus `failed_trial` and `retry_history`, and none of its intermediate values, so the pruner
    judges the new attempt on its own curve.
    """
    storage = storage_of(study)
    old = storage.get_trial(failed_trial_id)
    attrs: dict[str, Any] = {"failed_trial": old.number, "retry_history": [], **old.system_attrs}
    attrs["retry_history"] = [*attrs["retry_history"], old.number]
    template = optuna.trial.create_trial(state=OptunaState.RUNNING, params=old.params,
                                         distributions=old.distributions, user_attrs=old.user_attrs,
                                         system_attrs=attrs)
    return storage.create_new_trial(storage.get_study_id_from_name(study.study_name), template_trial=template)


def promoted_trial(study: optuna.Study, paused_trial_id: int, from_epoch: int) -> int:
    """A fresh RUNNING Optuna trial for a trial its scheduler promotes from a rung: the paused one's
    parameters, attributes and curve up to `from_epoch` (the pruner judges the whole curve), and
    `promoted_from` (its number). The paused one ended PRUNED at the rung, and stays so."""
    storage = storage_of(study)
    old = storage.get_trial(paused_trial_id)
    template = optuna.trial.create_trial(
        state=OptunaState.RUNNING, params=old.params, distributions=old.distributions, user_attrs=old.user_attrs,
        system_attrs={**old.system_attrs, "promoted_from": old.number},
        intermediate_values={step: v for step, v in old.intermediate_values.items() if step <= from_epoch})
    return storage.create_new_trial(storage.get_study_id_from_name(study.study_name), template_trial=template)


def extended_trial(storage: BaseStorage, study_name: str, extended_trial_id: int, values: list[float],
                   curve: dict[int, float], epochs: int) -> int:
    """A COMPLETE Optuna trial for a completed trial a client extended: the old one's parameters and
    attributes, the extended run's values and whole curve, and `extends_trial` (the old one's number) with
    `epochs`. A finished Optuna trial takes no new value, so the extended result is a trial of its own; the old
    one stays as the sampler saw it."""
    old = storage.get_trial(extended_trial_id)
    template = optuna.trial.create_trial(
        state=OptunaState.COMPLETE, params=old.params, distributions=old.distributions, values=values,
        intermediate_values=curve, user_attrs={**old.user_attrs, "extends_trial": old.number, "epochs": epochs},
        system_attrs=old.system_attrs)
    return storage.create_new_trial(storage.get_study_id_from_name(study_name), template_trial=template)


def tell(study: optuna.Study, trial_id: int, state: OptunaState, values: list[float] | None) -> None:
    """`study.tell` by Optuna trial id (a retried row's latest trial is not numbered as the row); a trial
    already finished (by the reaper, say) is left as it is, also when that happened during the tell."""
    number = storage_of(study).get_trial_number_from_id(trial_id)
    try:
        study.tell(number, values if state == OptunaState.COMPLETE else None, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:
        pass
