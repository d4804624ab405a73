"""Trials in bulk: the CSV export, the compact column history and learning curves the dashboard plots.

Every read pages through SQL by trial number, so no request holds 10,000 ORM objects at once.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from typing import Any

import optuna.distributions as od
from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database
from app.ml.space import BY_NAME, CONDITIONAL_ON_OPTIMIZER
from app.models import Study, Trial, TrialEpoch, TrialState
from app.schemas.insights import CurvePublic, CurvesPublic, HistoryPublic
from app.schemas.study import StudySpec
from app.services.importance import parse_params, study_space
from app.services.ownership import own_study

CSV_FIRST_CHUNK = 100
CSV_CHUNK = 2000
HISTORY_PAGE = 10_000
MAX_CURVES = 60
BASE_COLUMNS = ("number", "state", "value", "values", "duration_s", "attempt", "epochs_run", "best_epoch",
                "started_at", "finished_at", "worker_id", "device", "source", "error")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---- CSV -------------------------------------------------------------------------------------------------


def trials_csv(db: Database, settings: Settings, *, owner: str, study_id: str) -> Iterator[str]:
    """All trials, one row each, params as `params_<name>` columns, as chunks of CSV text.

    The owner check runs here, before the response starts, so a wrong study is a 404, not a broken download.
    """
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        spec = study.config
    names = param_columns(db, settings, owner=owner, spec=spec, study_id=study_id)
    header = [*BASE_COLUMNS, *(f"params_{n}" for n in names)]
    return _csv_chunks(db, study_id, header, names)


def param_columns(db: Database, settings: Settings, *, owner: str, spec: StudySpec,
                  study_id: str) -> list[str]:
    """The study's parameter names in the documented order: from its resolved space, else from its trials."""
    space = study_space(db, settings, owner=owner, spec=spec)
    if space is not None:
        return [name for name in space if _can_be_active(name, space)]
    seen: set[str] = set()
    with db.read_session() as session:
        for params in session.scalars(select(Trial.params).where(Trial.study_id == study_id)):
            seen.update(params or {})
    return sorted(seen, key=_documented_order)


def _can_be_active(name: str, space: dict[str, Any]) -> bool:
    """False for a conditional parameter whose condition the space never meets (momentum without SGD)."""
    parents = CONDITIONAL_ON_OPTIMIZER.get(name)
    if parents is None:
        return True
    optimizer = space.get("optimizer")
    choices = optimizer.choices if isinstance(optimizer, od.CategoricalDistribution) else (optimizer,)
    return any(choice in parents for choice in choices)


def _csv_chunks(db: Database, study_id: str, header: list[str], names: list[str]) -> Iterator[str]:
    """CSV text in chunks read by keyset on the trial number, each in its own short read transaction.

    Memory stays one chunk whatever the study's size, and no transaction stays open while a slow client
    downloads (an open read on SQLite holds back WAL checkpoints; on PostgreSQL, vacuum). The first chunk is
    small so that the download starts at once.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    t = Trial.__table__.c
    columns = (t.number, t.state, t.value, cast(t["values"], Text), t.duration_s, t.attempt, t.epochs_run,
               t.best_epoch, t.started_at, t.finished_at, t.worker_id, t.device, t.source, t.error,
               cast(t.params, Text))
    after, size = -1, CSV_FIRST_CHUNK
    while True:
        with db.read_session() as session:
            rows = session.execute(select(*columns).where(t.study_id == study_id, t.number > after)
                                   .order_by(t.number).limit(size)).all()
        params = parse_params([r[-1] for r in rows])
        values = _parse_json([r[3] for r in rows])
        for r, p, v in zip(rows, params, values, strict=True):
            writer.writerow([_cell(c) for c in _csv_row(r, v, p, names)])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        if len(rows) < size:
            return
        after, size = rows[-1][0], CSV_CHUNK


def _parse_json(texts: list[str | None]) -> list[Any]:
    return list(json.loads("[" + ",".join(p or "null" for p in texts) + "]"))


def _csv_row(r: Any, values: list[float] | None, params: dict[str, Any], names: list[str]) -> list[Any]:
    (number, state, value, _, duration_s, attempt, epochs_run, best_epoch, started_at, finished_at, worker_id,
     device, source, error, _) = r
    text = json.dumps([_finite(v) for v in values]) if values is not None else None
    return [number, state, _finite(value), text, duration_s, attempt, epochs_run, best_epoch,
            started_at.isoformat() if started_at else None, finished_at.isoformat() if finished_at else None,
            worker_id, device, source, error, *(params.get(n) for n in names)]


def _cell(value: Any) -> Any:
    """Text that a spreadsheet would run as a formula is quoted with a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# ---- compact history -------------------------------------------------------------------------------------


