"""The rows a caller may see: their own studies, and a study's best trial. Every service reads through here."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Study, Trial, TrialState
from app.services.errors import NotFound


def own_study(session: Session, *, owner: str, study_id: str, for_update: bool = False) -> Study:
    """The owner's study, else NotFound (another owner's study does not exist for this caller)."""
    stmt = select(Study).where(Study.id == study_id, Study.owner == owner)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFound("study not found")
    return row


def best_trial_in_tx(session: Session, study: Study) -> Trial | None:
    """The best complete trial by the first objective, read with one indexed query."""
    return session.scalars(select(Trial).where(
        Trial.study_id == study.id, Trial.state == TrialState.COMPLETE.value, Trial.value.is_not(None)
    ).order_by(*study.best_first()).limit(1)).first()
