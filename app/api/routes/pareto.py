from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentOwner, DbDep
from app.schemas.pareto import ParetoFront
from app.services import pareto

router = APIRouter(prefix="/studies/{study_id}", tags=["studies"])


@router.get("/pareto", response_model=ParetoFront)
def pareto_front(study_id: str, owner: CurrentOwner, db: DbDep) -> ParetoFront:
    """The Pareto front of a multi-objective study; 409 for a single-objective study (see its best trial)."""
    return pareto.pareto_front(db, owner=owner, study_id=study_id)
