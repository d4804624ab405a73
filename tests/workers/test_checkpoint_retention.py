"""Which checkpoints a study keeps, and the bytes it holds: pure functions of the recorded trials."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.schemas.study import StudySpec
from workers.checkpoints import (
    CheckpointFile,
    KeepCheckpoints,
    Retention,
    TrialCheckpoints,
    TrialPhase,
    bytes_by_trial,
    retained,
    retention_of,
    study_bytes,
    to_delete,
)


def files(trial: int, *epochs: int, size: int = 100) -> list[CheckpointFile]:
    return [CheckpointFile(Path(f"t{trial}/epoch-{e:06d}.safetensors"), e, size) for e in epochs]


DEFAULT = Retention()


def kept_epochs(trials: list[TrialCheckpoints], retention: Retention = DEFAULT) -> dict[int, list[int]]:
    return {n: [c.epoch for c in cs] for n, cs in retained(trials, retention).items()}


@pytest.mark.parametrize("phase", [TrialPhase.RUNNING, TrialPhase.QUEUED, TrialPhase.PAUSED])
def test_a_trial_that_may_continue_keeps_its_newest_and_its_recorded_checkpoint(phase: TrialPhase) -> None:
    settled = TrialCheckpoints(0, phase, files(0, 1, 2, 3), recorded_epoch=3)
    writing = TrialCheckpoints(1, phase, files(1, 2, 3, 4), recorded_epoch=3)  # 4 on disk, not yet recorded
    never_recorded = TrialCheckpoints(2, phase, files(2, 1, 2))
    assert kept_epochs([settled, writing, never_recorded]) == {0: [3], 1: [3, 4], 2: [2]}
    assert [c.epoch for c in to_delete([settled, writing], DEFAULT)] == [1, 2, 2]


@pytest.mark.parametrize("phase", [TrialPhase.PRUNED, TrialPhase.FAILED, TrialPhase.DELETED])
def test_ended_trials_keep_nothing(phase: TrialPhase) -> None:
    trial = TrialCheckpoints(0, phase, files(0, 4, 5), recorded_epoch=5, value=0.1)
    for policy in KeepCheckpoints:
        assert retained([trial], Retention(policy=policy)) == {}
        assert len(to_delete([trial], Retention(policy=policy))) == 2


def completed(values: dict[int, float | None]) -> list[TrialCheckpoints]:
    return [TrialCheckpoints(n, TrialPhase.COMPLETED, files(n, 9, 10), recorded_epoch=10, value=v)
            for n, v in values.items()]


def test_best_k_keeps_the_newest_checkpoint_of_the_k_best_completed_trials() -> None:
    trials = completed({0: 0.5, 1: 0.9, 2: None, 3: 0.7, 4: 0.9, 5: float("nan")})
    assert kept_epochs(trials, Retention(k=2, maximize=True)) == {1: [10], 4: [10]}
    assert kept_epochs(trials, Retention(k=2, maximize=False)) == {0: [10], 3: [10]}
    # Unknown values come last: with room for them, they are kept after every known one.
    assert set(kept_epochs(trials, Retention(k=5, maximize=True))) == {0, 1, 2, 3, 4}


def test_best_k_leaves_running_trials_alone() -> None:
    trials = [*completed({0: 0.1, 1: 0.2}), TrialCheckpoints(2, TrialPhase.RUNNING, files(2, 3))]
    assert kept_epochs(trials, Retention(k=1)) == {0: [10], 2: [3]}


def test_all_and_none() -> None:
    trials = completed({0: 0.1, 1: 0.2, 2: 0.3})
    assert kept_epochs(trials, Retention(policy=KeepCheckpoints.ALL)) == {0: [10], 1: [10], 2: [10]}
    assert kept_epochs(trials, Retention(policy=KeepCheckpoints.NONE)) == {}
    assert len(to_delete(trials, Retention(policy=KeepCheckpoints.NONE))) == 6


def test_best_k_needs_a_positive_k() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Retention(k=0)


def test_bytes_per_trial_and_study() -> None:
    trials = [TrialCheckpoints(0, TrialPhase.RUNNING, files(0, 1, 2, size=300)),
              TrialCheckpoints(1, TrialPhase.COMPLETED, files(1, 5, size=1000)),
              TrialCheckpoints(2, TrialPhase.PRUNED, [])]
    assert bytes_by_trial(trials) == {0: 600, 1: 1000, 2: 0}
    assert study_bytes(trials) == 1600


def spec(**fields: object) -> StudySpec:
    return StudySpec.model_validate({"name": "s", "dataset": "builtin:iris", **fields})


def test_the_spec_names_the_retention() -> None:
    assert (spec().checkpoint_every, retention_of(spec())) == (1, Retention(KeepCheckpoints.BEST_K, 3, True))
    loss = spec(objective={"metric": "val_loss", "direction": "minimize"}, keep_best_k=5, checkpoint_every=2)
    assert (loss.checkpoint_every, retention_of(loss)) == (2, Retention(KeepCheckpoints.BEST_K, 5, False))
    assert retention_of(spec(keep_checkpoints="none")).policy is KeepCheckpoints.NONE
    for stored in (spec(keep_checkpoints="all"), loss):  # what the database holds reads back the same
        assert StudySpec.from_stored(stored.model_dump()) == stored


@pytest.mark.parametrize("fields,message", [
    ({"checkpoint_every": 0}, "greater than or equal to 1"),
    ({"keep_checkpoints": "latest"}, "'best_k', 'all' or 'none'"),
    ({"keep_best_k": 0}, "greater than or equal to 1"),
    ({"keep_checkpoints": "all", "keep_best_k": 2}, "keep_best_k applies only to keep_checkpoints 'best_k'"),
])
def test_the_spec_refuses_bad_checkpoint_fields(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)
