"""Studies: create, read, steer and delete; each function owns its transaction."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState as OptunaState
from sqlalchemy import func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import lifecycle
from app.core.config import Settings
from app.core.db import Database, retry_on_disconnect
from app.core.optuna_store import optuna_storage
from app.ml.artifacts import checkpoint_folders_of
from app.models import Study, StudyStatus, Trial, TrialState
from app.models.base import utcnow
from app.schemas.study import BestTrial, Progress, StudiesPublic, StudyPublic, StudySpec
from app.services.enqueue import add_history, add_warm_configurations_in_tx, plan_warm_start
from app.services.errors import Conflict
from app.services.fates import end_waiting_in_tx
from app.services.ownership import best_trial_in_tx, own_study
from app.services.paging import decode_cursor, encode_cursor
from app.services.validation import validate_spec


def create_study(db: Database, settings: Settings, *, owner: str, spec: StudySpec,
                 idempotency_key: str | None = None) -> tuple[StudyPublic, bool]:
    """Validate spec against its dataset and space, record it queued; (study, created).

    The same Idempotency-Key again (even concurrently) returns the one study it created; with a different
    body it is a Conflict, as a retried request never changes its body.
    """
    if idempotency_key:
        existing = _by_idempotency_key(db, owner, idempotency_key, spec)
        if existing is not None:
            return existing, False
    resolved = validate_spec(db, settings, owner=owner, spec=spec)
    warm_start = None
    if spec.warm_start is not None:
        warm_start = plan_warm_start(db, owner=owner, spec=spec, resolved=resolved)
    study_id = uuid.uuid4().hex
    optuna_name = f"hpsearch-{study_id}"
    storage = optuna_storage(db.url)
    ostudy = optuna.create_study(storage=storage, study_name=optuna_name,
                                 directions=[o.direction for o in spec.objectives])
    ostudy.set_user_attr("hpsearch_study_id", study_id)
    ostudy.set_user_attr("hpsearch_name", spec.name)
    row = Study(id=study_id, owner=owner, name=spec.name, spec=spec.model_dump(mode="json"),
                status=StudyStatus.QUEUED.value, optuna_name=optuna_name, idempotency_key=idempotency_key,
                n_trials=spec.budget.n_trials, max_parallel=spec.budget.max_parallel)
    try:
        if warm_start is not None:
            add_history(db, warm_start, optuna_name=optuna_name)  # before any worker can see the study
        with db.session() as session:  # the row and its warm configurations become claimable together
            session.add(row)
            if warm_start is not None:
                session.flush()
                add_warm_configurations_in_tx(session, warm_start, study=row)
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race.
        optuna.delete_study(study_name=optuna_name, storage=storage)
        existing = _by_idempotency_key(db, owner, idempotency_key or "", spec)
        if existing is None:
            raise
        return existing, False
    return get_study(db, owner=owner, study_id=study_id), True


def _by_idempotency_key(db: Database, owner: str, key: str, spec: StudySpec) -> StudyPublic | None:
    """The owner's study created with this key, if any; Conflict when it was created from another body."""
    with db.read_session() as session:
        row = session.scalars(select(Study).where(Study.owner == owner, Study.idempotency_key == key)).first()
        if row is None:
            return None
        if row.spec != spec.model_dump(mode="json"):
            raise Conflict("this Idempotency-Key was used with a different body; use a new key for a new study")
        return _public(session, row)


def get_study(db: Database, *, owner: str, study_id: str) -> StudyPublic:
    with db.read_session() as session:
        return _public(session, own_study(session, owner=owner, study_id=study_id))


def list_studies(db: Database, *, owner: str, limit: int = 50, cursor: str | None = None,
                 status: str | None = None) -> StudiesPublic:
    with db.read_session() as session:
        stmt = select(Study).where(Study.owner == owner)
        count_stmt = select(func.count()).select_from(Study).where(Study.owner == owner)
        if status:
            stmt = stmt.where(Study.status == status)
            count_stmt = count_stmt.where(Study.status == status)
        if cursor:
            created, sid = decode_cursor(cursor, (datetime, str))
            stmt = stmt.where(tuple_(Study.created_at, Study.id) < (created, sid))
        rows = session.scalars(stmt.order_by(Study.created_at.desc(), Study.id.desc()).limit(limit + 1)).all()
        page = rows[:limit]
        tallies = _tallies(session, [r.id for r in page])
        data = [_public(session, r, tallies.get(r.id, _Tally())) for r in page]
        next_cursor = encode_cursor([page[-1].created_at.isoformat(), page[-1].id]) if len(rows) > limit else None
        return StudiesPublic(data=data, count=session.scalar(count_stmt) or 0, next_cursor=next_cursor)


@dataclass
class _Tally:
    """A study's trials by state, and the checkpoint bytes its trial rows hold."""

    counts: dict[str, int] = field(default_factory=dict)
    checkpoint_bytes: int = 0


def _tallies(session: Session, study_ids: list[str]) -> dict[str, _Tally]:
    """One grouped read for every study of a page: the counts and the checkpoint bytes together."""
    out: dict[str, _Tally] = {}
    if not study_ids:
        return out
    rows = session.execute(select(Trial.study_id, Trial.state, func.count(), func.sum(Trial.checkpoint_bytes))
                           .where(Trial.study_id.in_(study_ids)).group_by(Trial.study_id, Trial.state))
    for sid, state, n, size in rows:
        tally = out.setdefault(sid, _Tally())
        tally.counts[state] = n
        tally.checkpoint_bytes += int(size or 0)
    return out


