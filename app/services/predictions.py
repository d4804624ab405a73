"""Predictions from a study's best trial or its ensemble, with models loaded once and cached.

torch is loaded on the first prediction (by app.ml.artifacts), never when the API starts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.core.config import Settings
from app.core.db import Database
from app.ml.artifacts import (
    TREES_FILE,
    TREES_NAME,
    ModelSpec,
    NetPredictor,
    Predictor,
    TreesPredictor,
    WeightedPredictor,
    has_model,
    read_config,
    trial_files,
    trial_stem,
)
from app.ml.trees import Trees
from app.schemas.ensemble import PredictionsPublic
from app.services.downloads import study_dir
from app.services.errors import Conflict, InvalidInput
from app.services.ownership import best_trial_in_tx, own_study

MAX_ROWS = 1024
MODEL_CACHE_SIZE = 16
INPUTS_LOC = ("body", "inputs")
Use = Literal["best", "ensemble"]


def predict(db: Database, settings: Settings, *, owner: str, study_id: str, inputs: list[Any],
            use: Use = "best") -> PredictionsPublic:
    """Class probabilities and labels (or values) for raw input rows; Conflict while there is no model."""
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        best = best_trial_in_tx(session, study)
        best_number = best.number if best is not None else None
        record = study.ensemble
    folder = study_dir(settings, study_id)
    if use == "ensemble":
        if record is None:
            raise Conflict("the study has no ensemble yet: it is chosen when the study completes")
        task, classes, shape = record["task"], record["classes"], tuple(record["input_shape"])
        predictor: Predictor = _ensemble(folder, record)
        number = None
    else:
        if best_number is None or not has_model(trial_stem(folder, best_number)):
            raise Conflict("the study has no finished model yet")
        spec = ModelSpec.from_config(read_config(trial_files(trial_stem(folder, best_number))[1]))
        task, classes, shape = spec.task, spec.classes, spec.input_shape
        predictor, number = _network(trial_stem(folder, best_number)), best_number
    out = predictor.predict(validate_inputs(inputs, shape))
    if task == "classification":
        labels = [classes[i] if classes else str(i) for i in out.argmax(axis=1).tolist()]
        return PredictionsPublic(use=use, trial_number=number, task=task, classes=classes, predictions=labels,
                                 probabilities=out.tolist())
    values = out[:, 0].tolist() if out.shape[1] == 1 else out.tolist()
    return PredictionsPublic(use=use, trial_number=number, task=task, classes=None, predictions=values,
                             probabilities=None)


def validate_inputs(inputs: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    """Rows as float32 (N, *shape): finite numbers, at most MAX_ROWS rows; else InvalidInput with the rule."""
    expected = f"[N, {', '.join(map(str, shape))}]"
    if not inputs:
        raise InvalidInput(INPUTS_LOC, f"give at least one row; inputs must have shape {expected}")
    if len(inputs) > MAX_ROWS:
        raise InvalidInput(INPUTS_LOC, f"at most {MAX_ROWS} rows per request, got {len(inputs)}")
    try:
        x = np.asarray(inputs)
    except ValueError:
        raise InvalidInput(INPUTS_LOC, f"rows of unequal shapes; inputs must have shape {expected}") from None
    if x.dtype.kind not in "iuf":
        raise InvalidInput(INPUTS_LOC, "inputs must be numbers (nested lists of numbers, one list per row)")
    if tuple(x.shape[1:]) != tuple(shape):
        got = f"[{', '.join(map(str, x.shape))}]"
        raise InvalidInput(INPUTS_LOC, f"inputs must have shape {expected} (N rows of shape {list(shape)}), "
                                       f"got {got}")
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused just below
        x32 = x.astype(np.float32)
    finite = np.isfinite(x32)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        where = "".join(f"[{i}]" for i in bad)
        raise InvalidInput(INPUTS_LOC, f"inputs must be finite numbers in float32 range: inputs{where} is "
                                       f"{x[bad]}")
    return x32


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        raise Conflict(f"the model file {path.name} is missing from the artifact store") from None


def _network(stem: Path) -> NetPredictor:
    return _load_network(str(stem), _mtime_ns(trial_files(stem)[0]))


@lru_cache(maxsize=MODEL_CACHE_SIZE)
def _load_network(stem: str, mtime_ns: int) -> NetPredictor:
    """Keyed by path and modification time: a rewritten file is loaded again."""
    path = Path(stem)
    return NetPredictor.load(path, ModelSpec.from_config(read_config(trial_files(path)[1])))


@lru_cache(maxsize=MODEL_CACHE_SIZE)
def _load_trees(path: str, mtime_ns: int) -> TreesPredictor:
    return TreesPredictor(Trees.load(Path(path)))


def _ensemble(folder: Path, record: dict[str, Any]) -> WeightedPredictor:
    members: list[tuple[Predictor, float]] = []
    for member in record["members"]:
        if member["weight"] <= 0:
            continue
        if member["kind"] == TREES_NAME:
            path = folder / TREES_FILE
            members.append((_load_trees(str(path), _mtime_ns(path)), member["weight"]))
        else:
            members.append((_network(trial_stem(folder, member["trial_number"])), member["weight"]))
    return WeightedPredictor(members)


def cache_info() -> dict[str, Any]:
    """Hits and misses of the model caches (for tests and /metrics)."""
    return {"networks": _load_network.cache_info()._asdict(), "trees": _load_trees.cache_info()._asdict()}
