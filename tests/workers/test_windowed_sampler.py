"""The bounded window a large study's sampler sees: every running trial, the best and the latest finished
ones, a systematic sample of the rest, nothing outside the space, the same proposals for the same seed and
history.

Small windows (a few trials) stand in for the sizes of a 100,000-trial study.
"""

from __future__ import annotations

import itertools
from typing import Any

import optuna
import pytest

from app.core.optuna_store import optuna_storage
from app.ml.space import Context, resolve_space
from workers import asking
from workers.asking import ask_trial
from workers.window_storage import TrialWindow

SPACE = resolve_space({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                       "units": {"type": "int", "low": 8, "high": 256},
                       "optimizer": {"type": "categorical", "choices": ["adam", "momentum", "sgd"]}},
                      Context("mlp"))
SAMPLED = {k: d for k, d in SPACE.items() if isinstance(d, optuna.distributions.BaseDistribution)}


@pytest.fixture
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asking, "BEST_TRIALS", 3)
    monkeypatch.setattr(asking, "RECENT_TRIALS", 4)
    monkeypatch.setattr(asking, "SAMPLED_TRIALS", 0)


def _value(params: dict[str, Any]) -> float:
    return -abs(params["units"] - 100) / 100 - abs(params["learning_rate"] - 0.01)


def _study(url: str, name: str, seed: int = 0) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=3, multivariate=True, group=True,
                                         constant_liar=True)
    optuna.create_study(study_name=name, storage=optuna_storage(url), direction="maximize", load_if_exists=True)
    return asking.open_study(optuna_storage(url), name, sampler, optuna.pruners.NopPruner())


def _window(study: optuna.Study) -> TrialWindow:
    """The window the study's sampler reads, as last synced."""
    storage = asking.storage_of(study)
    return storage.window(storage.get_study_id_from_name(study.study_name))


def _in_space(params: dict[str, Any]) -> bool:
    return all(SAMPLED[k]._contains(SAMPLED[k].to_internal_repr(v)) for k, v in params.items() if k in SAMPLED)


@pytest.mark.usefixtures("small_window")
def test_the_window_holds_every_running_trial_and_the_best_and_latest_finished(db_url: str) -> None:
    study, storage = _study(db_url, "window"), optuna_storage(db_url)
    running: list[int] = []
    values: dict[int, float] = {}
    for turn in range(30):
        number, _, params = ask_trial(study, SPACE)
        assert _in_space(params)
        if turn % 5 == 1:
            running.append(number)  # left RUNNING, like a trial another worker still trains
        else:
            values[number] = _value(params)
            study.tell(number, values[number])
    window = _window(study)
    window.sync()
    held = {t.number: t for t in window.trials()}
    best = sorted(values, key=lambda n: -values[n])[:3]
    assert set(running) <= set(held)
    assert all(held[n].state == optuna.trial.TrialState.RUNNING for n in running)
    assert set(best) <= set(held)
    assert {26, 27, 28, 29} <= set(held)
    assert set(held) == set(running) | set(best) | {26, 27, 28, 29}  # and nothing else: bounded
    # A joining worker's window, read in one go, is the same window.
    fresh = TrialWindow(storage, window.study_id, window.directions, best=3, recent=4)
    fresh.sync()
    assert [t.number for t in fresh.trials()] == [t.number for t in window.trials()]


@pytest.mark.usefixtures("small_window")
def test_a_running_trial_of_another_worker_is_seen_until_it_finishes(db_url: str) -> None:
    ours, theirs = _study(db_url, "shared", seed=0), _study(db_url, "shared", seed=1)
    for _ in range(12):
        number, _, params = ask_trial(ours, SPACE)
        ours.tell(number, _value(params))
    other, _, params = ask_trial(theirs, SPACE)
    seen: list[int] = []
    for _ in range(8):  # far more than the window's latest trials: the running one stays in view
        number, _, p = ask_trial(ours, SPACE)
        ours.tell(number, -10.0)  # poor values: never among the best
        seen.append(other in {t.number for t in _window(ours).trials()})
    assert all(seen)
    theirs.tell(other, -10.0)
    ask_trial(ours, SPACE)
    assert other not in {t.number for t in _window(ours).trials()}  # finished, poor, old


@pytest.mark.usefixtures("small_window")
def test_the_same_seed_and_history_give_the_same_proposals(db_url: str) -> None:
    runs = []
    for name in ("first", "second"):
        study = _study(db_url, name, seed=7)
        proposals = []
        for _ in range(20):
            number, _, params = ask_trial(study, SPACE)
            study.tell(number, _value(params))
            proposals.append(params)
        runs.append(proposals)
    assert runs[0] == runs[1]
    assert all(_in_space(p) for p in runs[0])


@pytest.mark.usefixtures("small_window")
def test_the_sampler_sees_the_window_not_the_whole_study(db_url: str) -> None:
    """What TPE reads through the view: the window's trials with their real numbers, never more."""
    study = _study(db_url, "view")
    for _ in range(15):
        number, _, params = ask_trial(study, SPACE)
        study.tell(number, _value(params))
    seen: list[list[int]] = []
    sampler = study.sampler
    original = sampler.sample_relative

    def recording(view: optuna.Study, trial: optuna.trial.FrozenTrial, space: dict[str, Any]) -> dict[str, Any]:
        seen.append([t.number for t in view.get_trials(deepcopy=False) if t.number != trial.number] + [trial.number])
        return original(view, trial, space)

    sampler.sample_relative = recording  # type: ignore[method-assign]
    number, _, _ = ask_trial(study, SPACE)
    assert seen and seen[0][-1] == number == 15
    assert len(seen[0]) - 1 <= 3 + 4 and max(seen[0][:-1]) == 14


def test_the_sample_keeps_every_kth_trial_and_never_takes_one_back(db_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asking, "BEST_TRIALS", 2)
    monkeypatch.setattr(asking, "RECENT_TRIALS", 3)
    monkeypatch.setattr(asking, "SAMPLED_TRIALS", 5)
    study, storage = _study(db_url, "sampled"), optuna_storage(db_url)
    values: dict[int, float] = {}
    held_over_time: list[set[int]] = []
    for _ in range(40):
        number, _, params = ask_trial(study, SPACE)
        values[number] = _value(params)
        study.tell(number, values[number])
        held_over_time.append({t.number for t in _window(study).trials()})
    window = _window(study)
    window.sync()
    held = {t.number for t in window.trials()}
    best = set(sorted(values, key=lambda n: -values[n])[:2])
    assert held == {0, 8, 16, 24, 32} | {37, 38, 39} | best  # stride 8 keeps 40 trials' sample within 5
    for before, after in itertools.pairwise(held_over_time):  # a trial that left never came back
        assert not (after - {max(after)}) - before
    fresh = TrialWindow(storage, window.study_id, window.directions, best=2, recent=3, sample=5)
    fresh.sync()  # a joining worker reads the same window in one go
    assert [t.number for t in fresh.trials()] == [t.number for t in window.trials()]
