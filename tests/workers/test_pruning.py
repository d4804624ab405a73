"""The pruner reads a bounded window of the study: Optuna's own decisions below it, recent trials beyond."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from app.core.optuna_store import optuna_storage
from workers import asking, pruning

PRUNERS = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3),
}


def _study(tmp_path: Path, pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, RDBStorage]:
    storage = optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    return optuna.load_study(study_name="s", storage=storage, pruner=pruner), storage


def _ours(study: optuna.Study, storage: RDBStorage, trial: optuna.Trial) -> tuple[optuna.Study, optuna.Trial]:
    """`trial` as a worker opens it: on the study's view, whose pruner reads the window."""
    worker_study = asking.open_study(storage, study.study_name, optuna.samplers.RandomSampler(), study.pruner)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), trial.number)
    return worker_study, pruning.trial(worker_study, trial_id)


def _finished(study: optuna.Study, level: float, n: int) -> None:
    """n trials, run through Optuna's own pruning, whose curves climb towards `level` (spread out)."""
    for i in range(n):
        top = level * (0.7 + 0.3 * ((7 * i) % 11) / 10)
        trial = study.ask()
        for step in range(1, 10):
            trial.report(top * step / 9, step)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, top)


def _decisions(path: Path, pruner: optuna.pruners.BasePruner, ours: bool) -> list[tuple[float, int, bool]]:
    """(level, step, pruned) of four new curves after 30 trials; judged by the window or by Optuna."""
    path.mkdir()
    study, storage = _study(path, pruner)
    _finished(study, 0.6, 30)
    decisions = []
    for level in (0.2, 0.45, 0.55, 0.9):
        trial = study.ask()
        if ours:
            _, trial = _ours(study, storage, trial)
        for step in range(1, 10):
            trial.report(level * step / 9, step)
            pruned = trial.should_prune()
            decisions.append((level, step, pruned))
            if pruned:
                study.tell(trial.number, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial.number, level)
    return decisions


@pytest.mark.parametrize("name", PRUNERS)
def test_below_the_window_it_decides_as_optuna_does(tmp_path: Path, name: str) -> None:
    ours = _decisions(tmp_path / "window", PRUNERS[name](), ours=True)
    assert ours == _decisions(tmp_path / "optuna", PRUNERS[name](), ours=False)
    assert {pruned for *_, pruned in ours} == {True, False}  # the comparison saw both answers


def test_beyond_the_window_it_judges_against_the_recent_trials_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pruning, "PRUNING_TRIALS", 10)
    study, storage = _study(tmp_path, PRUNERS["median"]())
    _finished(study, 0.9, 30)  # the old trials did well...
    _finished(study, 0.1, 10)  # ...the search has since moved to a region where all do badly
    trial = study.ask()
    worker_study, ours = _ours(study, storage, trial)
    ours.report(0.5 * 3 / 9, 3)
    assert optuna.Trial(study, ours._trial_id).should_prune()  # against every curve: below the old trials' median
    assert not ours.should_prune()  # against the 10 recent ones: above theirs
    held = pruning.view_of(worker_study).get_trials(deepcopy=False)
    assert {t.number for t in held} == set(range(31, 41))  # the latest ten, itself among them


def test_trials_reporting_together_are_judged_as_optuna_judges_them_reading_each_once_a_round(
        tmp_path: Path) -> None:
    """Eight trials of one worker report epoch after epoch, as a fused group does: the pruner decides as
    Optuna's own, and the window reads the open trials once per round of reports, not at every report."""
    from workers.window_storage import WindowedStorage

    k, steps = 8, 9
    levels = [0.2 + 0.1 * i for i in range(k)]
    decisions: dict[bool, list[tuple[int, int, bool]]] = {}
    for ours in (True, False):
        (tmp_path / str(ours)).mkdir()
        study, backend = _study(tmp_path / str(ours), optuna.pruners.MedianPruner(n_startup_trials=2))
        _finished(study, 0.6, 10)
        asked = [study.ask() for _ in range(k)]
        window = WindowedStorage(backend, recent=pruning.PRUNING_TRIALS)
        view = optuna.load_study(study_name="s", storage=window, pruner=study.pruner)
        study_id = backend.get_study_id_from_name("s")
        trials = [optuna.Trial(view, backend.get_trial_id_from_study_id_trial_number(study_id, t.number))
                  if ours else t for t in asked]
        live, made = dict(enumerate(trials)), []
        for step in range(1, steps + 1):
            for i, trial in list(live.items()):
                trial.report(levels[i] * step / steps, step)
                made.append((i, step, trial.should_prune()))
                if made[-1][2]:
                    study.tell(asked[i].number, state=TrialState.PRUNED)  # as the supervisor: another storage
                    del live[i]
        for i in live:
            study.tell(asked[i].number, levels[i])
        decisions[ours] = made
        if ours:
            reads = window.window(study_id).read
            assert reads <= 10 + k * (steps + 2), reads  # each open trial once a round; 184 when read at each report
    assert decisions[True] == decisions[False]
    assert {pruned for *_, pruned in decisions[True]} == {True, False}
