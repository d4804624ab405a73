"""A client's pause and resume of one trial; app.lifecycle decides what each does to the row.

Pausing a running trial only asks: its worker sees the request when it records the next epoch, checkpoints the
trial at the following epoch boundary and parks it `paused` (workers.leasing.pause_trial), freeing the slot.
Resuming puts it back in line; the worker that claims it continues from that checkpoint on the same Optuna
trial. A trial that keeps no checkpoint (a fused member, a plugin's own loop) stops at once and starts over.
"""

from __future__ import annotations

from sqlalchemy import select

from app import lifecycle
from app.core.db import Database
from app.lifecycle import TrialAction, TrialControl
from app.models import StudyStatus, Trial, TrialState
from app.models.base import utcnow
from app.schemas.trial import TrialDetail
from app.services.errors import Conflict, NotFound
from app.services.ownership import own_study
from app.services.trials import get_trial


def control_trial(db: Database, *, owner: str, study_id: str, number: int, action: str) -> TrialDetail:
    """pause or resume trial `number`; Conflict, saying why, when its state does not allow it."""
    with db.session() as session:
        study = own_study(session, owner=owner, study_id=study_id, for_update=True)  # the study first, as workers
        trial = session.scalars(select(Trial).where(Trial.study_id == study.id, Trial.number == number)
                                .with_for_update()).first()
        if trial is None:
            raise NotFound("trial not found")
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
        elif control is TrialControl.UNPARK:
            trial.state = TrialState.WAITING.value
        elif control is TrialControl.WITHDRAW:
            trial.pause_requested_at = None
    return get_trial(db, owner=owner, study_id=study_id, number=number)
