"""Asking Optuna for a trial's parameters with one database write instead of two per hyperparameter.

A plain `study.ask()` plus one `suggest_*` per hyperparameter on RDB storage costs a write per parameter and,
with TPE's constant_liar, a read of the study's trials per parameter: ~30 round trips per trial for the
documented space. Samplers that keep no state in the storage (TPE, random) propose the same configuration
here from memory, and the new trial is written once, with all its parameters. Other samplers (CMA-ES keeps
its state in trial attributes, grid and QMC coordinate through the storage) take Optuna's own path.

What the sampler sees is a bounded window of the study (`TrialWindow`): every running trial, the best
finished ones and the latest ones, read incrementally by SQL, never the whole study. Its cost and memory
stay flat at 100,000 trials, while TPE's good group (its 25 best trials) is exactly the full history's.
Trials keep their real numbers, so Hyperband's brackets, which hash the number, group them as a direct
ask would.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages._rdb import models as om
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState
from sqlalchemy import func, select

from app.ml.space import sample_params, sampled_distributions

MIRRORED_SAMPLERS = (optuna.samplers.TPESampler, optuna.samplers.RandomSampler)
# The window a proposal sees in a large study: the best finished trials by each objective, the latest ones,
# and every running trial. Below BEST_TRIALS + RECENT_TRIALS trials it is the whole history.
BEST_TRIALS = 100
RECENT_TRIALS = 900
HYPERBAND_BRACKETS = 4  # the best trials are kept per bracket, about: Hyperband's brackets split the history
_mirrors: weakref.WeakKeyDictionary[optuna.Study, StudyMirror] = weakref.WeakKeyDictionary()
_mirrors_lock = threading.Lock()


def ask_trial(study: optuna.Study, storage: BaseStorage, resolved: dict[str, Any],
              fixed: dict[str, Any] | None = None) -> tuple[int, int, dict[str, Any]]:
    """A new RUNNING trial of `study`: (number, Optuna trial id, every parameter of the configuration).

    `fixed` holds an enqueued configuration's values; the sampler decides the rest. Callers serialize
    calls per study (the mirror is not thread-safe); `storage` is the study's RDB storage.
    """
    if type(study.sampler) not in MIRRORED_SAMPLERS or not isinstance(storage, RDBStorage):
        return _ask_directly(study, storage, resolved, fixed)
    with _mirrors_lock:
        mirror = _mirrors.get(study)
        if mirror is None:
            mirror = _mirrors[study] = StudyMirror(study, storage)
    return mirror.ask(storage, resolved, fixed)


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
    """Proposals for one Optuna study from a bounded window of its trials, sampled by the study's sampler."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        self.study = study
        self.sampler = WindowedSampler(study.sampler)
        self.directions = list(study.directions)
        study_id = storage.get_study_id_from_name(study.study_name)
        best, recent = window_size(study)
        self.window = TrialWindow(storage, study_id, self.directions, best=best, recent=recent)

    def ask(self, storage: BaseStorage, resolved: dict[str, Any],
            fixed: dict[str, Any] | None) -> tuple[int, int, dict[str, Any]]:
        self.window.sync()
        trials = self.window.trials()
        if any(t.state == OptunaState.WAITING for t in trials):
            return _ask_directly(self.study, storage, resolved, fixed)  # enqueued through Optuna itself
        number = self.window.next_number()
        scratch = _WindowStudy(self.study.study_name, self.directions, self.sampler,
                               _same_bracket(self.study, trials, number))
        self.sampler.use(scratch, number)
        if fixed is not None:
            scratch.enqueue_trial(fixed, skip_if_exists=False)
        params = sample_params(scratch.ask(), resolved)
        trial_id = _create_running(storage, self.window.study_id, resolved, params)
        # Usually the number the proposal was sampled as; another worker may have taken it meanwhile.
        return storage.get_trial_number_from_id(trial_id), trial_id, params


def window_size(study: optuna.Study) -> tuple[int, int]:
    """(best, recent) finished trials a proposal sees. TPE's good group is at most its 25 best trials
    (Optuna's default gamma), so the window's best trials hold it whole, per Hyperband bracket; random
    search reads no history (one recent trial keeps the numbering)."""
    if isinstance(study.sampler, optuna.samplers.RandomSampler):
        return 0, 1
    brackets = HYPERBAND_BRACKETS if isinstance(study.pruner, optuna.pruners.HyperbandPruner) else 1
    return BEST_TRIALS * brackets, RECENT_TRIALS


def _same_bracket(study: optuna.Study, trials: list[FrozenTrial], number: int) -> list[FrozenTrial]:
    """Under Hyperband a sampler sees only the trials of the new trial's bracket, as Optuna's ask does."""
    pruner = study.pruner
    if not isinstance(pruner, optuna.pruners.HyperbandPruner):
        return trials
    bracket = pruner._get_bracket_id(study, _Numbered(number))  # type: ignore[arg-type]
    return [t for t in trials if pruner._get_bracket_id(study, t) == bracket]


class _Numbered:
    """What Hyperband's bracket hash reads of a trial: its number."""

    def __init__(self, number: int) -> None:
        self.number = number


