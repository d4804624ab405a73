"""The Pareto front of a multi-objective study."""

from __future__ import annotations

from app.schemas.common import Public
from app.schemas.trial import TrialPublic


class ObjectivePublic(Public):
    metric: str
    direction: str


class ParetoFront(Public):
    """Complete trials no other complete trial dominates, best first by the first objective."""

    objectives: list[ObjectivePublic]
    data: list[TrialPublic]
    count: int
    n_complete: int  # complete trials the front was computed over
