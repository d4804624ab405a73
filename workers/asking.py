"""Asking Optuna for a trial's parameters with one database write instead of two per hyperparameter.

A plain `study.ask()` plus one `suggest_*` per hyperparameter on RDB storage costs a write per parameter and,
with TPE's constant_liar, a read of the study's trials per parameter: ~30 round trips per trial for the
documented space. Samplers that keep no state in the storage (TPE, random) can propose the same
configuration from an in-memory mirror of the study: trials are read once (incrementally, through Optuna's
cached storage) and the new trial is written once, with all its parameters. Other samplers (CMA-ES keeps its
state in trial attributes, grid and QMC coordinate through the storage) take Optuna's own path.

The mirror keeps Optuna's numbering (trial n there is trial n in the database), so Hyperband's brackets,
which hash the trial number, see the same trials as a direct ask would.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState

from app.ml.space import sample_params, sampled_distributions

RACES_BEFORE_GIVING_UP = 3  # asks that lost their number to another worker before one is kept as it is
MIRRORED_SAMPLERS = (optuna.samplers.TPESampler, optuna.samplers.RandomSampler)
_mirrors: weakref.WeakKeyDictionary[optuna.Study, StudyMirror] = weakref.WeakKeyDictionary()
_mirrors_lock = threading.Lock()


def ask_trial(study: optuna.Study, storage: BaseStorage, resolved: dict[str, Any],
              fixed: dict[str, Any] | None = None, seed: int | None = None) -> tuple[int, int, dict[str, Any]]:
    """A new RUNNING trial of `study`: (number, Optuna trial id, every parameter of the configuration).

    `fixed` holds an enqueued configuration's values; the sampler decides the rest. With a study `seed`,
    the sampler draws trial n from a seed derived from (seed, n): the same seed gives the same proposals by
    number, and workers that share it never replay one sequence. Callers serialize calls per study (the
    mirror is not thread-safe); `storage` is the study's RDB storage.
    """
    if seed is None and isinstance(study.sampler, optuna.samplers.GridSampler):
        seed = 0  # Optuna's grid seeds itself with 0 when given none: every worker would pick the same point
    if type(study.sampler) not in MIRRORED_SAMPLERS:
        return _ask_directly(study, storage, resolved, fixed, seed)
    with _mirrors_lock:
        mirror = _mirrors.get(study)
        if mirror is None:
            mirror = _mirrors[study] = StudyMirror(study)
    return mirror.ask(storage, resolved, fixed, seed)


def trial_seed(seed: int, number: int) -> int:
    """The seed a study's sampler draws trial `number` from."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def reseed(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed every random state of `sampler` and of the samplers it falls back on (TPE's start-up random
    sampler, CMA-ES's independent one...), where its own `reseed_rng()` would seed them from the clock.

    QMC's scramble seed is left alone: every worker must draw from one sequence.
    """
    for index, value in enumerate(vars(sampler).values()):
        if isinstance(value, LazyRandomState):
            value.rng.seed(trial_seed(seed, index))
        elif isinstance(value, optuna.samplers.BaseSampler):
            reseed(value, trial_seed(seed, index))


def retry_trial(study: optuna.Study, storage: BaseStorage, failed_trial_id: int) -> int:
    """A fresh RUNNING Optuna trial with the parameters of `failed_trial_id`, for another attempt.

    As Optuna's RetryFailedTrialCallback does: the new trial carries the old one's parameters, user and system
    attributes (a grid point stays the same point) plus `failed_trial` and `retry_history`, and none of its
    intermediate values, so the pruner judges the new attempt on its own curve. One write.
    """
    old = storage.get_trial(failed_trial_id)
    attrs: dict[str, Any] = {"failed_trial": old.number, "retry_history": [], **old.system_attrs}
    attrs["retry_history"] = [*attrs["retry_history"], old.number]
    template = optuna.trial.create_trial(state=OptunaState.RUNNING, params=old.params,
                                         distributions=old.distributions, user_attrs=old.user_attrs,
                                         system_attrs=attrs)
    return storage.create_new_trial(storage.get_study_id_from_name(study.study_name), template_trial=template)


def finishes_directly(study: optuna.Study) -> bool:
    """Whether `finish_trial` may stand in for `study.tell`: TPE and random search without constraints do
    nothing in `after_trial`, so one state write is all a tell does for them."""
    return type(study.sampler) in MIRRORED_SAMPLERS and getattr(study.sampler, "_constraints_func", None) is None


def finish_trial(study: optuna.Study, trial_id: int, state: OptunaState, values: list[float] | None) -> None:
    """Finish a COMPLETE or FAIL trial with one write; `study.tell` first reads the running trial back.

    Callers check the values (finite, one per objective) as `tell` would; a trial already finished (by
    the reaper, say) is left as it is, like `tell(skip_if_finished=True)`.
    """
    assert state in (OptunaState.COMPLETE, OptunaState.FAIL) and finishes_directly(study)
    try:
        study._storage.set_trial_state_values(trial_id, state, values if state == OptunaState.COMPLETE else None)
    except UpdateFinishedTrialError:
        pass


def _ask_directly(study: optuna.Study, storage: BaseStorage, resolved: dict[str, Any],
                  fixed: dict[str, Any] | None, seed: int | None = None) -> tuple[int, int, dict[str, Any]]:
    """study.ask(), with the trial created first so that the sampler is seeded by its number.

    Written through the study's own (cached) storage, which must know every trial a suggest writes to.
    """
    storage = study._storage
    study_id = study._study_id
    if fixed is not None:
        trial_id = _create_running(storage, study_id, resolved, fixed, study.sampler)
    else:
        waiting = study._pop_waiting_trial_id()  # enqueued through Optuna itself
        trial_id = waiting if waiting is not None else storage.create_new_trial(study_id)
    try:
        number = storage.get_trial_number_from_id(trial_id)
        if seed is not None:
            reseed(study.sampler, trial_seed(seed, number))
        study._thread_local.cached_all_trials = None  # as ask() does: the sampler reads the trials afresh
        trial = optuna.Trial(study, trial_id)
        return number, trial_id, sample_params(trial, resolved)
    except BaseException:
        storage.set_trial_state_values(trial_id, OptunaState.FAIL)
        raise


def _create_running(storage: BaseStorage, study_id: int, resolved: dict[str, Any],
                    params: dict[str, Any], sampler: optuna.samplers.BaseSampler | None = None) -> int:
    """One write: a RUNNING trial holding every sampled parameter of `params`."""
    dists: dict[str, BaseDistribution] = sampled_distributions(resolved, params)
    sampled = {k: v for k, v in params.items() if k in dists}
    template = optuna.trial.create_trial(state=OptunaState.RUNNING, params=sampled, distributions=dists,
                                         system_attrs=_grid_point(sampler, sampled))
    return storage.create_new_trial(study_id, template_trial=template)


def _grid_point(sampler: optuna.samplers.BaseSampler | None, params: dict[str, Any]) -> dict[str, Any]:
    """A grid trial's attributes for a configuration given in full: the grid point it is, so the grid counts
    that point as taken (and no other), as Optuna's enqueue_trial arranges for its own grid."""
    if not isinstance(sampler, optuna.samplers.GridSampler):
        return {}
    names = sampler._param_names
    for grid_id, point in enumerate(sampler._all_grids):
        if all(name in params and params[name] == value for name, value in zip(names, point, strict=True)):
            return {"grid_id": grid_id, "search_space": sampler._search_space}
    return {"fixed_params": params}  # off the grid: the grid neither assigns nor counts a point for it


