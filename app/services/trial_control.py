"""A client's pause and resume of one trial; app.lifecycle decides what each does to the row.

Pausing a running trial only asks: its worker sees the request when it records the next epoch, checkpoints the
trial at the following epoch boundary and parks it `paused` (workers.leasing.pause_trial), freeing the slot.
Resuming puts it back in line; the worker that claims it continues from that checkpoint on the same Optuna
trial. A trial that keeps no checkpoint (a plugin's own loop that takes no `resume`) stops at once and starts
over. A fused member continues alone from its checkpoint.

Extending a complete trial puts it back in line, whatever the study's budget, to continue from its checkpoint
up to more epochs; a completed study runs again until it has, then its test evaluation is redone once.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import lifecycle
from app.core.db import Database
from app.lifecycle import TrialAction, TrialControl
from app.models import Study, StudyStatus, Trial, TrialState
from app.models.base import utcnow
from app.schemas.trial import TrialDetail
from app.services.errors import Conflict, NotFound
from app.services.ownership import own_study
from app.services.trials import get_trial


def _lock_trial(session: Session, *, owner: str, study_id: str, number: int) -> tuple[Study, Trial]:
    study = own_study(session, owner=owner, study_id=study_id, for_update=True)  # the study first, as workers
    trial = session.scalars(select(Trial).where(Trial.study_id == study.id, Trial.number == number)
                            .with_for_update()).first()
    if trial is None:
        raise NotFound("trial not found")
    return study, trial


def control_trial(db: Database, *, owner: str, study_id: str, number: int, action: str) -> TrialDetail:
    """pause or resume trial `number`; Conflict, saying why, when its state does not allow it."""
    with db.session() as session:
        study, trial = _lock_trial(session, owner=owner, study_id=study_id, number=number)
        try:
            control = lifecycle.after_trial_action(TrialState(trial.state), TrialAction(action),
                                                   pause_requested=trial.pause_requested_at is not None,
                                                   study=StudyStatus(study.status))
        except lifecycle.BadTransition as exc:
            raise Conflict(f"trial {number}: {exc}") from exc
        if control is TrialControl.PARK:
            trial.state = TrialState.PAUSED.value
        elif control is TrialControl.REQUEST:
            trial.pause_requested_at = utcnow()
        elif control is TrialControl.UNPARK:  # a trial its scheduler paused at a rung goes on, as if promoted
            trial.state, trial.rung = TrialState.WAITING.value, None
        elif control is TrialControl.WITHDRAW:
            trial.pause_requested_at = None
    return get_trial(db, owner=owner, study_id=study_id, number=number)


def extend_trial(db: Database, *, owner: str, study_id: str, number: int, epochs: int) -> TrialDetail:
    """Extend complete trial `number` by `epochs` from its checkpoint; Conflict, saying why, when it cannot."""
    with db.session() as session:
        study, trial = _lock_trial(session, owner=owner, study_id=study_id, number=number)
        try:
            target = lifecycle.extension_target(TrialState(trial.state), checkpoint_epoch=trial.checkpoint_epoch,
                                                epochs=epochs, study=StudyStatus(study.status))
        except lifecycle.BadTransition as exc:
            raise Conflict(f"trial {number}: {exc}") from exc
        trial.state, trial.epochs_target = TrialState.WAITING.value, target
        if study.status == StudyStatus.COMPLETED.value:  # runs again, and is evaluated again after it
            study.status = StudyStatus.RUNNING.value
            study.finished_at = None
    return get_trial(db, owner=owner, study_id=study_id, number=number)
