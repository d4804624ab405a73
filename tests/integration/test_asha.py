"""ASHA with promotion run by real worker processes: trials pause with their checkpoint at each rung, promoted
ones continue there on the same attempt (one curve, epochs recorded once), and the rest end pruned at their
rung when no trial is left to start or promote; the study completes with its test evaluation. Optuna hears
every rung at once (a pruned trial) and a promotion continues on a fresh trial (`promoted_from`)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from app.models import Study, TrialEpoch
from tests.factories import create_study_via_api
from tests.integration.processes import (
    optuna_trials,
    processes,
    start_worker,
    study_status,
    training_spec,
    trials_of,
    wait_until,
)
from tests.integration.resumes import resume_env

EPOCHS, RUNGS = 9, (1, 3)


def test_asha_pauses_at_rungs_promotes_the_best_and_ends_the_rest_pruned_there(db_url: str,
                                                                               tmp_path: Path) -> None:
    db, client, settings = resume_env(db_url, tmp_path)
    spec = training_spec(EPOCHS, n_trials=6, max_parallel=2)
    spec["scheduler"] = {"name": "asha", "min_epochs": 1, "reduction_factor": 3, "max_epochs": EPOCHS}
    sid = create_study_via_api(client, spec)
    with processes() as procs:
        procs.append(start_worker(settings, tmp_path / "w.log", per_device=2))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 240, "the study to end")
    assert study_status(db, sid) == "completed"

    rows = trials_of(db, sid)
    assert len(rows) == 6
    with db.read_session() as session:
        assert session.scalar(select(Study.test_metrics).where(Study.id == sid)) is not None
        curves = {r.number: [(e.attempt, e.epoch) for e in session.scalars(
            select(TrialEpoch).where(TrialEpoch.trial_id == r.id).order_by(TrialEpoch.epoch))] for r in rows}
    complete = [r for r in rows if r.state == "complete"]
    pruned = [r for r in rows if r.state == "pruned"]
    assert complete and len(complete) + len(pruned) == 6
    for r in complete:
        assert r.epochs_run == EPOCHS and curves[r.number] == [(1, e) for e in range(1, EPOCHS + 1)]
    for r in pruned:  # each stopped exactly at a rung, its checkpoint gone with it
        assert r.epochs_run in RUNGS and r.error is not None and f"paused at rung {r.epochs_run}" in r.error
        assert curves[r.number] == [(1, e) for e in range(1, r.epochs_run + 1)]
        assert r.checkpoint_path is None and r.rung is None
    theirs = {t._trial_id: t for t in optuna_trials(db, sid)}
    for r in rows:  # each row points at its last Optuna trial, ended as the row
        assert theirs[r.optuna_trial_id].state.name.lower() == r.state
    # A trial paused at every rung it reached (a pruned Optuna trial each, its value there) and was promoted
    # from each rung below the epoch it ended at (a fresh Optuna trial each, `promoted_from`).
    promotions = sum(rung < r.epochs_run for r in rows for rung in RUNGS)
    assert sum("promoted_from" in t.system_attrs for t in theirs.values()) == promotions
    assert sum(t.state.name == "PRUNED" for t in theirs.values()) == sum(
        rung <= r.epochs_run for r in rows for rung in RUNGS)
    assert len(theirs) == len(rows) + promotions
    db.dispose()
