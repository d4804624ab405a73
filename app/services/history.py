"""The study page's first read at any size: downsampled trial points, the exact best-so-far line, and the
best trials with their parameters.

At 100,000 trials the page cannot load and plot every trial (the column history alone is ten pages and
several megabytes); this read is one query over three narrow columns plus one indexed query for the best
trials, and its answer is bounded by `max_points` and `top` whatever the study's size.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from sqlalchemy import Text, cast, func, select, text
from sqlalchemy.orm import Session

from app.core.db import Database
from app.ml.space import BY_NAME
from app.models import Study, Trial, TrialState
from app.schemas.overview import HistoryOverviewPublic, ParamKind, TopTrials
from app.schemas.study import Choices, FloatRange, IntRange, StudySpec
from app.services.importance import parse_params
from app.services.ownership import own_study

MAX_POINTS = 4000
MAX_TOP = 2000
CACHED_STUDIES = 16
BANDS = 16  # bands of value in the downsampling grid
_OPEN = (TrialState.RUNNING.value, TrialState.WAITING.value, TrialState.PAUSED.value)
_PLOTTED = (TrialState.COMPLETE.value, TrialState.PRUNED.value)
# A text query: the scan reads 100,000 rows, and Core's per-column result processing would cost more than it.
_SCAN = text(f"SELECT number, state, value FROM {Trial.__tablename__} WHERE study_id = :study_id "
             f"AND number IS NOT NULL AND value IS NOT NULL AND state IN {_PLOTTED!r} ORDER BY number")

# The finished trials' part of an overview, by (study, points, top) and kept while no trial finishes: it is
# the same until one does, and it is the costly part (a scan of every trial).
_cache: OrderedDict[tuple[str, int, int], tuple[tuple[Any, ...], dict[str, Any]]] = OrderedDict()
_cache_lock = threading.Lock()


def overview(db: Database, *, owner: str, study_id: str, max_points: int = MAX_POINTS,
             top: int = MAX_TOP) -> HistoryOverviewPublic:
    """Points of the finished trials (downsampled past `max_points`), the best-so-far steps and the `top` best."""
    t = Trial.__table__.c
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        spec, direction = study.config, str(study.config.primary.direction)
        trials, last_number = session.execute(select(func.count(t.number), func.max(t.number))
                                              .where(t.study_id == study_id)).one()
        # The open trials are few: read them by the state index (min() in SQL would scan by number).
        open_numbers = session.scalars(select(t.number).where(t.study_id == study_id, t.state.in_(_OPEN))).all()
        first_open = min((n for n in open_numbers if n is not None), default=None)
        version = tuple(session.execute(select(func.count(), func.max(t.finished_at)).where(
            t.study_id == study_id, t.finished_at.is_not(None))).one())
        key = (study_id, max_points, top)
        with _cache_lock:
            hit = _cache.get(key)
            if hit is not None and hit[0] == version:
                _cache.move_to_end(key)
        finished = hit[1] if hit is not None and hit[0] == version else None
        if finished is None:
            finished = _finished_in_tx(session, study, max_points=max_points, top=top)
            with _cache_lock:
                _cache[key] = (version, finished)
                while len(_cache) > CACHED_STUDIES:
                    _cache.popitem(last=False)
    names = finished["param_names"]
    return HistoryOverviewPublic.model_construct(  # built from typed columns; bounded, but no need to revalidate
        objective=spec.primary.metric, direction=direction, param_kinds={n: _kind(spec, n) for n in names},
        log_scale=[n for n in names if _log(spec, n)], searched=_searched(spec), trials=trials,
        last_number=last_number, first_open=first_open, **finished)


def _finished_in_tx(session: Session, study: Study, *, max_points: int, top: int) -> dict[str, Any]:
    """The points, best-so-far steps and best trials: everything that changes only when a trial finishes."""
    t = Trial.__table__.c
    rows = session.execute(_SCAN, {"study_id": study.id}).all()
    top_rows = session.execute(select(t.number, t.value, cast(t.params, Text)).where(
        t.study_id == study.id, t.state == TrialState.COMPLETE.value, t.value.is_not(None),
        t.number.is_not(None)).order_by(*study.best_first()).limit(top)).all() if top else []
    points = {state: _points(rows, state) for state in _PLOTTED}
    sampled = sum(len(p[0]) for p in points.values()) > max_points
    budget = max(1, max_points // len(_PLOTTED))
    drawn = {state: _downsample(*p, budget=budget) if sampled else _pairs(*p) for state, p in points.items()}
    top_params = parse_params([r[2] for r in top_rows])
    names = sorted({n for p in top_params for n in p}, key=_documented_order)
    return {
        "param_names": names, "with_value": {state: len(p[0]) for state, p in points.items()},
        "sampled": sampled, "complete": drawn[TrialState.COMPLETE.value], "pruned": drawn[TrialState.PRUNED.value],
        "best": best_steps(*points[TrialState.COMPLETE.value], maximize=study.config.maximize),
        "top": TopTrials.model_construct(number=[r[0] for r in top_rows], value=[r[1] for r in top_rows],
                                         params={n: [p.get(n) for p in top_params] for n in names}),
    }


def _points(rows: list[Any], state: str) -> tuple[np.ndarray, np.ndarray]:
    """Numbers and finite values of one state's trials, by number."""
    pairs = [(r[0], r[2]) for r in rows if r[1] == state and math.isfinite(r[2])]  # rows come by number
    numbers = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
    values = np.fromiter((p[1] for p in pairs), dtype=np.float64, count=len(pairs))
    return numbers, values