class StudyMirror:
    """An in-memory copy of one Optuna study that its own sampler and pruner can sample against."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._storage: InMemoryStorage | None = None
        self._study: optuna.Study | None = None
        self._finished: list[bool] = []  # by trial number: the mirror holds that trial's final state

    def ask(self, storage: BaseStorage, resolved: dict[str, Any], fixed: dict[str, Any] | None,
            seed: int | None = None) -> tuple[int, int, dict[str, Any]]:
        for race in range(RACES_BEFORE_GIVING_UP):
            mirror = self._synced()
            if mirror is None:  # the study holds trials the mirror cannot stand in for
                return _ask_directly(self.study, storage, resolved, fixed, seed)
            if seed is not None:  # the proposal's number is the mirror's next one
                reseed(self.study.sampler, trial_seed(seed, len(self._finished)))
            if fixed is not None:
                mirror.enqueue_trial(fixed, skip_if_exists=False)
            proposal = mirror.ask()
            params = sample_params(proposal, resolved)
            try:
                study_id = storage.get_study_id_from_name(self.study.study_name)
                trial_id = _create_running(storage, study_id, resolved, params)
                # A light lookup by number: another worker may have taken the proposal's number meanwhile.
                ours = storage.get_trial_id_from_study_id_trial_number(study_id, proposal.number) == trial_id
            except BaseException:
                self._storage = None  # the proposal never reached the database: start over next time
                raise
            if ours:
                self._finished.append(False)  # the proposal now stands for the database's trial
                return proposal.number, trial_id, params
            self._storage = None  # the numbers went apart: rebuild the mirror before the next proposal
            if seed is None or race == RACES_BEFORE_GIVING_UP - 1:
                return storage.get_trial_number_from_id(trial_id), trial_id, params
            # Drawn from the seed of a number another worker took, and likely its very configuration: drop it.
            storage.set_trial_state_values(trial_id, OptunaState.FAIL)
        raise AssertionError("unreachable: the last race returns")

    def _synced(self) -> optuna.Study | None:
        """The mirror study, updated with every trial added or finished in the database since last time."""
        trials = self.study.get_trials(deepcopy=False)  # Optuna's cached storage reads only what changed
        if any(t.state == OptunaState.WAITING for t in trials):
            return None  # enqueued through Optuna itself: the mirror would pop it twice
        if self._storage is None or len(trials) < len(self._finished):
            self._rebuild()
        assert self._storage is not None
        study_id = self._storage.get_study_id_from_name(self.study.study_name)
        for trial in trials:
            if trial.number >= len(self._finished):
                self._storage.create_new_trial(study_id, template_trial=trial)
                self._finished.append(trial.state.is_finished())
            elif not self._finished[trial.number]:
                self._update(study_id, trial)
        return self._study

    def _rebuild(self) -> None:
        self._storage = InMemoryStorage()
        self._study = optuna.create_study(storage=self._storage, study_name=self.study.study_name,
                                          directions=self.study.directions, sampler=self.study.sampler,
                                          pruner=self.study.pruner)
        self._finished = []

    def _update(self, study_id: int, trial: FrozenTrial) -> None:
        """Bring the mirror's running copy up to date: parameters set since, then curve and final state."""
        assert self._storage is not None
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        known = self._storage.get_trial(trial_id).params
        for name, value in trial.params.items():
            if name not in known:
                dist = trial.distributions[name]
                self._storage.set_trial_param(trial_id, name, dist.to_internal_repr(value), dist)
        if not trial.state.is_finished():
            return
        for step, value in trial.intermediate_values.items():
            self._storage.set_trial_intermediate_value(trial_id, step, value)
        for key, value in trial.system_attrs.items():
            self._storage.set_trial_system_attr(trial_id, key, value)
        self._storage.set_trial_state_values(trial_id, trial.state, trial.values)
        self._finished[trial.number] = True
