"""Configurations a client already trusts: enqueued by hand, or the best of earlier studies (warm start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml.space import SpaceError, check_params, sampled_distributions
from app.models import Study, StudyStatus, Trial, TrialState
from app.schemas.study import StudySpec
from app.services.errors import Conflict, InvalidInput
from app.services.studies import best_trial_order, own_study, validate_spec

ENQUEUE_STATES = {StudyStatus.QUEUED, StudyStatus.RUNNING, StudyStatus.PAUSED}


@dataclass(frozen=True)
class Enqueued:
    params: dict[str, Any]
    duplicate: bool
    waiting: int


def enqueue_trial(db: Database, settings: Settings, *, owner: str, study_id: str, params: dict[str, Any],
                  allow_duplicate: bool = False) -> Enqueued:
    """Queue a configuration ahead of sampled ones; the rest of the space is sampled when it runs."""
    with db.read_session() as session:
        spec = StudySpec.model_validate(own_study(session, owner=owner, study_id=study_id).spec)
    resolved = validate_spec(db, settings, owner=owner, spec=spec)
    try:
        checked = check_params(params, resolved, partial=True)
    except SpaceError as exc:
        raise InvalidInput(("body", "params", *exc.loc), exc.message) from exc
    checked = {k: v for k, v in checked.items() if k in params or k not in sampled_distributions(resolved, checked)}
    with db.session() as session:
        study = own_study(session, owner=owner, study_id=study_id, for_update=True)
        if StudyStatus(study.status) not in ENQUEUE_STATES:
            raise Conflict(f"cannot enqueue into a {study.status} study")
        rows = session.scalars(select(Trial.params).where(Trial.study_id == study.id)).all()
        waiting = _waiting_in_tx(session, study.id)
        if not allow_duplicate and any(_same(checked, p) for p in rows if p):
            return Enqueued(checked, True, waiting)
        used = session.scalar(select(func.count()).select_from(Trial).where(Trial.study_id == study.id)) or 0
        if used >= study.n_trials:
            raise Conflict(f"all {study.n_trials} trials of the budget are taken; raise n_trials to add more")
        session.add(Trial(study_id=study.id, state=TrialState.WAITING.value, source="enqueued", params=checked))
        return Enqueued(checked, False, waiting + 1)


def _waiting_in_tx(session: Session, study_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Trial).where(
        Trial.study_id == study_id, Trial.state == TrialState.WAITING.value)) or 0


def _same(wanted: dict[str, Any], existing: dict[str, Any]) -> bool:
    """An existing trial already covers the wanted configuration (every given value equal)."""
    return all(k in existing and existing[k] == v for k, v in wanted.items())


# ---- warm start -------------------------------------------------------------------------------------------


@dataclass
class WarmStartPlan:
    configs: list[dict[str, Any]] = field(default_factory=list)  # run again in the new study
    history: list[optuna.trial.FrozenTrial] = field(default_factory=list)  # learned from, not re-run


def plan_warm_start(db: Database, *, owner: str, spec: StudySpec, resolved: dict[str, Any]) -> WarmStartPlan:
    """The earlier studies' best configurations fitted to the new space; 404 for ids the owner lacks,
    422 naming the parameters whose values do not fit the new space."""
    assert spec.warm_start is not None
    plan = WarmStartPlan()
    misfits: dict[str, str] = {}
    directions = [o.direction for o in spec.objectives]
    with db.read_session() as session:
        for source_id in spec.warm_start.studies:
            source = own_study(session, owner=owner, study_id=source_id)
            best = session.scalars(select(Trial).where(
                Trial.study_id == source.id, Trial.state == TrialState.COMPLETE.value, Trial.value.is_not(None))
                .order_by(best_trial_order(source), Trial.number).limit(spec.warm_start.top_k)).all()
            for trial in best:
                kept = {k: v for k, v in (trial.params or {}).items() if k in resolved}
                try:
                    fitted = check_params(kept, resolved, partial=True)
                except SpaceError as exc:
                    misfits[str(exc.loc[0]) if exc.loc else "?"] = exc.message
                    continue
                if not spec.warm_start.history:
                    plan.configs.append(fitted)
                elif len(trial.values or [trial.value]) == len(directions):
                    dists = sampled_distributions(resolved, fitted)
                    plan.history.append(optuna.trial.create_trial(
                        params={k: fitted[k] for k in dists}, distributions=dists,
                        values=trial.values or [trial.value],
                        user_attrs={"warm_start_from": f"{source.id}:{trial.number}"}))
    if misfits:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(misfits.items()))
        raise InvalidInput(("body", "warm_start", "studies"), f"parameters that do not fit the new space: {detail}")
    unique: list[dict[str, Any]] = []
    for config in plan.configs:
        if config not in unique:
            unique.append(config)
    plan.configs = unique
    return plan


def apply_warm_start(db: Database, plan: WarmStartPlan, *, study: Study) -> None:
    """Enqueue the planned configurations first, or add the earlier trials to the Optuna study's history."""
    if plan.history:
        ostudy = optuna.load_study(study_name=study.optuna_name, storage=optuna_storage(db.url))
        ostudy.add_trials(plan.history)
    with db.session() as session:
        for config in plan.configs[: study.n_trials]:
            session.add(Trial(study_id=study.id, state=TrialState.WAITING.value, source="warm_start", params=config))
