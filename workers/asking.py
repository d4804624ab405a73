"""Asking Optuna for a trial's parameters with one database write instead of two per hyperparameter.

A plain `study.ask()` plus one `suggest_*` per hyperparameter on RDB storage costs a write per parameter and,
with TPE's constant_liar, a read of the study's trials per parameter: ~30 round trips per trial for the
documented space. Samplers that keep no state in the storage (TPE, random) propose the same configuration
here from memory, and the new trial is written once, with all its parameters (`optuna_rows`: four
statements where Optuna's own write takes three per parameter). Other samplers (CMA-ES keeps
its state in trial attributes, grid and QMC coordinate through the storage) take Optuna's own path.

What the sampler sees is a bounded window of the study (`TrialWindow`): every running trial, the best
finished ones, the latest ones and a systematic sample of the rest, read incrementally by SQL, never the
whole study. Its cost and memory stay flat at 100,000 trials, while TPE's good group (its 25 best trials)
is exactly the full history's. Trials keep their real numbers, so Hyperband's brackets, which hash the
number, group them as a direct ask would.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Container
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages._rdb import models as om
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState
from sqlalchemy import func, select

from app.ml.space import sample_params, sampled_distributions
from workers import optuna_rows

RACES_BEFORE_GIVING_UP = 3  # asks that lost their number to another worker before one is kept as it is
MIRRORED_SAMPLERS = (optuna.samplers.TPESampler, optuna.samplers.RandomSampler)
# The window a proposal sees in a large study: the best finished trials by each objective, the latest ones,
# a systematic sample of the whole history (every k-th trial by number, so TPE's "bad" density is still
# estimated over every region the search visited), and every running trial. Below SAMPLED_TRIALS trials it
# is the whole history.
BEST_TRIALS = 100
RECENT_TRIALS = 100
SAMPLED_TRIALS = 600
HYPERBAND_BRACKETS = 4  # the best trials are kept per bracket, about: Hyperband's brackets split the history
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
    if not asks_from_memory(study, storage):
        return _ask_directly(study, storage, resolved, fixed, seed)
    with _mirrors_lock:
        mirror = _mirrors.get(study)
        if mirror is None:
            mirror = _mirrors[study] = StudyMirror(study, storage)
    return mirror.ask(storage, resolved, fixed, seed)


def asks_from_memory(study: optuna.Study, storage: BaseStorage) -> bool:
    """Whether ask_trial proposes from the windowed mirror (TPE, random), which keeps workers apart by itself;
    other samplers coordinate through the storage and need the study's ask lock across workers."""
    return type(study.sampler) in MIRRORED_SAMPLERS and isinstance(storage, RDBStorage)


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
    """Proposals for one Optuna study from a bounded window of its trials, sampled by the study's sampler."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        self.study = study
        self.sampler = WindowedSampler(study.sampler)
        self.directions = list(study.directions)
        study_id = storage.get_study_id_from_name(study.study_name)
        best, recent, sample = window_size(study)
        self.window = TrialWindow(storage, study_id, self.directions, best=best, recent=recent, sample=sample)

    def ask(self, storage: BaseStorage, resolved: dict[str, Any], fixed: dict[str, Any] | None,
            seed: int | None = None) -> tuple[int, int, dict[str, Any]]:
        for race in range(RACES_BEFORE_GIVING_UP):
            self.window.sync()
            trials = self.window.trials()
            if any(t.state == OptunaState.WAITING for t in trials):
                return _ask_directly(self.study, storage, resolved, fixed, seed)  # enqueued through Optuna itself
            number = self.window.next_number()
            if seed is not None:  # the proposal is drawn for the number it should get
                reseed(self.study.sampler, trial_seed(seed, number))
            scratch = _WindowStudy(self.study.study_name, self.directions, self.sampler,
                                   _same_bracket(self.study, trials, number))
            self.sampler.use(scratch, number)
            if fixed is not None:
                scratch.enqueue_trial(fixed, skip_if_exists=False)
            params = sample_params(scratch.ask(), resolved)
            dists = sampled_distributions(resolved, params)
            self.window.check_distributions(dists)
            # Another worker may have taken `number` meanwhile: the database numbers the trial.
            trial_id, got = optuna_rows.create_running(storage, self.window.study_id, params, dists)
            if got == number or seed is None or race == RACES_BEFORE_GIVING_UP - 1:
                return got, trial_id, params
            # Drawn from the seed of a number another worker took, and likely its very configuration: drop it.
            storage.set_trial_state_values(trial_id, OptunaState.FAIL)
        raise AssertionError("unreachable: the last race returns")


def window_size(study: optuna.Study) -> tuple[int, int, int]:
    """(best, recent, sampled) finished trials a proposal sees. TPE's good group is at most its 25 best
    trials (Optuna's default gamma), so the window's best trials hold it whole, per Hyperband bracket; random
    search reads no history (one recent trial keeps the numbering)."""
    if isinstance(study.sampler, optuna.samplers.RandomSampler):
        return 0, 1, 0
    brackets = HYPERBAND_BRACKETS if isinstance(study.pruner, optuna.pruners.HyperbandPruner) else 1
    return BEST_TRIALS * brackets, RECENT_TRIALS, SAMPLED_TRIALS


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
    each objective, the `recent` latest trials, and a systematic sample of at most `sample` trials: every
    trial whose number is a multiple of the stride, the smallest power of two that keeps the sample within
    bounds. A finished trial that leaves the window can never belong to it again (a better one outranks it,
    newer ones follow it, the stride only doubles), so the window updated incrementally equals the window
    computed from the whole history. Below `recent` trials, or `sample` with a sample, it is the whole
    history. Reads: once at the start, a few queries by index; then each sync reads only trials created
    since and the open ones, by primary key.
    """

    def __init__(self, storage: RDBStorage, study_id: int, directions: list[StudyDirection], *, best: int,
                 recent: int, sample: int = 0) -> None:
        self.storage, self.study_id, self.directions = storage, study_id, directions
        self.best, self.recent, self.sample = best, recent, sample
        self._trials: dict[int, FrozenTrial] = {}  # by Optuna trial id
        self._distributions: dict[str, BaseDistribution] = {}  # of each parameter, as first read
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
            for name, dist in trial.distributions.items():
                self._distributions.setdefault(name, dist)
        self._trim()

    def check_distributions(self, distributions: dict[str, BaseDistribution]) -> None:
        """Raise ValueError where a parameter's distribution is incompatible with the one it had in a trial
        this window has read, as Optuna checks a new parameter against an earlier record of it."""
        for name, dist in distributions.items():
            if name in self._distributions:
                check_distribution_compatibility(self._distributions[name], dist)

    def _initial_ids(self) -> tuple[set[int], int]:
        """Ids of the window's trials as of the newest trial id, read by SQL without loading any trial."""
        t, v = om.TrialModel, om.TrialValueModel
        with self.storage.engine.connect() as conn:
            last, total, top = conn.execute(select(func.max(t.trial_id), func.count(), func.max(t.number))
                                            .where(t.study_id == self.study_id)).one()
            if last is None or total <= self.recent or self._stride(top + 1) == 1:
                return set(), -1  # the window is the whole study: read every trial
            ids = set(conn.scalars(select(t.trial_id).where(t.study_id == self.study_id)
                                   .order_by(t.trial_id.desc()).limit(self.recent)))
            if stride := self._stride(top + 1):
                ids.update(conn.scalars(select(t.trial_id).where(t.study_id == self.study_id,
                                                                 t.number % stride == 0)))
            ids.update(conn.scalars(select(t.trial_id).where(
                t.study_id == self.study_id, t.state.in_([OptunaState.RUNNING, OptunaState.WAITING]))))
            for objective, direction in enumerate(self._ranked):
                order = v.value.desc() if direction == StudyDirection.MAXIMIZE else v.value.asc()
                ids.update(conn.scalars(
                    select(t.trial_id).join(v, v.trial_id == t.trial_id)
                    .where(t.study_id == self.study_id, t.state == OptunaState.COMPLETE,
                           v.objective == objective, v.value_type == om.TrialValueModel.TrialValueType.FINITE)
                    .order_by(order, t.trial_id).limit(self.best)))
        return ids, int(last)

    @property
    def _ranked(self) -> list[StudyDirection]:
        """The objectives whose best trials the window holds: none in a window of the latest trials only
        (the pruner's), which then neither queries nor sorts for them."""
        return self.directions if self.best > 0 else []

    def _stride(self, trials: int) -> int:
        """Every stride-th trial by number is in the sample of a study of `trials` trials (0: no sample)."""
        if self.sample <= 0:
            return 0
        stride = 1
        while -(-trials // stride) > self.sample:
            stride *= 2
        return stride

    def _trim(self) -> None:
        """Drop finished trials that are neither among the best, the recent nor the sampled ones."""
        keep = {i for i, t in self._trials.items() if not t.state.is_finished()}
        keep.update(sorted(self._trials, reverse=True)[:self.recent])
        if stride := self._stride(self.next_number()):
            keep.update(i for i, t in self._trials.items() if t.number % stride == 0)
        complete = [t for t in self._trials.values() if t.state == OptunaState.COMPLETE and t.values]
        for objective, direction in enumerate(self._ranked):
            sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
            ranked = sorted((t for t in complete if math.isfinite(t.values[objective])),
                            key=lambda t: (sign * t.values[objective], t._trial_id))
            keep.update(t._trial_id for t in ranked[:self.best])
        for trial_id in [i for i in self._trials if i not in keep]:
            del self._trials[trial_id]
