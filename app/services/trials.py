"""Trial reads straight from indexed SQL (never Optuna's load-everything calls)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Text, cast, func, literal, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.core.db import Database
from app.models import Trial, TrialEpoch, TrialState
from app.schemas.trial import EpochPoint, TrialDetail, TrialPublic, TrialsPublic
from app.services.errors import InvalidInput, NotFound
from app.services.ownership import own_study
from app.services.paging import CursorKind, column_kinds, decode_cursor, encode_cursor

SortKey = Literal["number", "value", "duration", "newest"]
_SORT_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "number": Trial.number, "value": Trial.value, "duration": Trial.duration_s, "newest": Trial.finished_at}
_JSON_FIELDS = ("params", "values", "metrics")
# A page's columns, JSON as text: ORM objects and per-row JSON processing cost more than the query itself.
_PAGE_COLUMNS = (Trial.id, Trial.number, Trial.state, Trial.source, Trial.value, Trial.attempt, Trial.worker_id,
                 Trial.device, Trial.started_at, Trial.finished_at, Trial.duration_s, Trial.epochs_run,
                 Trial.best_epoch, Trial.error, Trial.checkpoint_epoch, Trial.checkpoint_bytes, Trial.epochs_target,
                 Trial.rung,
                 *(cast(getattr(Trial, f), Text).label(f) for f in _JSON_FIELDS))


def list_trials(db: Database, *, owner: str, study_id: str, limit: int = 50, cursor: str | None = None,
                state: str | None = None, sort: SortKey = "number", order: str | None = None,
                after: int | None = None) -> TrialsPublic:
    """A page of a study's trials. Configurations enqueued but not yet claimed have no number: only
    `state=waiting` lists them (number null, in enqueue order), so numbered listings and `after=` polling
    stay as they were.

    Numbered pages run in two keyset segments, each one index range (migration 0004): trials with a value of
    the sort column, by (column, number), then those without it, by number. `newest` is the latest finished
    first.
    """
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        where = [Trial.study_id == study.id]
        if state:
            where.append(Trial.state == state)
        if state == TrialState.WAITING.value:
            rows = _waiting_page(session, where, cursor, limit)
        else:
            where.append(Trial.number.is_not(None))
            if after is not None:
                where.append(Trial.number > after)
            if order is None:
                order = "desc" if sort == "newest" or (sort == "value" and study.config.maximize) else "asc"
            rows = _numbered_page(session, where, _SORT_COLUMNS[sort], order == "desc", cursor, limit)
        count = session.scalar(select(func.count()).select_from(Trial).where(*where)) or 0
        page = rows[:limit]
        next_cursor = encode_cursor(list(page[-1][1])) if len(rows) > limit else None
        return TrialsPublic(data=_public([r[0] for r in page]), count=count, next_cursor=next_cursor)


Row = tuple[Any, list[Any]]  # a trial's page columns and its cursor


def _public(rows: list[Any]) -> list[TrialPublic]:
    """Page rows as schemas, built from typed columns without validating each again (as history does)."""
    maps = [dict(r._mapping) for r in rows]
    for field in _JSON_FIELDS:  # each JSON column of the page parsed in one call
        texts = [m[field] for m in maps]
        for m, value in zip(maps, json.loads("[" + ",".join(t or "null" for t in texts) + "]"), strict=True):
            m[field] = value
    fields = TrialPublic.model_fields
    return [TrialPublic.model_construct(**{k: v for k, v in m.items() if k in fields}) for m in maps]


def _waiting_page(session: Session, where: list[ColumnElement[bool]], cursor: str | None, limit: int) -> list[Row]:
    stmt = select(*_PAGE_COLUMNS).where(*where)
    if cursor:
        stmt = stmt.where(Trial.id > decode_cursor(cursor, [int])[0])
    return [(t, [t.id]) for t in session.execute(stmt.order_by(Trial.id).limit(limit + 1))]


def _numbered_page(session: Session, where: list[ColumnElement[bool]], column: InstrumentedAttribute[Any],
                   desc: bool, cursor: str | None, limit: int) -> list[Row]:
    """Up to limit + 1 trials after the cursor: [0, value, number] in the first segment, [1, number] after.

    Either way the earlier trial comes first among equal values: one tie rule with the best trial's.
    """
    position = _decode_numbered(cursor, column_kinds([column])[0]) if cursor else None
    rows: list[Row] = []
    if position is None or position[0] == 0:
        stmt = select(*_PAGE_COLUMNS).where(*where, column.is_not(None))
        if position is not None:
            value = literal(position[1], column.type)
            beyond = column < value if desc else column > value
            stmt = stmt.where(beyond | ((column == value) & (Trial.number > position[2])))
        keys = [column.desc() if desc else column.asc(), Trial.number.asc()]
        if column is Trial.number:
            keys = keys[:1]
        rows = [(t, [0, _cursor_value(getattr(t, column.key)), t.number])
                for t in session.execute(stmt.order_by(*keys).limit(limit + 1))]
        position = None
    if len(rows) <= limit and column is not Trial.number:
        stmt = select(*_PAGE_COLUMNS).where(*where, column.is_(None))
        if position is not None:
            stmt = stmt.where(Trial.number < position[1] if desc else Trial.number > position[1])
        stmt = stmt.order_by(Trial.number.desc() if desc else Trial.number.asc()).limit(limit + 1 - len(rows))
        rows += [(t, [1, t.number]) for t in session.execute(stmt)]
    return rows


def cursor_kinds(sort: SortKey) -> list[CursorKind]:
    """What a numbered page's cursor holds in its first segment: [0, the sort column's value, number]."""
    return [int, column_kinds([_SORT_COLUMNS[sort]])[0], int]


def _decode_numbered(cursor: str, kind: CursorKind) -> list[Any]:
    try:
        position = decode_cursor(cursor, [int, kind, int])
    except InvalidInput:
        position = decode_cursor(cursor, [int, int])  # the second segment: [1, number]
    if position[0] != (0 if len(position) == 3 else 1):
        raise InvalidInput(("query", "cursor"), "not a cursor this endpoint returned")
    return position


def _cursor_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


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
        return TrialDetail.model_validate({**TrialPublic.model_validate(trial).model_dump(), "curve": curve,
                                           "schedule": trial.schedule})