def _public(session: Session, study: Study, tally: _Tally | None = None) -> StudyPublic:
    if tally is None:
        tally = _tallies(session, [study.id]).get(study.id, _Tally())
    counts = tally.counts
    finished = sum(counts.get(s.value, 0) for s in TrialState if s.is_finished())
    best = best_trial_in_tx(session, study)
    end = study.finished_at or utcnow()
    return StudyPublic(
        id=study.id, name=study.name, status=study.status, dataset=study.config.dataset,
        model=study.config.model, created_at=study.created_at, started_at=study.started_at,
        finished_at=study.finished_at, stop_reason=study.stop_reason, stopped_at=_stopped_at(study),
        error=study.error,
        elapsed_s=(end - study.started_at).total_seconds() if study.started_at else None,
        progress=Progress(n_trials=study.n_trials, finished=finished, **counts),
        best_trial=BestTrial(number=best.number, value=best.value, values=best.values, params=best.params or {})
        if best is not None and best.number is not None else None,
        test_metrics=study.test_metrics, checkpoint_bytes=tally.checkpoint_bytes, spec=study.spec,
    )


def _stopped_at(study: Study) -> datetime | None:
    if study.stop_requested_at is not None:  # target_value, no_improvement
        return study.stop_requested_at
    if study.stop_reason == "timeout":
        return study.deadline_at
    return study.finished_at if study.stop_reason else None


# ---- state changes ---------------------------------------------------------------------------------------


def change_state(db: Database, *, owner: str, study_id: str, action: str,
                 artifact_dir: Path | None = None) -> StudyPublic:
    """pause, resume or cancel (app.lifecycle decides); Conflict when the study's status does not allow it.
    A cancel ends the study's waiting and paused trials, whose checkpoint folders then go from `artifact_dir`:
    every attempt's, with what dead workers wrote and never recorded (no finalization sweeps a cancelled study)."""
    ended: list[int] = []  # numbers of the trials a cancel ends
    with db.session() as session:
        study = own_study(session, owner=owner, study_id=study_id, for_update=True)
        try:
            target = lifecycle.after_action(StudyStatus(study.status), lifecycle.Action(action),
                                            started=study.started_at is not None)
        except lifecycle.BadTransition as exc:
            raise Conflict(str(exc)) from exc
        study.status = target.value
        if target is StudyStatus.CANCELLED:
            study.finished_at = now = utcnow()
            study.stop_reason = "cancelled"
            # Waiting trials end here; running ones are stopped by their workers at their next epoch.
            ended = [n for n in session.scalars(select(Trial.number).where(
                Trial.study_id == study.id, Trial.epochs_target.is_(None),
                Trial.state.in_([TrialState.WAITING.value, TrialState.PAUSED.value]))) if n is not None]
            end_waiting_in_tx(session, study.id, target, now)
        session.flush()
        public = _public(session, study)
    if target is StudyStatus.CANCELLED:
        settle_optuna_trials(db, study_id)
        if artifact_dir is not None:
            for number in ended:
                for folder in checkpoint_folders_of(artifact_dir / study_id, number):
                    shutil.rmtree(folder, ignore_errors=True)
    return public


def settle_optuna_trials(db: Database, study_id: str) -> None:
    """A study has ended: end each of its Optuna trials still RUNNING or WAITING that no running row of ours
    holds, as its row ended (FAIL when no row names it).

    Those are trials our rows just ended, an ask in flight when the study ended (its bind is refused from
    now on, and fails it too) and any a crashed worker left behind; a running row's trial ends through its
    worker. Written to the storage alone: the sampler of an ended study never proposes again.
    """
    with db.read_session() as session:
        optuna_name = session.scalars(select(Study.optuna_name).where(Study.id == study_id)).first()
    if optuna_name is None:
        return
    storage = optuna_storage(db.url)
    oid = retry_on_disconnect(storage.get_study_id_from_name, optuna_name)
    live = retry_on_disconnect(storage.get_all_trials, oid, deepcopy=False,
                               states=(OptunaState.RUNNING, OptunaState.WAITING))
    ids = [retry_on_disconnect(storage.get_trial_id_from_study_id_trial_number, oid, t.number) for t in live]
    if not ids:
        return
    with db.read_session() as session:
        rows = {r.optuna_trial_id: r for r in session.execute(select(
            Trial.optuna_trial_id, Trial.state, Trial.value, Trial.values).where(
            Trial.study_id == study_id, Trial.optuna_trial_id.in_(ids)))}
    for trial_id in ids:
        row = rows.get(trial_id)
        state = TrialState(row.state) if row is not None else TrialState.FAIL
        if not state.is_finished():
            continue
        values = (row.values or ([row.value] if row.value is not None else None)) \
            if row is not None and state is not TrialState.FAIL else None
        try:
            retry_on_disconnect(storage.set_trial_state_values, trial_id, _OPTUNA_STATE[state], values)
        except UpdateFinishedTrialError:
            pass  # its worker told it meanwhile


_OPTUNA_STATE = {TrialState.COMPLETE: OptunaState.COMPLETE, TrialState.PRUNED: OptunaState.PRUNED,
                 TrialState.FAIL: OptunaState.FAIL}


def delete_study(db: Database, settings: Settings, *, owner: str, study_id: str) -> None:
    """Remove the study, its trials (workers stop them), its Optuna study and its artifacts."""
    with db.session() as session:
        study = own_study(session, owner=owner, study_id=study_id, for_update=True)
        optuna_name = study.optuna_name
        session.delete(study)
    try:  # through a database blip too: the row is gone, so nothing else would ever delete it
        retry_on_disconnect(optuna.delete_study, study_name=optuna_name, storage=optuna_storage(db.url),
                            patience_s=10.0)
    except KeyError:
        pass  # already gone
    assert settings.artifact_dir is not None
    shutil.rmtree(settings.artifact_dir / study_id, ignore_errors=True)
    shutil.rmtree(settings.artifact_dir / "tensorboard" / study_id, ignore_errors=True)
