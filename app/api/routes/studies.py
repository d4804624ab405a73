from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response

from app.api.deps import CurrentOwner, DbDep, SettingsDep
from app.schemas.study import StudiesPublic, StudyPublic, StudySpec
from app.services import studies

router = APIRouter(prefix="/studies", tags=["studies"])
StudyStatusFilter = Literal["queued", "running", "paused", "completed", "cancelled", "failed"]


@router.post("", status_code=201, response_model=StudyPublic)
def create_study(spec: StudySpec, owner: CurrentOwner, db: DbDep, settings: SettingsDep, response: Response,
                 idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> StudyPublic:
    study, created = studies.create_study(db, settings, owner=owner, spec=spec, idempotency_key=idempotency_key)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/api/v1/studies/{study.id}"
    return study


@router.get("", response_model=StudiesPublic)
def list_studies(owner: CurrentOwner, db: DbDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                 cursor: Annotated[str | None, Query(max_length=500)] = None,
                 status: StudyStatusFilter | None = None) -> StudiesPublic:
    return studies.list_studies(db, owner=owner, limit=limit, cursor=cursor, status=status)



@router.get("/{study_id}", response_model=StudyPublic)
def get_study(study_id: str, owner: CurrentOwner, db: DbDep) -> StudyPublic:
    return studies.get_study(db, owner=owner, study_id=study_id)


@router.post("/{study_id}/pause", response_model=StudyPublic)
def pause_study(study_id: str, owner: CurrentOwner, db: DbDep) -> StudyPublic:
    return studies.change_state(db, owner=owner, study_id=study_id, action="pause")


@router.post("/{study_id}/resume", response_model=StudyPublic)
def resume_study(study_id: str, owner: CurrentOwner, db: DbDep) -> StudyPublic:
    return studies.change_state(db, owner=owner, study_id=study_id, action="resume")


@router.post("/{study_id}/cancel", response_model=StudyPublic)
def cancel_study(study_id: str, owner: CurrentOwner, db: DbDep, settings: SettingsDep) -> StudyPublic:
    return studies.change_state(db, owner=owner, study_id=study_id, action="cancel",
                                 artifact_dir=settings.artifact_dir)


@router.delete("/{study_id}", status_code=204)
def delete_study(study_id: str, owner: CurrentOwner, db: DbDep, settings: SettingsDep) -> Response:
    studies.delete_study(db, settings, owner=owner, study_id=study_id)
    return Response(status_code=204)
