"""Where a study's scheduler pauses trials, and what became of them there, read from the trial rows."""

from __future__ import annotations

from sqlalchemy import func, select

from app.core.db import Database
from app.models import Trial, TrialEpoch, TrialState, current_curve
from app.schemas.insights import RungPublic, RungsPublic
from app.services.ownership import own_study


def study_rungs(db: Database, *, owner: str, study_id: str) -> RungsPublic:
    """Per rung (ASHA) or boundary (PBT): the trials that reached it, wait there, and went on past it (trained
    beyond it, or run or wait to: promoted, continued). A trial counts by its current attempt's curve: one
    that restarted from scratch counts where it is now."""
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        spec = study.config
        pauses = spec.scheduler_pauses()
        if not pauses:
            return RungsPublic(scheduler=None, rungs=[])
        reached = session.execute(
            select(func.max(TrialEpoch.epoch), Trial.state).join(Trial, current_curve())
            .where(Trial.study_id == study_id).group_by(Trial.id, Trial.state)).all()
        waiting = dict(session.execute(
            select(Trial.rung, func.count()).where(Trial.study_id == study_id, Trial.state == TrialState.PAUSED.value,
                                                   Trial.rung.is_not(None)).group_by(Trial.rung)).all())
    going_on = {TrialState.RUNNING.value, TrialState.WAITING.value}
    assert spec.scheduler is not None
    return RungsPublic(scheduler=spec.scheduler.name, rungs=[
        RungPublic(epoch=epoch, reached=sum(e >= epoch for e, _ in reached), paused=waiting.get(epoch, 0),
                   promoted=sum(e > epoch or (e == epoch and state in going_on) for e, state in reached))
        for epoch in pauses])
