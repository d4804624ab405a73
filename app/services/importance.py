"""Parameter importance with Optuna's evaluators, from the study's complete trials read with one SQL query.

Optuna's `study.trials` loads every trial with its attributes and intermediate values (seconds at 10,000
trials); here the complete trials' params and values become FrozenTrials directly, with the distributions
of the study's resolved space. fANOVA (a random forest) up to FANOVA_MAX_TRIALS complete trials, PED-ANOVA
beyond, on every k-th complete trial by number once a study holds more than SAMPLE_TRIALS of them (the
response says so). Results are cached per study until another trial finishes.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections import OrderedDict
from typing import Any

import optuna
import optuna.distributions as od
from optuna.importance import (
    BaseImportanceEvaluator,
    FanovaImportanceEvaluator,
    PedAnovaImportanceEvaluator,
    get_param_importances,
)
from optuna.storages import InMemoryStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState
from sqlalchemy import Text, cast, func, select

from app import plugins
from app.core.config import Settings
from app.core.db import Database
from app.ml.space import SpaceError, in_range
from app.models import Trial, TrialState
from app.schemas.insights import ImportancePublic, ParamImportance
from app.schemas.study import StudySpec
from app.services import datasets
from app.services.errors import NotFound
from app.services.ownership import own_study

FANOVA_MAX_TRIALS = 1000
# Optuna's defaults (64 trees grown to depth 64) take 5 s on 300 trials and 25 s on 1,000 here; 32 trees of
# depth 6 rank the parameters the same way (learning rate, dropout, batch norm on the benchmark study) in
# 0.3 s.
FANOVA_TREES = 32
FANOVA_MAX_DEPTH = 6
CACHE_SIZE = 128
# PED-ANOVA over 70,000 trials takes seconds; a systematic sample (every k-th trial by number) of this many
# ranks the parameters as the whole study does and keeps a cold request under a second.
SAMPLE_TRIALS = 5000
_FINISHED = tuple(s.value for s in TrialState if s.is_finished())
_cache: OrderedDict[tuple[str, str, int], ImportancePublic] = OrderedDict()
_cache_lock = threading.Lock()


def study_space(db: Database, settings: Settings, *, owner: str,
                spec: StudySpec) -> dict[str, Any] | None:
    """The study's resolved space (distributions or fixed values); None when its dataset is gone."""
    try:
        info = datasets.describe_dataset(db, settings, owner=owner, ref=spec.dataset)
        return spec.resolved_space(info, plugins.table_for(spec.model))
    except (NotFound, SpaceError):
        return None


