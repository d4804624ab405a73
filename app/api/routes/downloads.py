"""A study's downloads: trial weights, the ensemble record and files, predictions."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from app.api.deps import CurrentOwner, DbDep, SettingsDep, TrialNumber
from app.schemas.ensemble import EnsemblePublic, PredictionsPublic, PredictRequest
from app.services import downloads, predictions

router = APIRouter(prefix="/studies/{study_id}", tags=["models"])
ZIP = "application/zip"


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


@router.get("/trials/{number}/model", response_class=Response,
            responses={200: {"content": {ZIP: {}}, "description": "model.safetensors + config.json (zip), "
                                                                  "or one of them with ?file="}})
def download_trial_model(study_id: str, number: TrialNumber, owner: CurrentOwner,
                         db: DbDep, settings: SettingsDep,
                         file: Literal["zip", "weights", "config"] = "zip") -> Response:
    weights, config = downloads.trial_model_files(db, settings, owner=owner, study_id=study_id, number=number)
    if file == "weights":
        return FileResponse(weights, media_type="application/octet-stream",
                            headers=_attachment(f"trial-{number}.safetensors"))
    if file == "config":
        return FileResponse(config, media_type="application/json")
    return Response(downloads.trial_model_zip(weights, config), media_type=ZIP,
                    headers=_attachment(f"study-{study_id}-trial-{number}.zip"))


@router.get("/ensemble", response_model=EnsemblePublic)
def get_ensemble(study_id: str, owner: CurrentOwner, db: DbDep) -> EnsemblePublic:
    return downloads.get_ensemble(db, owner=owner, study_id=study_id)


@router.get("/ensemble/model", response_class=Response,
            responses={200: {"content": {ZIP: {}}, "description": "ensemble.json and its members' files"}})
def download_ensemble(study_id: str, owner: CurrentOwner, db: DbDep, settings: SettingsDep) -> Response:
    content = downloads.ensemble_zip(db, settings, owner=owner, study_id=study_id)
    return Response(content, media_type=ZIP, headers=_attachment(f"study-{study_id}-ensemble.zip"))


@router.post("/predict", response_model=PredictionsPublic)
def predict(study_id: str, body: PredictRequest, owner: CurrentOwner, db: DbDep, settings: SettingsDep,
            use: Annotated[Literal["best", "ensemble"], Query()] = "best") -> PredictionsPublic:
    return predictions.predict(db, settings, owner=owner, study_id=study_id, inputs=body.inputs, use=use)
