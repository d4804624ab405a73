"""Trial reads straight from indexed SQL (never Optuna's load-everything calls)."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, select, tuple_

from app.core.db import Database
from app.models import Study, Trial, TrialEpoch, TrialState
from app.schemas.trial import EpochPoint, TrialDetail, TrialPublic, TrialsPublic
from app.services.errors import NotFound
from app.services.ownership import own_study
from app.services.paging import column_kinds, decode_cursor, encode_cursor

SortKey = Literal["number", "value", "duration"]


def _sort_keys(study: Study, sort: SortKey, order: str | None) -> list[ColumnElement[Any]]:
    """Columns that order ascending for the page; descending orders are negated numbers.

    Trials without a value go last, and configurations not yet numbered after them in enqueue order; every
    key is non-null so that keyset cursors compare.
    """
    column = {"number": Trial.number, "value": Trial.value, "duration": Trial.duration_s}[sort]
    if order is None:
        order = "desc" if sort == "value" and study.config.maximize else "asc"
    sign = -1 if order == "desc" else 1
    missing = case((column.is_(None), 1), else_=0)
    unnumbered = case((Trial.number.is_(None), 1), else_=0)
    tie = func.coalesce(Trial.number, 0) if sort == "value" else sign * func.coalesce(Trial.number, 0)
    keys = [missing, sign * func.coalesce(column, 0), unnumbered, tie, Trial.id]  # the earlier trial wins a tie
    if sort == "value":  # a pruned trial's value is its last reported epoch: rank it after every complete one
        keys.insert(0, case((Trial.state == TrialState.COMPLETE.value, 0), else_=1))
    return keys


def list_trials(db: Database, *, owner: str, study_id: str, limit: int = 50, cursor: str | None = None,
                state: str | None = None, sort: SortKey = "number", order: str | None = None,
                after: int | None = None) -> TrialsPublic:
    """A page of a study's trials. Configurations enqueued but not yet claimed have no number: only
    `state=waiting` lists them (number null), so numbered listings and `after=` polling stay as they were."""
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        where = [Trial.study_id == study.id]
        if state != TrialState.WAITING.value:
            where.append(Trial.number.is_not(None))
        if state:
            where.append(Trial.state == state)
        if after is not None:
            where.append(Trial.number > after)
        keys = _sort_keys(study, sort, order)
        stmt = select(Trial, *keys).where(*where)
        if cursor:
            stmt = stmt.where(tuple_(*keys) > tuple(decode_cursor(cursor, column_kinds(keys))))
        rows = session.execute(stmt.order_by(*keys).limit(limit + 1)).all()
        count = session.scalar(select(func.count()).select_from(Trial).where(*where)) or 0
        page = rows[:limit]
        next_cursor = encode_cursor(list(page[-1][1:])) if len(rows) > limit else None
        return TrialsPublic(data=[TrialPublic.model_validate(r[0]) for r in page], count=count,
                            next_cursor=next_cursor)


def get_trial(db: Database, *, owner: str, study_id: str, number: int) -> TrialDetail:
    """A trial with the per-epoch curve of its latest attempt."""
    with db.read_session() as session:
        own_study(session, owner=owner, study_id=study_id)
        trial = session.scalars(select(Trial).where(Trial.study_id == study_id, Trial.number == number)).first()
        if trial is None:
            raise NotFound("trial not found")
        epochs = session.scalars(select(TrialEpoch).where(
            TrialEpoch.trial_id == trial.id, TrialEpoch.attempt == trial.attempt).order_by(TrialEpoch.epoch)).all()
        curve = [EpochPoint.model_validate(e) for e in epochs]
        return TrialDetail.model_validate({**TrialPublic.model_validate(trial).model_dump(), "curve": curve})

