"""Population-based training run by real worker processes: members pause at every interval boundary with their
checkpoint, each generation's bottom half continues from a top member's checkpoint with explored learning
rates (its runner trains with them), every member trains every epoch once on one Optuna trial, and the
study completes with its test evaluation and a best model whose config.json records its schedule."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from app.models import Study, TrialEpoch
from tests.factories import API, create_study_via_api
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

EPOCHS, POPULATION = 4, 4


def test_pbt_members_copy_the_best_checkpoints_and_train_on_with_explored_values(db_url: str,
                                                                                 tmp_path: Path) -> None:
    db, client, settings = resume_env(db_url, tmp_path)
    spec = training_spec(EPOCHS, n_trials=POPULATION, max_parallel=2)
    spec["search_space"]["lr_schedule"] = "constant"  # the recorded learning rate is the one in force
    spec["scheduler"] = {"name": "pbt", "population": POPULATION, "interval_epochs": 1, "quantile": 0.5}
    sid = create_study_via_api(client, spec)
    with processes() as procs:
        procs.append(start_worker(settings, tmp_path / "w.log", per_device=2))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 240, "the study to end")
    assert study_status(db, sid) == "completed"

    rows = trials_of(db, sid)
    with db.read_session() as session:
        assert session.scalar(select(Study.test_metrics).where(Study.id == sid)) is not None
        curves = {r.number: [(e.attempt, e.epoch, e.learning_rate) for e in session.scalars(
            select(TrialEpoch).where(TrialEpoch.trial_id == r.id).order_by(TrialEpoch.epoch))] for r in rows}
    assert len(rows) == POPULATION and all(r.state == "complete" and r.epochs_run == EPOCHS for r in rows)
    for r in rows:  # every epoch trained once, on the first attempt: a pause is not a retry
        assert [(a, e) for a, e, _ in curves[r.number]] == [(1, e) for e in range(1, EPOCHS + 1)]
    # The bottom half of each of the 3 generations copied a top member: 2 members a generation.
    exploited = [r for r in rows if r.schedule]
    assert exploited
    assert sum(step.get("source") is not None and step["epoch"] == EPOCHS - 1
               for r in rows for step in r.schedule or []) == 2
    for r in exploited:
        steps = r.schedule
        assert steps[0]["epoch"] == 0 and all(s["epoch"] < t["epoch"] for s, t in zip(steps, steps[1:], strict=False))
        last = steps[-1]
        assert last["source"] in {t.number for t in rows} - {r.number} and last["source_epoch"] == last["epoch"]
        lr = last["params"]["learning_rate"]
        assert 1e-3 <= lr <= 3e-2
        trained_with = {round(rate, 12) for _, e, rate in curves[r.number] if e > last["epoch"]}
        assert trained_with == {round(lr, 12)}  # its runner trained on with the explored value
    theirs = {t._trial_id: t for t in optuna_trials(db, sid)}
    assert len(theirs) == POPULATION  # one Optuna trial per member, however often it paused
    for r in rows:
        t = theirs[r.optuna_trial_id]
        assert t.state.name == "COMPLETE" and sorted(t.intermediate_values) == list(range(1, EPOCHS + 1))
        assert t.user_attrs.get("pbt_schedule") == r.schedule
    for r in exploited:  # the trial's page lists its schedule
        assert client.get(f"{API}/studies/{sid}/trials/{r.number}").json()["schedule"] == [
            {"source": None, "source_epoch": None, **step} for step in r.schedule]
    assert client.get(f"{API}/studies/{sid}/rungs").json() == {"scheduler": "pbt", "rungs": [
        {"epoch": b, "reached": POPULATION, "paused": 0, "promoted": POPULATION} for b in range(1, EPOCHS)]}
    best = max(rows, key=lambda r: r.value)
    config = json.loads((Path(settings.artifact_dir) / sid / f"trial-{best.number}.json").read_text())
    assert config.get("schedule") == best.schedule
    db.dispose()