def _pairs(numbers: np.ndarray, values: np.ndarray) -> list[tuple[int, float]]:
    return list(zip(numbers.tolist(), values.tolist(), strict=True))


def _downsample(numbers: np.ndarray, values: np.ndarray, *, budget: int) -> list[tuple[int, float]]:
    """At most `budget` of the points, keeping the cloud's shape and its edges.

    The plot is cut into a grid (stretches of trial numbers x bands of value): each occupied cell keeps its
    first trial, so every region that holds a trial still shows one, dense or sparse; and each stretch keeps
    its lowest and highest trial, so the extremes are drawn exactly.
    """
    if len(numbers) <= budget:
        return _pairs(numbers, values)
    stretches = max(1, budget // (BANDS + 2))
    stretch = numbers * stretches // (int(numbers[-1]) + 1)
    low, high = float(values.min()), float(values.max())
    band = np.minimum(((values - low) / ((high - low) or 1.0) * BANDS).astype(np.int64), BANDS - 1)
    _, first_in_cell = np.unique(stretch * BANDS + band, return_index=True)  # first = lowest number
    order = np.lexsort((values, stretch))  # by stretch, then value
    starts = np.flatnonzero(np.r_[True, stretch[order][1:] != stretch[order][:-1]])
    ends = np.r_[starts[1:], len(order)] - 1
    keep = np.unique(np.r_[first_in_cell, order[starts], order[ends]])  # positions in number order
    return _pairs(numbers[keep], values[keep])


def best_steps(numbers: np.ndarray, values: np.ndarray, *, maximize: bool) -> list[tuple[int, float]]:
    """Every trial that beats all trials numbered before it: the best-so-far line, exactly.

    A tie keeps the earlier trial (the study's rule for its best trial)."""
    if not len(values):
        return []
    running = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
    previous = np.r_[-np.inf if maximize else np.inf, running[:-1]]
    improved = values > previous if maximize else values < previous
    return _pairs(numbers[improved], values[improved])


def _searched(spec: StudySpec) -> list[str]:
    """Names the spec gives a range or choices (a fixed value is not searched)."""
    return [name for name, entry in spec.search_space.items() if isinstance(entry, FloatRange | IntRange | Choices)]


def _kind(spec: StudySpec, name: str) -> ParamKind:
    entry = spec.search_space.get(name)
    if isinstance(entry, FloatRange | IntRange | Choices):
        return entry.type
    hp = BY_NAME.get(name)
    return hp.kind if hp is not None else "float"  # type: ignore[return-value]


def _log(spec: StudySpec, name: str) -> bool:
    entry = spec.search_space.get(name)
    if isinstance(entry, FloatRange | IntRange | Choices):
        return bool(getattr(entry, "log", False))
    hp = BY_NAME.get(name)
    return hp is not None and bool(hp.default_for(spec.model).get("log"))


def _documented_order(name: str) -> tuple[int, str]:
    order = list(BY_NAME)
    return (order.index(name) if name in order else len(order), name)
