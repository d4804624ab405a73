"""PBT's generations through the real lease functions a worker uses, on SQLite and PostgreSQL: members paused at a
boundary wait until every member has reached it (the barrier); the claim that finds the barrier continues the
whole generation, its bottom quantile from a top member's checkpoint file (linked into its own folder) with
explored values, recorded as its schedule and leased as the parameters in force; the others go on as they
were, each on its own Optuna trial, which a boundary pause never ends."""

from __future__ import annotations

from pathlib import Path

import optuna
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study, Trial, TrialState
from app.services import rungs
from tests.factories import create_study_via_service, study_spec
from workers import asking, leasing

PBT = {"name": "pbt", "population": 4, "interval_epochs": 2, "quantile": 0.25, "resample_probability": 0.0}
LR = 0.01


def _claim(db: Database, artifact_dir: Path | None) -> leasing.Lease | None:
    return leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600, artifact_dir=artifact_dir)


def _to_boundary(db: Database, lease: leasing.Lease, artifact_dir: Path, value: float, epoch: int = 2) -> None:
    """The member trained to `epoch` (worth `value` there), checkpointed it and paused for its scheduler."""
    for e in range(lease.checkpoint_epoch or 0, epoch):
        assert leasing.record_epoch(db, lease, epoch=e + 1, train_loss=1.0, val_loss=1.0, val_metric=value,
                                    learning_rate=LR, seconds=0.1) is leasing.EpochStatus.OK
    path = Path(lease.study_id) / "checkpoints" / f"trial-{lease.number}-1" / f"epoch-{epoch:06d}.safetensors"
    (artifact_dir / path).parent.mkdir(parents=True, exist_ok=True)
    (artifact_dir / path).write_text(f"weights of trial {lease.number}")
    assert leasing.record_checkpoint(db, lease, path=str(path), epoch=epoch, size=1).recorded
    tells = leasing.pause_trial(db, lease, rung=epoch)
    assert tells == []  # a boundary pause leaves the member's Optuna trial running


def _population(db: Database, settings: Settings, tmp_path: Path) -> tuple[str, list[leasing.Lease], Path]:
    sid = create_study_via_service(db, settings, spec=study_spec(
        budget={"n_trials": 4, "epochs": 6, "max_parallel": 4}, scheduler=PBT))
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    ostudy = asking.open_study(optuna_storage(db.url), name, optuna.samplers.RandomSampler(seed=0),
                               optuna.pruners.NopPruner())
    members = []
    for _ in range(4):
        claimed = _claim(db, tmp_path)
        assert claimed is not None
        asked = ostudy.ask()
        params = {"learning_rate": LR, "optimizer": "adam", "units": 32 + asked.number}
        bound = leasing.bind_trial(db, claimed, number=asked.number, optuna_trial_id=asked._trial_id, params=params)
        assert bound is not None
        members.append(bound)
    return sid, members, tmp_path


def _rows(db: Database, sid: str) -> dict[int, Trial]:
    with db.read_session() as session:
        return {t.number: t for t in session.scalars(select(Trial).where(Trial.study_id == sid))}


def test_the_barrier_continues_a_generation_its_worst_member_from_the_best_ones_checkpoint(
        db: Database, settings: Settings, tmp_path: Path) -> None:
    sid, members, artifacts = _population(db, settings, tmp_path)
    for lease, value in zip(members[:3], (0.2, 0.9, 0.5), strict=True):
        _to_boundary(db, lease, artifacts, value)
    assert _claim(db, artifacts) is None  # member 3 still trains: the generation waits for it
    assert _rungs(db, sid) == [(2, 3, 3, 0), (4, 0, 0, 0)]  # (epoch, reached, paused, continued)
    _to_boundary(db, members[3], artifacts, 0.6)

    first = _claim(db, artifacts)  # the barrier: the whole generation goes on
    assert first is not None and first.number == members[0].number and first.resumes
    assert first.promoted_from is None and first.optuna_trial_id == members[0].optuna_trial_id
    # Member 0 (0.2) was the bottom quarter: it continues from member 1's (0.9) checkpoint, with its values.
    assert first.schedule is not None and first.schedule[-1]["source"] == members[1].number
    assert first.params == {**members[1].params, "learning_rate": first.params["learning_rate"]}
    assert first.params["learning_rate"] in (0.8 * LR, 1.2 * LR)
    assert first.checkpoint_epoch == 2
    copied = artifacts / first.checkpoint
    assert copied.parent.name == f"trial-{members[0].number}-1"
    assert copied.read_text() == f"weights of trial {members[1].number}"
    assert first.schedule == [{"epoch": 0, "params": members[1].params},
                              {"epoch": 2, "params": first.params, "source": members[1].number, "source_epoch": 2}]

    assert _rungs(db, sid) == [(2, 4, 0, 4), (4, 0, 0, 0)]
    rest = [_claim(db, artifacts) for _ in range(3)]  # the others wait in line, unchanged
    assert [(r.number, r.schedule, r.params) for r in rest if r is not None] == [
        (m.number, None, m.params) for m in members[1:]]
    rows = _rows(db, sid)
    assert all(t.state == TrialState.RUNNING.value and t.rung is None for t in rows.values())
    stored = optuna.load_study(study_name=_optuna_name(db, sid), storage=optuna_storage(db.url)).trials
    assert [t.state for t in stored] == [optuna.trial.TrialState.RUNNING] * 4


def test_a_member_ahead_waits_and_without_the_artifact_store_members_keep_their_own(
        db: Database, settings: Settings, tmp_path: Path) -> None:
    sid, members, artifacts = _population(db, settings, tmp_path)
    for lease, value in zip(members[:3], (0.2, 0.9, 0.5), strict=True):
        _to_boundary(db, lease, artifacts, value)
    _to_boundary(db, members[3], artifacts, 0.6, epoch=4)  # it ran ahead (the others restarted behind it, say)

    leased = [_claim(db, None) for _ in range(4)]
    assert [lease.number for lease in leased if lease is not None] == [m.number for m in members[:3]]
    assert all(lease is not None and lease.schedule is None and lease.checkpoint_epoch == 2 for lease in leased[:3])
    rows = _rows(db, sid)
    assert (rows[members[3].number].state, rows[members[3].number].rung) == (TrialState.PAUSED.value, 4)


def _rungs(db: Database, sid: str) -> list[tuple[int, int, int, int]]:
    found = rungs.study_rungs(db, owner="alice", study_id=sid)
    return [(r.epoch, r.reached, r.paused, r.promoted) for r in found.rungs]


def _optuna_name(db: Database, sid: str) -> str:
    with db.read_session() as session:
        return session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()

