"""A spec checked against its dataset, its space and its algorithms, as creating or enqueueing needs."""

from __future__ import annotations

import math
from typing import Any

from app import plugins
from app.core.config import Settings
from app.core.db import Database
from app.ml.space import MODELS, SpaceError, grid_space
from app.schemas.study import StudySpec
from app.services import datasets
from app.services.errors import InvalidInput, NotFound


def validate_spec(db: Database, settings: Settings, *, owner: str, spec: StudySpec) -> dict[str, Any]:
    """The resolved search space of a spec, or InvalidInput naming every field that breaks a rule."""
    problems: list[InvalidInput] = []
    try:
        info: dict[str, Any] | None = datasets.describe_dataset(db, settings, owner=owner, ref=spec.dataset)
    except NotFound as exc:
        info = None
        problems.append(InvalidInput(("body", "dataset"), exc.message))
    if info is not None and info["task"] != spec.task:
        problems.append(InvalidInput(("body", "task"), f"dataset {spec.dataset} is a {info['task']} dataset"))
    try:
        check_model(spec.model)
        problems += _scheduler_errors(spec)
    except InvalidInput as exc:
        problems.append(exc)
        info = None  # the space of an unknown model cannot be checked
    if info is not None and spec.model == "cnn" and info.get("image_shape") is None:
        problems.append(InvalidInput(("body", "model"), "cnn needs an image dataset"))
    problems += [InvalidInput(("body", *e.loc), e.message) for e in spec.algorithm_errors()]
    table = plugins.table_for(spec.model) if info is not None else None
    if info is not None:
        problems += [InvalidInput(("body", "search_space", *e.loc), e.message) for e in spec.space_errors(info, table)]
    if problems:
        raise InvalidInput.every(problems)
    assert info is not None
    try:
        resolved = spec.resolved_space(info, table)
        grid = grid_space(resolved) if spec.sampler.name == "grid" else None
    except SpaceError as exc:
        raise InvalidInput(("body", "search_space", *exc.loc), exc.message) from exc
    points = math.prod(len(values) for values in grid.values()) if grid is not None else None
    if points is not None and points < spec.budget.n_trials:  # Optuna would re-run grid points
        raise InvalidInput(("body", "budget", "n_trials"),
                           f"the grid has {points} point(s): set n_trials to at most {points}")
    return resolved


def check_model(model: str) -> None:
    """A built-in model or an enabled model plugin that imports and declares its space; else a 422 on model."""
    if model in MODELS:
        return
    try:
        plugins.current().model(model)
    except plugins.PluginError as exc:
        raise InvalidInput(("body", "model"), str(exc)) from exc


def _scheduler_errors(spec: StudySpec) -> list[InvalidInput]:
    """ASHA pauses a trial at each rung and resumes it from its checkpoint: a model plugin's own training loop
    must take `resume` for that (PBT's own rules refuse plugins altogether)."""
    if spec.scheduler is None or spec.scheduler.name != "asha" or spec.model in MODELS:
        return []
    plugin = plugins.current().model(spec.model)
    if plugin.train is None or plugin.resumable:
        return []
    return [InvalidInput(("body", "scheduler", "name"), f"asha pauses trials at rungs and resumes them from their "
                         f"checkpoints, and model plugin {spec.model!r} trains with its own loop, which writes none "
                         "(its train takes no resume): use the hyperband pruner instead")]
