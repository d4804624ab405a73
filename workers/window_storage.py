"""An Optuna storage that shows a study's sampler or pruner a bounded window of its trials.

`WindowedStorage` wraps the RDB storage as Optuna's own `_CachedStorage` does, through the public
`BaseStorage` interface: `get_all_trials`, what samplers and pruners read, answers from a `TrialWindow` kept
up to date by small SQL reads (at the first read after a write through this storage, or after an ask
begins, where Optuna's cached storage reads at every call; an epoch's report of this process's own goes into
the window's copy, and the window is read once per round of reports); everything else goes to the RDB
storage. Workers then call plain
`study.ask()`, `trial.should_prune()` and `study.tell()`, at a cost that stays flat at 100,000 trials.

It also keeps an ask short. A trial it creates is written in one transaction (`optuna_rows`), and the
parameters the sampler suggests for it are held until `flush()` writes them in one insert: Optuna's own
write costs three statements per parameter. As for Optuna's cached storage, a trial's parameters are
written before any later write to that trial (a report, its state). System attributes a sampler sets
while it samples (TPE's shared relative parameters) are held and written with them.
"""

from __future__ import annotations

import copy
import math
import sys
import threading
from collections.abc import Container, Sequence
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, select

from workers import optuna_private, optuna_rows


class TrialWindow:
    """The trials of one Optuna study a sampler or pruner sees, kept up to date from SQL in small reads.

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
        self._ids: dict[int, int] = {}  # trial id by number, of every trial read (a few ints per trial)
        self._distributions: dict[str, BaseDistribution] = {}  # of each parameter, as first read
        self._last_id = -1
        self._loaded = False
        self.read = 0  # trials read from SQL so far (each sync reads the new ones and every open one)

    def trials(self) -> list[FrozenTrial]:
        return sorted(self._trials.values(), key=lambda t: t.number)

    def next_number(self) -> int:
        return max((t.number for t in self._trials.values()), default=-1) + 1

    def trial_id(self, number: int) -> int | None:
        """The id of trial `number`, if this window has read it."""
        return self._ids.get(number)

    def number_of(self, trial_id: int) -> int | None:
        """The number of trial `trial_id`, if this window holds it."""
        trial = self._trials.get(trial_id)
        return trial.number if trial is not None else None

    def sync(self) -> None:
        if not self._loaded:
            ids, self._last_id = self._initial_ids()
            self._loaded = True
        else:
            ids = {i for i, t in self._trials.items() if not t.state.is_finished()}
        for trial in optuna_private.read_trials(self.storage, self.study_id, ids, self._last_id):
            self.read += 1
            trial_id = optuna_private.trial_id(trial)
            self._trials[trial_id] = trial
            self._ids[trial.number] = trial_id
            self._last_id = max(self._last_id, trial_id)
            for name, dist in trial.distributions.items():
                self._distributions.setdefault(name, dist)
        self._trim()

    def note_report(self, trial_id: int, step: int, value: float) -> bool:
        """Apply a report written through this process to the running trial's copy; False if not held."""
        trial = self._trials.get(trial_id)
        if trial is None or trial.state != TrialState.RUNNING:
            return False
        trial.intermediate_values[step] = value
        return True

    def check_distribution(self, name: str, distribution: BaseDistribution, remember: bool = True) -> None:
        """Raise ValueError where a parameter's distribution is incompatible with the one it had in a trial
        this window has read (or this worker wrote), as Optuna checks a new parameter against an earlier
        record of it."""
        if name in self._distributions:
            check_distribution_compatibility(self._distributions[name], distribution)
        elif remember:
            self._distributions[name] = distribution

    def _initial_ids(self) -> tuple[set[int], int]:
        """Ids of the window's trials as of the newest trial id, read by SQL without loading any trial."""
        t, v = optuna_private.trials_table.c, optuna_private.values_table.c
        with optuna_private.engine(self.storage).connect() as conn:
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
                t.study_id == self.study_id, t.state.in_([TrialState.RUNNING, TrialState.WAITING]))))
            for objective, direction in enumerate(self._ranked):
                order = v.value.desc() if direction == StudyDirection.MAXIMIZE else v.value.asc()
                ids.update(conn.scalars(
                    select(t.trial_id).join(optuna_private.values_table, v.trial_id == t.trial_id)
                    .where(t.study_id == self.study_id, t.state == TrialState.COMPLETE,
                           v.objective == objective, v.value_type == optuna_private.FINITE_VALUE)
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
        complete = [(i, t) for i, t in self._trials.items() if t.state == TrialState.COMPLETE and t.values]
        for objective, direction in enumerate(self._ranked):
            sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
            ranked = sorted(((i, t) for i, t in complete if math.isfinite(t.values[objective])),
                            key=lambda it: (sign * it[1].values[objective], it[0]))
            keep.update(i for i, _ in ranked[:self.best])
        for trial_id in [i for i in self._trials if i not in keep]:
            del self._trials[trial_id]


class WindowedStorage(BaseStorage):
    """`backend` as a sampler or pruner reads it: each study's trials are a `TrialWindow` of `best`,
    `recent` and `sample` trials (`recent=None`: the whole study, read incrementally)."""

    def __init__(self, backend: RDBStorage, *, best: int = 0, recent: int | None = None, sample: int = 0) -> None:
        self.backend = backend
        self.best, self.recent, self.sample = best, recent, sample
        self._windows: dict[int, TrialWindow] = {}
        self._created: dict[int, tuple[int, FrozenTrial]] = {}  # trials whose parameters are held: (study id, trial)
        self._held: dict[int, dict[str, tuple[float, BaseDistribution]]] = {}  # their parameters, not yet written
        self._held_attrs: dict[int, dict[str, Any]] = {}  # their system attributes (TPE's relative params)
        self._next: _Next | None = None
        self._synced: set[int] = set()  # studies whose window was read since this storage last wrote
        self._round: dict[int, set[int]] = {}  # per study: trials that reported through it since its last sync
        self._ids: dict[str, int] = {}  # study id by name, and each study's name and directions: they never
        self._names: dict[int, str] = {}  # change (Optuna's Study and cached storage keep them too)
        self._directions: dict[int, list[StudyDirection]] = {}
        self._lock = threading.RLock()

    # ---- what this storage adds ----------------------------------------------------------------------

    def window(self, study_id: int) -> TrialWindow:
        """The study's window as last synced."""
        with self._lock:
            window = self._windows.get(study_id)
            if window is None:
                recent = self.recent if self.recent is not None else sys.maxsize
                window = self._windows[study_id] = TrialWindow(
                    self.backend, study_id, self.get_study_directions(study_id), best=self.best,
                    recent=recent, sample=self.sample)
            return window

    def prepare_next(self, space: dict[str, BaseDistribution], params: dict[str, Any] | None = None,
                     distributions: dict[str, BaseDistribution] | None = None) -> None:
        """Until `clear_next()`: the next trial this storage creates without a template is refused (ValueError,
        nothing written) where a distribution of `space` is incompatible with the one its parameter had in
        the study, as Optuna refuses the suggest; with `params` it holds them (an enqueued configuration's
        values, of `distributions`) from its first write, and a study ask creates it rather than run a WAITING
        trial."""
        with self._lock:
            self._next = _Next(space, params, distributions or {})
            self._synced.clear()  # an ask reads the study afresh

    def clear_next(self) -> None:
        with self._lock:
            self._next = None

    def flush(self) -> None:
        """Write the parameters held for the trials this storage created (one insert per trial)."""
        with self._lock:
            for trial_id in list(self._created):
                self._flush(trial_id)

    # ---- reads -----------------------------------------------------------------------------------------

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        with self._lock:
            window = self.window(study_id)
            if study_id not in self._synced:
                window.sync()
                self._synced.add(study_id)
                self._round[study_id] = set()
            held = {i: t for i, (s, t) in self._created.items() if s == study_id}
            trials = [t for t in window.trials() if optuna_private.trial_id(t) not in held]
            trials = sorted([*trials, *held.values()], key=lambda t: t.number)
            if self._next is not None and self._next.params is not None:  # an enqueued configuration's ask
                trials = [t for t in trials if t.state != TrialState.WAITING]
            if states is not None:
                trials = [t for t in trials if t.state in states]
            return copy.deepcopy(trials) if deepcopy else trials

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            if trial_id in self._created:
                return copy.deepcopy(self._created[trial_id][1])
        return self.backend.get_trial(trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        with self._lock:
            if trial_id in self._created:
                return dict(self._created[trial_id][1].system_attrs)
        return self.backend.get_trial_system_attrs(trial_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        with self._lock:
            known = next((i for i, (s, t) in self._created.items() if (s, t.number) == (study_id, trial_number)),
                         None) or self.window(study_id).trial_id(trial_number)
        if known is not None:
            return known
        return self.backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        with self._lock:
            if trial_id in self._created:
                return self._created[trial_id][1].number
            for window in self._windows.values():
                if (number := window.number_of(trial_id)) is not None:
                    return number
        return self.backend.get_trial_number_from_id(trial_id)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self.backend.get_best_trial(study_id)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self.backend.get_n_trials(study_id, state)

    # ---- trial writes ----------------------------------------------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None and not _short(template_trial):
            self._wrote()
            return self.backend.create_new_trial(study_id, template_trial)
        with self._lock:
            window = self.window(study_id)
            params: dict[str, Any] = template_trial.params if template_trial is not None else {}
            dists = template_trial.distributions if template_trial is not None else {}
            if template_trial is None and self._next is not None:
                for name, dist in self._next.space.items():
                    window.check_distribution(name, dist, remember=False)
                params, dists = self._next.params or {}, self._next.distributions
                self._next = None
            for name, dist in dists.items():
                window.check_distribution(name, dist)
            trial_id, number = optuna_rows.create_running(self.backend, study_id, params, dists)
            if template_trial is not None:
                self._wrote()
            else:  # held, and shown with the window's trials, until flushed
                self._created[trial_id] = (study_id, optuna.trial.FrozenTrial(
                    number=number, state=TrialState.RUNNING, value=None, values=None,
                    datetime_start=datetime.now(UTC).replace(tzinfo=None), datetime_complete=None,
                    params={k: params[k] for k in dists}, distributions=dict(dists), user_attrs={},
                    system_attrs={}, intermediate_values={}, trial_id=trial_id))
                self._held[trial_id], self._held_attrs[trial_id] = {}, {}
            return trial_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        with self._lock:
            if trial_id in self._created:
                study_id, trial = self._created[trial_id]
                self.window(study_id).check_distribution(param_name, distribution)
                self._held[trial_id][param_name] = (param_value_internal, distribution)
                trial.params[param_name] = distribution.to_external_repr(param_value_internal)
                trial.distributions[param_name] = distribution
                return
        self.backend.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        self._flush(trial_id)
        return self.backend.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        if trial_id in self._created:
            self._flush(trial_id)
        self.backend.set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._reported(trial_id, step, intermediate_value)

    def _reported(self, trial_id: int, step: int, value: float) -> None:
        """A report of this process's own, which the window's copy of the trial takes at once: the pruner's
        next read needs no SQL for it. The window is read afresh once per round, at a trial's second report
        since the last read (one epoch of every trial this process runs): other workers' reports and every
        trial's end are seen within a round, and a fused group of K reads its K trials once an epoch, not K
        times. A trial the window does not hold yet is read at once."""
        with self._lock:
            for study_id, window in self._windows.items():
                if window.note_report(trial_id, step, value):
                    reported = self._round.setdefault(study_id, set())
                    if trial_id in reported:
                        self._synced.discard(study_id)
                    reported.add(trial_id)
                    return
            self._wrote()

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._flush(trial_id)
        self.backend.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            if trial_id in self._created:
                self._held_attrs[trial_id][key] = value
                self._created[trial_id][1].system_attrs[key] = value
                return
        self.backend.set_trial_system_attr(trial_id, key, value)

    def _flush(self, trial_id: int) -> None:
        """Write the trial's held parameters, if any; either way a write follows: read the study afresh."""
        with self._lock:
            self._wrote()
            if trial_id not in self._created:
                return
            optuna_rows.add_params(self.backend, trial_id, self._held[trial_id], self._held_attrs[trial_id])
            del self._created[trial_id], self._held[trial_id], self._held_attrs[trial_id]

    def _wrote(self) -> None:
        """The next read syncs the windows: what is asked or judged next sees this write and others' since."""
        with self._lock:
            self._synced.clear()

    # ---- the study: the RDB storage's own -------------------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self.backend.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        with self._lock:
            self._ids = {name: i for name, i in self._ids.items() if i != study_id}
            self._names.pop(study_id, None)
            self._directions.pop(study_id, None)
            self._windows.pop(study_id, None)
        self.backend.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.backend.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        if study_name not in self._ids:
            self._ids[study_name] = self.backend.get_study_id_from_name(study_name)
        return self._ids[study_name]

    def get_study_name_from_id(self, study_id: int) -> str:
        if study_id not in self._names:
            self._names[study_id] = self.backend.get_study_name_from_id(study_id)
        return self._names[study_id]

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        if study_id not in self._directions:
            self._directions[study_id] = self.backend.get_study_directions(study_id)
        return list(self._directions[study_id])

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.backend.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return self.backend.get_all_studies()

    def remove_session(self) -> None:
        self.backend.remove_session()


class _Next:
    """What the next trial created without a template is checked against and holds."""

    def __init__(self, space: dict[str, BaseDistribution], params: dict[str, Any] | None,
                 distributions: dict[str, BaseDistribution]) -> None:
        self.space, self.params, self.distributions = space, params, distributions


def _short(template: FrozenTrial) -> bool:
    """Whether a template trial is one the short write holds whole: RUNNING, parameters and nothing else."""
    return (template.state == TrialState.RUNNING and not template.user_attrs and not template.system_attrs
            and not template.intermediate_values and template.values is None)

