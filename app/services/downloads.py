"""The models a study keeps: a trial's weights and config, the ensemble's record and its member files."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.ml.artifacts import (
    CONFIG_FILE,
    ENSEMBLE_FILE,
    TREES_FILE,
    TREES_NAME,
    WEIGHTS_FILE,
    has_model,
    trial_files,
    trial_stem,
)
from app.models import Trial, TrialState
from app.schemas.ensemble import EnsemblePublic
from app.services.errors import Conflict, NotFound
from app.services.ownership import own_study


def study_dir(settings: Settings, study_id: str) -> Path:
    assert settings.artifact_dir is not None
    return settings.artifact_dir / study_id


def trial_model_files(db: Database, settings: Settings, *, owner: str, study_id: str,
                      number: int) -> tuple[Path, Path]:
    """(weights, config) of a completed trial; NotFound for other owners' studies and trials without one."""
    with db.read_session() as session:
        own_study(session, owner=owner, study_id=study_id)
        state = session.scalar(select(Trial.state).where(Trial.study_id == study_id, Trial.number == number))
    if state is None:
        raise NotFound("trial not found")
    if not TrialState(state).is_finished():
        raise Conflict(f"trial {number} is {state}: its model is saved when it completes")
    stem = trial_stem(study_dir(settings, study_id), number)
    if state != TrialState.COMPLETE.value or not has_model(stem):
        raise NotFound(f"trial {number} kept no model: only completed trials do (this one ended {state})")
    return trial_files(stem)


def trial_model_zip(weights: Path, config: Path) -> bytes:
    return _zip({WEIGHTS_FILE: weights, CONFIG_FILE: config})


def ensemble_record(db: Database, *, owner: str, study_id: str) -> dict[str, Any]:
    with db.read_session() as session:
        record = own_study(session, owner=owner, study_id=study_id).ensemble
    if record is None:
        raise NotFound("no ensemble: it is chosen when the study completes with at least one completed trial")
    return record


def get_ensemble(db: Database, *, owner: str, study_id: str) -> EnsemblePublic:
    record = ensemble_record(db, owner=owner, study_id=study_id)
    return EnsemblePublic.model_validate({**record, "study_id": study_id, "candidates": record["members"],
                                         "members": [m for m in record["members"] if m["weight"] > 0]})


def ensemble_zip(db: Database, settings: Settings, *, owner: str, study_id: str) -> bytes:
    """ensemble.json, a folder per network member with a positive weight, and trees/trees.npz when chosen."""
    record = ensemble_record(db, owner=owner, study_id=study_id)
    folder = study_dir(settings, study_id)
    files: dict[str, Path | bytes] = {ENSEMBLE_FILE: json.dumps(record, indent=1).encode()}
    for member in record["members"]:
        if member["weight"] <= 0:
            continue
        if member["kind"] == TREES_NAME:
            files[f"{TREES_NAME}/{TREES_FILE}"] = folder / TREES_FILE
        else:
            weights, config = trial_files(trial_stem(folder, member["trial_number"]))
            files[f"{member['name']}/{WEIGHTS_FILE}"] = weights
            files[f"{member['name']}/{CONFIG_FILE}"] = config
    missing = [name for name, src in files.items() if isinstance(src, Path) and not src.is_file()]
    if missing:
        raise NotFound(f"the ensemble's files are gone from the artifact store: {', '.join(missing)}")
    return _zip(files)


def _zip(files: dict[str, Path | bytes]) -> bytes:
    """An uncompressed zip (weights barely compress) of name -> file or content."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, src in files.items():
            archive.writestr(name, src if isinstance(src, bytes) else src.read_bytes())
    return buffer.getvalue()
