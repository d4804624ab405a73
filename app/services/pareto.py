"""The Pareto front of a multi-objective study, computed from our trial rows (never Optuna's full load)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from app.core.db import Database
from app.models import Trial, TrialState
from app.schemas.pareto import ObjectivePublic, ParetoFront
from app.schemas.trial import TrialPublic
from app.services.errors import Conflict
from app.services.ownership import own_study


def pareto_front(db: Database, *, owner: str, study_id: str) -> ParetoFront:
    """Non-dominated complete trials; Conflict (409) for a single-objective study, which has a best trial."""
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        objectives = study.config.objectives
        if len(objectives) < 2:
            raise Conflict("this study has a single objective: it has a best trial (GET /studies/{id}), "
                           "not a Pareto front")
        complete = session.execute(select(Trial.id, Trial.values).where(
            Trial.study_id == study.id, Trial.state == TrialState.COMPLETE.value, Trial.values.is_not(None)))
        rows = [(tid, values) for tid, values in complete if _usable(values, len(objectives))]
        signs = np.array([-1.0 if o.direction == "maximize" else 1.0 for o in objectives])
        losses = np.array([v for _, v in rows], dtype=np.float64).reshape(len(rows), len(objectives))
        front_ids = [rows[i][0] for i in nondominated(losses * signs)]
        trials = session.scalars(select(Trial).where(Trial.id.in_(front_ids))).all() if front_ids else []
        ordered = sorted(trials, key=lambda t: (float(signs[0]) * t.values[0], t.number))
        return ParetoFront(objectives=[ObjectivePublic(**o.model_dump()) for o in objectives],
                           data=[TrialPublic.model_validate(t) for t in ordered], count=len(ordered),
                           n_complete=len(rows))


def nondominated(losses: np.ndarray) -> list[int]:
    """Indices of the rows of losses (to minimize, one column per objective) that no other row dominates.

    Rows are visited in lexicographic order: the first remaining row cannot be dominated by any later one,
    so it joins the front and drops every row it dominates. Equal rows do not dominate each other.
    """
    if len(losses) == 0:
        return []
    remaining = np.lexsort(losses.T[::-1])
    front: list[int] = []
    while remaining.size:
        head, rest = remaining[0], remaining[1:]
        front.append(int(head))
        dominated = np.all(losses[head] <= losses[rest], axis=1) & np.any(losses[head] < losses[rest], axis=1)
        remaining = rest[~dominated]
    return sorted(front)


def _usable(values: Any, n: int) -> bool:
    return isinstance(values, list) and len(values) == n and all(
        isinstance(v, int | float) and np.isfinite(v) for v in values)
