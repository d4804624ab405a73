"""Pruning decisions from a bounded window of the study, as the sampler's proposals are (workers.asking).

`trial.should_prune()` hands the pruner the whole study: through the worker's cached Optuna storage that is
one read of every finished trial (docs/benchmarks/scale.md has its cost at scale), all of them then
held in memory for good, and a pass over all of them at every epoch report. Here the pruner reads the latest
PRUNING_TRIALS trials and every running one, kept up to date incrementally (`TrialWindow`): median and
percentile pruning judge a curve against the recent trials' curves, successive halving and Hyperband
against a rung's recent competitors. Below PRUNING_TRIALS trials that is the whole study, and the decisions
are Optuna's own.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Container
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from workers.asking import TrialWindow

PRUNING_TRIALS = 1000
_windows: weakref.WeakKeyDictionary[optuna.Study, PruningWindow] = weakref.WeakKeyDictionary()
_windows_lock = threading.Lock()


def should_prune(study: optuna.Study, storage: RDBStorage, trial: optuna.Trial) -> bool:
    """What `trial.should_prune()` answers, with the pruner reading the window instead of the study.

    `storage` is the study's RDB storage; slots of one worker share the window of each study.
    """
    with _windows_lock:
        window = _windows.get(study)
        if window is None:
            window = _windows[study] = PruningWindow(study, storage)
    return window.should_prune(trial)


class PruningWindow:
    """One study's pruning window and the study view its pruner reads it through."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        self.window = TrialWindow(storage, study._study_id, list(study.directions), best=0, recent=PRUNING_TRIALS)
        self.view = optuna.Study(study_name=study.study_name, storage=_WindowStorage(study._storage, self.window),
                                 sampler=study.sampler, pruner=study.pruner)
        self._lock = threading.Lock()

    def should_prune(self, trial: optuna.Trial) -> bool:
        with self._lock:
            self.window.sync()
            return self.view.pruner.prune(self.view, trial._get_latest_trial())


class _WindowStorage:
    """The study's storage as its pruner reads it: the study's trials are the window's; everything else,
    a rung's value that successive halving writes to the trial included, goes to the storage itself."""

    def __init__(self, storage: BaseStorage, window: TrialWindow) -> None:
        self._storage, self._window = storage, window

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self._window.trials() if states is None or t.state in states]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)
