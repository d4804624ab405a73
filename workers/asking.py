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

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState

from app.ml.space import sample_params, sampled_distributions

MIRRORED_SAMPLERS = (optuna.samplers.TPESampler, optuna.samplers.RandomSampler)
_mirrors: weakref.WeakKeyDictionary[optuna.Study, StudyMirror] = weakref.WeakKeyDictionary()
_mirrors_lock = threading.Lock()


def ask_trial(study: optuna.Study, storage: BaseStorage, resolved: dict[str, Any],
              fixed: dict[str, Any] | None = None) -> tuple[int, int, dict[str, Any]]:
    """A new RUNNING trial of `study`: (number, Optuna trial id, every parameter of the configuration).

    `fixed` holds an enqueued configuration's values; the sampler decides the rest. Callers serialize
    calls per study (the mirror is not thread-safe); `storage` is the study's RDB storage.
    """
    if type(study.sampler) not in MIRRORED_SAMPLERS:
        return _ask_directly(study, storage, resolved, fixed)
    with _mirrors_lock:
        mirror = _mirrors.get(study)
        if mirror is None:
            mirror = _mirrors[study] = StudyMirror(study)
    return mirror.ask(storage, resolved, fixed)


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
                  fixed: dict[str, Any] | None) -> tuple[int, int, dict[str, Any]]:
    study_id = storage.get_study_id_from_name(study.study_name)
    if fixed is not None:
        trial_id = _create_running(storage, study_id, resolved, fixed)
        trial = optuna.Trial(study, trial_id)
    else:
        trial = study.ask()
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    try:
        return trial.number, trial_id, sample_params(trial, resolved)
    except BaseException:
        storage.set_trial_state_values(trial_id, OptunaState.FAIL)
        raise


def _create_running(storage: BaseStorage, study_id: int, resolved: dict[str, Any],
                    params: dict[str, Any]) -> int:
    """One write: a RUNNING trial holding every sampled parameter of `params`."""
    dists: dict[str, BaseDistribution] = sampled_distributions(resolved, params)
    template = optuna.trial.create_trial(state=OptunaState.RUNNING,
                                         params={k: v for k, v in params.items() if k in dists},
                                         distributions=dists)
    return storage.create_new_trial(study_id, template_trial=template)


class StudyMirror:
    """An in-memory copy of one Optuna study that its own sampler and pruner can sample against."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._storage: InMemoryStorage | None = None
        self._study: optuna.Study | None = None
        self._finished: list[bool] = []  # by trial number: the mirror holds that trial's final state

    def ask(self, storage: BaseStorage, resolved: dict[str, Any],
            fixed: dict[str, Any] | None) -> tuple[int, int, dict[str, Any]]:
        mirror = self._synced()
        if mirror is None:  # the study holds trials the mirror cannot stand in for
            return _ask_directly(self.study, storage, resolved, fixed)
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
        return storage.get_trial_number_from_id(trial_id), trial_id, params

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
