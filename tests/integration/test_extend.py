"""A client extends a completed trial: real worker processes train it on from its checkpoint, and it ends as
the same trial run for all those epochs at once (same study seed and trial number), its curve one curve. The
study runs again and is evaluated on test once more; Optuna keeps the old trial as the sampler saw it and
records the extended result as a trial of its own."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from app.models import Study
from tests.factories import create_study_via_api
from tests.integration.processes import optuna_trials, study_status
from tests.integration.resumes import (
    assert_same_weights_and_curve,
    curve,
    only_trial,
    resume_env,
    run_all_to_end,
    run_to_end,
)

FIRST, MORE = 3, 2


def _spec(epochs: int) -> dict[str, object]:
    from tests.integration.processes import training_spec

    return training_spec(epochs, n_trials=1, max_parallel=1)


def _finished_at(db, sid: str):  # type: ignore[no-untyped-def]
    with db.read_session() as session:
        return session.execute(select(Study.finished_at, Study.test_metrics).where(Study.id == sid)).one()


def test_an_extended_trial_ends_as_if_it_had_run_all_its_epochs_and_the_study_is_evaluated_again(
        db_url: str, tmp_path: Path) -> None:
    db, client, settings = resume_env(db_url, tmp_path)
    reference_id = create_study_via_api(client, _spec(FIRST + MORE))
    sid = create_study_via_api(client, _spec(FIRST))
    run_all_to_end(db, settings, [reference_id, sid], tmp_path / "first.log")  # one worker, one after the other
    first = only_trial(db, sid)
    first_end, first_test = _finished_at(db, sid)
    assert (first.epochs_run, first.checkpoint_epoch) == (FIRST, FIRST) and first_test is not None

    extended = client.post(f"/api/v1/studies/{sid}/trials/{first.number}/extend", json={"epochs": MORE})
    assert extended.status_code == 200, extended.text
    assert (extended.json()["state"], extended.json()["epochs_target"]) == ("waiting", FIRST + MORE)
    assert study_status(db, sid) == "running"
    run_to_end(db, settings, sid, tmp_path / "extension.log")

    trial, reference = only_trial(db, sid), only_trial(db, reference_id)
    assert (trial.attempt, trial.epochs_run, trial.epochs_target) == (1, FIRST + MORE, None)
    assert [e[0] for e in curve(db, trial)] == list(range(1, FIRST + MORE + 1))
    assert_same_weights_and_curve(db, trial, reference, FIRST + MORE)
    end, test_metrics = _finished_at(db, sid)
    assert end > first_end and test_metrics is not None  # evaluated again, once the extension was done

    old, new = sorted(optuna_trials(db, sid), key=lambda t: t.number)
    assert (old._trial_id, old.value, sorted(old.intermediate_values)) == (
        first.optuna_trial_id, first.value, list(range(1, FIRST + 1)))
    assert new._trial_id == trial.optuna_trial_id and new.state.name == "COMPLETE"
    assert (new.value, new.params) == (trial.value, old.params)
    assert new.user_attrs["extends_trial"] == old.number and new.user_attrs["epochs"] == FIRST + MORE
    assert sorted(new.intermediate_values) == list(range(1, FIRST + MORE + 1))
    db.dispose()
