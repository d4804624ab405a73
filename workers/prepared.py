"""What a supervisor loads once per study it runs: the typed spec, data splits, resolved space and the
Optuna study with its sampler and pruner. Runners get it through fork, without copying."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna

from app import plugins
from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml import data as datasets_lib
from app.ml.artifacts import ModelSpec
from app.schemas.study import StudySpec
from app.services.datasets import load_dataset
from workers import asking, study_reads
from workers.runner import standardization
from workers.search import make_pruner, make_sampler


@dataclass
class PreparedStudy:
    study_id: str
    spec: StudySpec
    optuna_study: optuna.Study
    resolved: dict[str, Any]
    dataset: datasets_lib.Dataset
    splits: datasets_lib.Splits
    mean: list[float]
    std: list[float]
    lock: threading.Lock = field(default_factory=threading.Lock)  # one ask at a time per study

    def model_spec(self, params: dict[str, Any], schedule: list[dict[str, Any]] | None = None) -> ModelSpec:
        ds = self.dataset
        groups = list(ds.feature_groups.values()) if ds.feature_groups else None
        return ModelSpec(model=self.spec.model, params=params, task=ds.task, input_shape=tuple(ds.input_shape),
                         n_outputs=ds.n_outputs, feature_groups=groups, classes=ds.classes, mean=self.mean,
                         std=self.std, schedule=schedule)


class StudyUnrunnable(Exception):
    """The study can never run, on any worker: its dataset cannot be split as the spec asks, say. Retrying
    would fail the same way forever, so the study ends `failed` with this message."""


def prepare(db: Database, settings: Settings, study_id: str) -> PreparedStudy:
    """Load a study; StudyUnrunnable when what fails follows from the dataset and the spec alone (a missing
    file, which another worker may have, raises as it is)."""
    spec, optuna_name = study_reads.study_config(db, study_id)
    ds = load_dataset(db, settings, spec.dataset)
    try:
        splits = datasets_lib.split_dataset(ds, validation_split=spec.validation_split, seed=spec.seed)
        resolved = spec.resolved_space(datasets_lib.describe(ds), plugins.table_for(spec.model))
    except ValueError as exc:  # DatasetError, SpaceError: the same on every worker
        raise StudyUnrunnable(f"the study cannot run on its dataset: {exc}") from exc
    ostudy = asking.open_study(optuna_storage(db.url), optuna_name, make_sampler(spec, resolved), make_pruner(spec))
    mean, std = standardization(splits.x_train, ds.image_shape is not None)
    return PreparedStudy(study_id, spec, ostudy, resolved, ds, splits, mean.tolist(), std.tolist())


class PreparedStudies:
    """Prepared studies of one supervisor: held while a slot uses them, and after that only while the study
    may still give this worker work (queued or running), at most `idle_limit` of those, least recently used
    dropped first. A worker's memory is bounded by the studies it runs, not by every study it has seen."""

    def __init__(self, db: Database, settings: Settings, *, idle_limit: int = 4) -> None:
        self.db, self.settings, self.idle_limit = db, settings, idle_limit
        self._studies: OrderedDict[str, PreparedStudy] = OrderedDict()
        self._users: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def using(self, study_id: str) -> Iterator[PreparedStudy]:
        """The prepared study, held for the duration of one attempt or finalization."""
        with self._lock:
            self._users[study_id] += 1
        try:
            yield self.get(study_id)
        finally:
            with self._lock:
                self._users[study_id] -= 1
                if self._users[study_id] <= 0:
                    del self._users[study_id]
            self._trim()

    def get(self, study_id: str) -> PreparedStudy:
        with self._lock:
            if study_id not in self._studies:
                self._studies[study_id] = prepare(self.db, self.settings, study_id)
            self._studies.move_to_end(study_id)
            return self._studies[study_id]

    def forget(self, study_id: str) -> None:
        with self._lock:
            self._studies.pop(study_id, None)

    def held(self) -> list[str]:
        """Ids of the studies held now, least recently used first."""
        with self._lock:
            return list(self._studies)

    def _trim(self) -> None:
        """Drop idle studies that can give no more work, then the least recently used idle ones over the limit."""
        with self._lock:
            idle = [sid for sid in self._studies if sid not in self._users]
        if not idle:
            return
        live = study_reads.still_running(self.db, idle)
        with self._lock:
            idle = [sid for sid in self._studies if sid not in self._users]
            for sid in [s for s in idle if s not in live]:
                del self._studies[sid]
            kept = [s for s in idle if s in live]
            for sid in kept[: max(0, len(kept) - self.idle_limit)]:
                del self._studies[sid]