def history(db: Database, *, owner: str, study_id: str, after: int = -1,
            limit: int = HISTORY_PAGE) -> HistoryPublic:
    """Trials numbered after `after`, in columns: what the history and parallel-coordinate plots need."""
    t = Trial.__table__.c
    # Core columns and params as text: ORM rows and per-row JSON processing cost more than the query.
    columns = (t.number, t.state, t.value, t.duration_s, t.epochs_run, cast(t.params, Text))
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        rows = session.execute(select(*columns).where(t.study_id == study_id, t.number > after)
                               .order_by(t.number).limit(limit + 1)).all()
        objective, direction = study.config.primary.metric, str(study.config.primary.direction)
    page = rows[:limit]
    numbers, states, values, durations, epochs, params_text = (list(c) for c in zip(*page, strict=True)) \
        if page else ([], [], [], [], [], [])
    params = parse_params(params_text)
    names = sorted({name for p in params for name in p}, key=_documented_order)
    return HistoryPublic.model_construct(  # built here from typed columns: no need to validate 10,000 rows
        objective=objective, direction=direction, param_names=names, number=numbers, state=states,
        value=[_finite(v) for v in values], duration_s=durations, epochs_run=epochs,
        params={n: [p.get(n) for p in params] for n in names},
        next_after=numbers[-1] if len(rows) > limit else None,
    )


def _documented_order(name: str) -> tuple[int, str]:
    order = list(BY_NAME)
    return (order.index(name) if name in order else len(order), name)


# ---- learning curves -------------------------------------------------------------------------------------


def curves(db: Database, *, owner: str, study_id: str, numbers: list[int], top: int = 0,
           recent: int = 0) -> CurvesPublic:
    """Per-epoch curves of the given trials, the `top` best complete ones and the `recent` latest finished.

    A handful of trials, never all of them: the page asks for the best few and the one a user clicks.
    """
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        trials = _chosen_trials_in_tx(session, study, numbers=numbers, top=top, recent=recent)
        epochs = _epochs_in_tx(session, trials)
        data = [CurvePublic(number=t.number, state=t.state, value=_finite(t.value), attempt=t.attempt,
                            epoch=[e.epoch for e in epochs.get(t.id, [])],
                            val_metric=[_finite(e.val_metric) for e in epochs.get(t.id, [])],
                            val_loss=[_finite(e.val_loss) for e in epochs.get(t.id, [])],
                            train_loss=[_finite(e.train_loss) for e in epochs.get(t.id, [])])
                for t in trials]
        return CurvesPublic(objective=study.config.primary.metric, data=data)


def _chosen_trials_in_tx(session: Session, study: Study, *, numbers: list[int], top: int,
                         recent: int) -> list[Trial]:
    chosen: dict[int, Trial] = {}
    base = select(Trial).where(Trial.study_id == study.id, Trial.number.is_not(None))
    if numbers:
        for t in session.scalars(base.where(Trial.number.in_(numbers[:MAX_CURVES]))):
            chosen[t.id] = t
    if top:
        best_first = base.where(Trial.state == TrialState.COMPLETE.value, Trial.value.is_not(None)).order_by(
            *study.best_first())
        for t in session.scalars(best_first.limit(min(top, MAX_CURVES))):
            chosen[t.id] = t
    if recent:
        for t in session.scalars(base.where(Trial.finished_at.is_not(None))
                                 .order_by(Trial.finished_at.desc()).limit(min(recent, MAX_CURVES))):
            chosen[t.id] = t
    return sorted(chosen.values(), key=lambda t: t.number or 0)


def _epochs_in_tx(session: Session, trials: list[Trial]) -> dict[int, list[TrialEpoch]]:
    """The latest attempt's epochs of each trial, by primary key."""
    out: dict[int, list[TrialEpoch]] = {}
    if not trials:
        return out
    attempts = {t.id: t.attempt for t in trials}
    rows = session.scalars(select(TrialEpoch).where(TrialEpoch.trial_id.in_(list(attempts)))
                           .order_by(TrialEpoch.trial_id, TrialEpoch.attempt, TrialEpoch.epoch))
    for e in rows:
        if e.attempt == attempts[e.trial_id]:
            out.setdefault(e.trial_id, []).append(e)
    return out
