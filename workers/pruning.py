"""The pruner of a worker's study reads the latest trials, not the whole study.

`trial.should_prune()` hands the pruner the study; over the whole history that is a read of every finished
trial and a pass over all of them at each epoch report (55 s, then 64 ms a decision, at 100,000 trials on
SQLite). A worker's trials are opened on a view of the study (`trial(study, trial_id)`) whose storage is a
window of the latest PRUNING_TRIALS trials and every running one (workers/window_storage.py): median and
percentile pruning judge a curve against the recent trials' curves, successive halving and Hyperband
against a rung's recent competitors. Below PRUNING_TRIALS trials the decisions are Optuna's own.
"""

from __future__ import annotations

import threading
import weakref

import optuna
from optuna.storages import RDBStorage

from workers.window_storage import WindowedStorage

PRUNING_TRIALS = 1000
_views: weakref.WeakKeyDictionary[optuna.Study, optuna.Study] = weakref.WeakKeyDictionary()
_views_lock = threading.Lock()


def open_view(study: optuna.Study, backend: RDBStorage, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The view of `study` that its worker's trials report to and `pruner` judges them in; slots of one
    worker share it. Its sampler samples nothing: a trial is asked on the study itself."""
    view = optuna.load_study(study_name=study.study_name, storage=WindowedStorage(backend, recent=PRUNING_TRIALS),
                             sampler=optuna.samplers.RandomSampler(), pruner=pruner)
    with _views_lock:
        _views[study] = view
    return view


def view_of(study: optuna.Study) -> optuna.Study:
    with _views_lock:
        view = _views.get(study)
    if view is None:
        raise ValueError(f"study {study.study_name!r} was not opened by workers.asking.open_study")
    return view


def trial(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """Running trial `trial_id` of `study`, to report its epochs to and ask `should_prune()`."""
    return optuna.Trial(view_of(study), trial_id)
