from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from app.api.deps import CurrentOwner, DbDep, SettingsDep, TrialNumber
from app.schemas.trial import EnqueuedPublic, TrialDetail, TrialEnqueue, TrialExtend, TrialsPublic
from app.services import enqueue, trial_control, trials

router = APIRouter(prefix="/studies/{study_id}/trials", tags=["trials"])
TrialStateFilter = Literal["waiting", "running", "paused", "complete", "pruned", "fail"]


@router.get("", response_model=TrialsPublic)
def list_trials(study_id: str, owner: CurrentOwner, db: DbDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                cursor: Annotated[str | None, Query(max_length=500)] = None,
                state: TrialStateFilter | None = None,
                sort: Literal["number", "value", "duration", "newest"] = "number",
                order: Literal["asc", "desc"] | None = None,
                after: Annotated[int | None, Query(ge=-1, le=10**9)] = None) -> TrialsPublic:
    return trials.list_trials(db, owner=owner, study_id=study_id, limit=limit, cursor=cursor, state=state,
                              sort=sort, order=order, after=after)


@router.get("/{number}", response_model=TrialDetail)
def get_trial(study_id: str, number: TrialNumber, owner: CurrentOwner, db: DbDep) -> TrialDetail:
    return trials.get_trial(db, owner=owner, study_id=study_id, number=number)


@router.post("/{number}/pause", response_model=TrialDetail)
def pause_trial(study_id: str, number: TrialNumber, owner: CurrentOwner, db: DbDep) -> TrialDetail:
    """Pause a waiting trial at once, or a running one at its next epoch boundary, after a checkpoint of it;
    409 for a trial that has ended."""
    return trial_control.control_trial(db, owner=owner, study_id=study_id, number=number, action="pause")


@router.post("/{number}/resume", response_model=TrialDetail)
def resume_trial(study_id: str, number: TrialNumber, owner: CurrentOwner, db: DbDep) -> TrialDetail:
    """Put a paused trial back in line, to continue from its checkpoint (or call off a pause not carried out
    yet); 409 for a trial that is not paused."""
    return trial_control.control_trial(db, owner=owner, study_id=study_id, number=number, action="resume")


@router.post("/{number}/extend", response_model=TrialDetail)
def extend_trial(study_id: str, number: TrialNumber, body: TrialExtend, owner: CurrentOwner,
                 db: DbDep) -> TrialDetail:
    """Train a complete trial `epochs` more, on from its checkpoint: its curve, weights and value follow, a
    completed study runs again and is evaluated on test once more afterwards. 409 for a trial that is not
    complete or keeps no checkpoint, or a study cancelled or failed."""
    return trial_control.extend_trial(db, owner=owner, study_id=study_id, number=number, epochs=body.epochs)


@router.post("", status_code=201, response_model=EnqueuedPublic)
def enqueue_trial(study_id: str, body: TrialEnqueue, owner: CurrentOwner, db: DbDep, settings: SettingsDep,
                  response: Response) -> EnqueuedPublic:
    """Queue a configuration ahead of sampled ones; 200 when the same configuration is already there."""
    result = enqueue.enqueue_trial(db, settings, owner=owner, study_id=study_id, params=body.params,
                                   allow_duplicate=body.allow_duplicate)
    if result.duplicate:
        response.status_code = 200
    return EnqueuedPublic(params=result.params, duplicate=result.duplicate, waiting=result.waiting)