class WindowedSampler(optuna.samplers.BaseSampler):
    """Hands a sampler a view of the study that holds a bounded window of its trials.

    The window (see `TrialWindow`) holds the best finished trials, the most recent ones and every trial
    still running, with their real numbers; the proposal being asked carries its real number too, so TPE's
    constant liar leaves out only itself and Hyperband's brackets hash the numbers a direct ask would.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner
        self._view: optuna.Study | None = None
        self._number = 0

    def use(self, view: optuna.Study, number: int) -> None:
        """The study view and the real number of the trial about to be asked."""
        self._view, self._number = view, number

    def _args(self, study: optuna.Study, trial: FrozenTrial) -> tuple[optuna.Study, FrozenTrial]:
        assert self._view is not None
        renumbered = copy.copy(trial)  # the scratch trial under the number the database will give it
        renumbered.number = self._number
        return self._view, renumbered

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(*self._args(study, trial))

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.inner.sample_relative(*self._args(study, trial), search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(*self._args(study, trial), param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(*self._args(study, trial))

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class _WindowStudy(optuna.Study):
    """A scratch study for one proposal whose trial list is the window (bracket-filtered for Hyperband).

    Its own in-memory storage holds only the proposal being asked (and an enqueued configuration's
    fixed values); samplers read trials through `_get_trials`, which answers from the window.
    """

    def __init__(self, name: str, directions: list[StudyDirection], sampler: WindowedSampler,
                 trials: list[FrozenTrial]) -> None:
        storage = InMemoryStorage()
        storage.create_new_study(directions, study_name=name)
        super().__init__(study_name=name, storage=storage, sampler=sampler, pruner=optuna.pruners.NopPruner())
        self._window = trials

    def get_trials(self, deepcopy: bool = True, states: Container[OptunaState] | None = None) -> list[FrozenTrial]:
        return [t for t in self._window if states is None or t.state in states]

    def _get_trials(self, deepcopy: bool = True, states: Container[OptunaState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        return self.get_trials(deepcopy, states)


class TrialWindow:
    """The trials of one Optuna study a windowed sampler sees, kept up to date from SQL in small reads.

    It holds every trial not finished (RUNNING for constant liar, WAITING), the `best` finished trials by
    each objective, and the `recent` latest trials. A finished trial that leaves the window can never
    belong to it again (a better one outranks it, newer ones follow it), so the window updated
    incrementally equals the window computed from the whole history. Below `best + recent` trials it is
    the whole history. Reads: once at the start, three queries by index; then each sync reads only trials
    created since and the open ones, by primary key.
    """

    def __init__(self, storage: RDBStorage, study_id: int, directions: list[StudyDirection], *, best: int,
                 recent: int) -> None:
        self.storage, self.study_id, self.directions = storage, study_id, directions
        self.best, self.recent = best, recent
        self._trials: dict[int, FrozenTrial] = {}  # by Optuna trial id
        self._last_id = -1
        self._loaded = False

    def trials(self) -> list[FrozenTrial]:
        return sorted(self._trials.values(), key=lambda t: t.number)

    def next_number(self) -> int:
        return max((t.number for t in self._trials.values()), default=-1) + 1

    def sync(self) -> None:
        if not self._loaded:
            ids, self._last_id = self._initial_ids()
            self._loaded = True
        else:
            ids = {i for i, t in self._trials.items() if not t.state.is_finished()}
        for trial in self.storage._get_trials(self.study_id, None, ids, self._last_id):
            self._trials[trial._trial_id] = trial
            self._last_id = max(self._last_id, trial._trial_id)
        self._trim()

    def _initial_ids(self) -> tuple[set[int], int]:
        """Ids of the window's trials as of the newest trial id, read by SQL without loading any trial."""
        t, v = om.TrialModel, om.TrialValueModel
        with self.storage.engine.connect() as conn:
            last, total = conn.execute(select(func.max(t.trial_id), func.count())
                                       .where(t.study_id == self.study_id)).one()
            if last is None or total <= self.recent:
                return set(), -1  # the window is the whole study: read every trial
            ids = set(conn.scalars(select(t.trial_id).where(t.study_id == self.study_id)
                                   .order_by(t.trial_id.desc()).limit(self.recent)))
            ids.update(conn.scalars(select(t.trial_id).where(
                t.study_id == self.study_id, t.state.in_([OptunaState.RUNNING, OptunaState.WAITING]))))
            for objective, direction in enumerate(self.directions):
                order = v.value.desc() if direction == StudyDirection.MAXIMIZE else v.value.asc()
                ids.update(conn.scalars(
                    select(t.trial_id).join(v, v.trial_id == t.trial_id)
                    .where(t.study_id == self.study_id, t.state == OptunaState.COMPLETE,
                           v.objective == objective, v.value_type == om.TrialValueModel.TrialValueType.FINITE)
                    .order_by(order, t.trial_id).limit(self.best)))
        return ids, int(last)

    def _trim(self) -> None:
        """Drop finished trials that are neither among the best nor among the recent ones."""
        keep = {i for i, t in self._trials.items() if not t.state.is_finished()}
        keep.update(sorted(self._trials, reverse=True)[:self.recent])
        complete = [t for t in self._trials.values() if t.state == OptunaState.COMPLETE and t.values]
        for objective, direction in enumerate(self.directions):
            sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
            ranked = sorted((t for t in complete if math.isfinite(t.values[objective])),
                            key=lambda t: (sign * t.values[objective], t._trial_id))
            keep.update(t._trial_id for t in ranked[:self.best])
        for trial_id in [i for i in self._trials if i not in keep]:
            del self._trials[trial_id]