def param_importance(db: Database, settings: Settings, *, owner: str, study_id: str) -> ImportancePublic:
    """Importance of each parameter that varied, most important first; cached until a trial finishes."""
    with db.read_session() as session:
        study = own_study(session, owner=owner, study_id=study_id)
        spec, direction = study.config, str(study.config.primary.direction)
        finished = session.scalar(select(func.count()).select_from(Trial).where(
            Trial.study_id == study_id, Trial.state.in_(_FINISHED))) or 0
    key = (db.url, study_id, finished)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    t = Trial.__table__.c
    complete = (t.study_id == study_id, t.state == TrialState.COMPLETE.value, t.value.is_not(None))
    with db.read_session() as session:
        total = session.scalar(select(func.count()).where(*complete)) or 0
        stmt = select(cast(t.params, Text), t.value).where(*complete)
        step = -(-total // SAMPLE_TRIALS)  # ceiling: at most SAMPLE_TRIALS rows
        if step > 1:
            stmt = stmt.where(t.number % step == 0)
        rows = session.execute(stmt).all()
    space = study_space(db, settings, owner=owner, spec=spec) or {}
    pairs = list(zip(parse_params([r[0] for r in rows]), [r[1] for r in rows], strict=True))
    result = compute_importance(pairs, space, direction=direction, finished=finished)
    if step > 1:
        result = result.model_copy(update={"sampled_from": total})
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def parse_params(texts: list[str | None]) -> list[dict[str, Any]]:
    """Params columns read as text, parsed in one call: at 10,000 rows SQLAlchemy's per-row JSON processing
    and json.loads per row cost more than the query."""
    return [p or {} for p in json.loads("[" + ",".join(p or "null" for p in texts) + "]")]


def compute_importance(rows: list[tuple[dict[str, Any], float]], space: dict[str, Any], *, direction: str,
                       finished: int) -> ImportancePublic:
    """Importances from (params, value) pairs of complete trials over a resolved space."""
    dists = {name: d for name, d in space.items() if isinstance(d, od.BaseDistribution)}
    varying = [name for name, d in dists.items() if _varies(rows, name)]
    chosen = {name: dists[name] for name in varying}
    trials = [_frozen(i, params, value, chosen) for i, (params, value) in enumerate(rows)
              if _fits(params, value, chosen)]
    if len(trials) < 2 or not varying:
        reason = "needs two complete trials" if len(trials) < 2 else "no parameter varied"
        return ImportancePublic(evaluator="none", n_trials=len(trials), finished=finished, importances=[],
                                reason=reason)
    study = _TrialsStudy(trials, direction)
    evaluator: BaseImportanceEvaluator
    if len(trials) <= FANOVA_MAX_TRIALS:
        name = "fanova"
        evaluator = FanovaImportanceEvaluator(n_trees=FANOVA_TREES, max_depth=FANOVA_MAX_DEPTH, seed=0)
    else:
        name, evaluator = "ped_anova", PedAnovaImportanceEvaluator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature and equal-importance notices
        scores = get_param_importances(study, evaluator=evaluator)
    ranked = sorted(((k, float(v)) for k, v in scores.items() if math.isfinite(v)), key=lambda kv: -kv[1])
    return ImportancePublic(evaluator=name, n_trials=len(trials), finished=finished,
                            importances=[ParamImportance(name=k, importance=v) for k, v in ranked])


def _varies(rows: list[tuple[dict[str, Any], float]], name: str) -> bool:
    seen: set[Any] = set()
    for params, _ in rows:
        if name in params:
            seen.add(repr(params[name]))  # repr: True and 1 are different choices
            if len(seen) > 1:
                return True
    return False


def _fits(params: dict[str, Any], value: float, dists: dict[str, od.BaseDistribution]) -> bool:
    """Finite value and params inside today's space (an old warm-start trial may lie outside it)."""
    if not math.isfinite(value):
        return False
    try:
        return all(_inside(d, params[k]) for k, d in dists.items() if k in params)
    except (ValueError, TypeError):
        return False


def _inside(dist: od.BaseDistribution, value: Any) -> bool:
    """Whether `value` is one `dist` can take (ValueError for a choice it does not have)."""
    if isinstance(dist, od.CategoricalDistribution):
        dist.to_internal_repr(value)  # raises ValueError for a value that is not a choice
        return True
    return in_range(dist, dist.to_external_repr(dist.to_internal_repr(value)))


def _frozen(index: int, params: dict[str, Any], value: float,
            dists: dict[str, od.BaseDistribution]) -> FrozenTrial:
    """Built directly (create_trial converts and validates every distribution again, per trial)."""
    chosen = {k: params[k] for k in dists if k in params}
    return FrozenTrial(number=index, trial_id=index, state=OptunaState.COMPLETE, value=value, values=None,
                       datetime_start=None, datetime_complete=None, params=chosen,
                       distributions={k: dists[k] for k in chosen}, user_attrs={}, system_attrs={},
                       intermediate_values={})


class _TrialsStudy(optuna.Study):
    """A Study whose trials are a list in memory, handed to Optuna's evaluators without copies.

    The evaluators read trials only through get_trials; the in-memory storage's add_trials would
    deep-copy each trial, seconds at 10,000 trials.
    """

    def __init__(self, trials: list[FrozenTrial], direction: str) -> None:
        storage = InMemoryStorage()
        storage.create_new_study([StudyDirection[direction.upper()]], study_name="importance")
        super().__init__(study_name="importance", storage=storage)
        self._frozen_trials = trials

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return [t for t in self._frozen_trials if states is None or t.state in states]

    def _get_trials(self, deepcopy: bool = True, states: Any = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        return self.get_trials(deepcopy, states)
