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
from app.models import Study, StudyStatus, Trial, TrialEpoch, TrialState
from app.schemas.study import StudySpec
from app.services.errors import Conflict, InvalidInput
from app.services.ownership import own_study
from app.services.validation import validate_spec

ENQUEUE_STATES = {StudyStatus.QUEUED, StudyStatus.RUNNING, StudyStatus.PAUSED}
# A history warm start adds at most this many earlier trials in all, shared evenly between the source studies
# (each gives its best complete trials first, then its pruned ones): Optuna writes each one row by row.
HISTORY_MAX_TRIALS = 1000


@dataclass(frozen=True)
class Enqueued:
    params: dict[str, Any]
    duplicate: bool
    waiting: int


def enqueue_trial(db: Database, settings: Settings, *, owner: str, study_id: str, params: dict[str, Any],
                  allow_duplicate: bool = False) -> Enqueued:
    """Queue a configuration ahead of sampled ones; the rest of the space is sampled when it runs."""
    with db.read_session() as session:
        spec = own_study(session, owner=owner, study_id=study_id).config
    resolved = validate_spec(db, settings, owner=owner, spec=spec)
    try:
        checked = fit_config(params, resolved, grid=spec.sampler.name == "grid")
    except SpaceError as exc:
        raise InvalidInput(("body", "params", *exc.loc), exc.message) from exc
    with db.session() as session:
        study = own_study(session, owner=owner, study_id=study_id, for_update=True)
        if StudyStatus(study.status) not in ENQUEUE_STATES:
            raise Conflict(f"cannot enqueue into a {study.status} study")
        waiting = _waiting_in_tx(session, study.id)
        # A waiting (or just claimed) row still holds the configuration as enqueued; a trial that has begun
        # holds every parameter it ran with. Either way "the same" means equal, not merely compatible.
        if not allow_duplicate and checked in session.scalars(select(Trial.params).where(
                Trial.study_id == study.id, Trial.params.is_not(None))).all():
            return Enqueued(checked, True, waiting)
        used = session.scalar(select(func.count()).select_from(Trial).where(Trial.study_id == study.id)) or 0
        if used >= study.n_trials:
            raise Conflict(f"all {study.n_trials} trials of the budget are taken; raise n_trials to add more")
        session.add(Trial(study_id=study.id, state=TrialState.WAITING.value, source="enqueued", params=checked))
        return Enqueued(checked, False, waiting + 1)


def fit_config(params: dict[str, Any], resolved: dict[str, Any], *, grid: bool) -> dict[str, Any]:
    """The configuration as it is enqueued: the given values plus the study's fixed ones.

    A grid study runs complete configurations only (Optuna's grid sampler cannot fill in the rest);
    SpaceError names the first parameter that is missing or does not fit.
    """
    try:
        checked = check_params(params, resolved, partial=not grid)
    except SpaceError as exc:
        if grid and exc.message == "missing":
            raise SpaceError(exc.loc, "missing: a grid study runs complete configurations only; "
                                      "give every parameter the grid searches") from exc
        raise
    return {k: v for k, v in checked.items() if k in params or k not in sampled_distributions(resolved, checked)}


def _waiting_in_tx(session: Session, study_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Trial).where(
        Trial.study_id == study_id, Trial.state == TrialState.WAITING.value)) or 0


# ---- warm start -------------------------------------------------------------------------------------------


@dataclass
class WarmStartPlan:
    configs: list[dict[str, Any]] = field(default_factory=list)  # run again in the new study
    history: list[optuna.trial.FrozenTrial] = field(default_factory=list)  # learned from, not re-run


def plan_warm_start(db: Database, *, owner: str, spec: StudySpec, resolved: dict[str, Any]) -> WarmStartPlan:
    """The earlier studies' best configurations fitted to the new space, or with history their finished
    trials; 404 for ids the owner lacks, 422 naming the parameters whose values do not fit the new space or,
    for history, the study whose objectives differ."""
    warm = spec.warm_start
    assert warm is not None
    plan = WarmStartPlan()
    misfits: dict[str, str] = {}
    grid = spec.sampler.name == "grid"
    objectives = [(o.metric, o.direction) for o in spec.objectives]
    with db.read_session() as session:
        for index, source_id in enumerate(warm.studies):
            source = own_study(session, owner=owner, study_id=source_id)
            if warm.history:
                _check_same_objectives(source, objectives, index)
                rows = _finished_in_tx(session, source, HISTORY_MAX_TRIALS // len(warm.studies))
            else:
                rows = session.scalars(select(Trial).where(
                    Trial.study_id == source.id, Trial.state == TrialState.COMPLETE.value, Trial.value.is_not(None))
                    .order_by(*source.best_first()).limit(warm.top_k)).all()
            for trial in rows:
                kept = {k: v for k, v in (trial.params or {}).items() if k in resolved}
                try:
                    fitted = fit_config(kept, resolved, grid=grid and not warm.history)
                except SpaceError as exc:
                    misfits[str(exc.loc[0]) if exc.loc else "?"] = exc.message
                    continue
                if warm.history:
                    plan.history.append(_history_trial(session, source, trial, fitted, resolved))
                else:
                    plan.configs.append(fitted)
    if misfits:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(misfits.items()))
        raise InvalidInput(("body", "warm_start", "studies"), f"parameters that do not fit the new space: {detail}")
    unique: list[dict[str, Any]] = []
    for config in plan.configs:
        if config not in unique:
            unique.append(config)
    plan.configs = unique
    return plan


def _check_same_objectives(source: Study, objectives: list[tuple[str, str | None]], index: int) -> None:
    """History values mean something to the new sampler only when they measure the same objectives."""
    theirs = [(o.metric, o.direction) for o in source.config.objectives]
    if theirs != objectives:
        text = ", ".join(f"{m} ({d})" for m, d in theirs)
        raise InvalidInput(("body", "warm_start", "studies", index),
                           f"study {source.id} optimizes {text}, not this study's "
                           f"{', '.join(f'{m} ({d})' for m, d in objectives)}: its trials cannot be history here "
                           "(without history its configurations can still be reused)")


def _finished_in_tx(session: Session, source: Study, limit: int) -> list[Trial]:
    """Up to limit of a study's finished trials a sampler learns from: complete ones best first, then
    pruned ones, those trained longest first."""
    complete = list(session.scalars(select(Trial).where(
        Trial.study_id == source.id, Trial.state == TrialState.COMPLETE.value, Trial.value.is_not(None))
        .order_by(*source.best_first()).limit(limit)))
    pruned = session.scalars(select(Trial).where(
        Trial.study_id == source.id, Trial.state == TrialState.PRUNED.value, Trial.number.is_not(None))
        .order_by(Trial.epochs_run.desc(), Trial.number).limit(limit - len(complete)))
    return complete + list(pruned)


def _history_trial(session: Session, source: Study, trial: Trial, fitted: dict[str, Any],
                   resolved: dict[str, Any]) -> optuna.trial.FrozenTrial:
    """The Optuna trial a source row stands for; pruned ones carry their curve as a pruner sees it."""
    dists = sampled_distributions(resolved, fitted)
    params = {k: fitted[k] for k in dists}
    attrs = {"warm_start_from": f"{source.id}:{trial.number}"}
    if trial.state == TrialState.COMPLETE.value:
        return optuna.trial.create_trial(params=params, distributions=dists, values=trial.values or [trial.value],
                                         user_attrs=attrs)
    curve = dict(session.execute(select(TrialEpoch.epoch, TrialEpoch.val_metric).where(
        TrialEpoch.trial_id == trial.id, TrialEpoch.attempt == trial.attempt,
        TrialEpoch.val_metric.is_not(None))).all())
    # As study.tell(state=PRUNED) does: the last intermediate value stands as the trial's value.
    last = curve[max(curve)] if curve else None
    return optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params=params, distributions=dists,
                                     value=last, intermediate_values=curve, user_attrs=attrs)


def add_history(db: Database, plan: WarmStartPlan, *, optuna_name: str) -> None:
    """Add the earlier trials a history warm start learns from to the new Optuna study, before its row
    exists: a worker's first proposal already sees them."""
    if plan.history:
        ostudy = optuna.load_study(study_name=optuna_name, storage=optuna_storage(db.url))
        ostudy.add_trials(plan.history)


def add_warm_configurations_in_tx(session: Session, plan: WarmStartPlan, *, study: Study) -> None:
    """Queue the planned configurations in the transaction that creates the study, so no worker can claim
    a trial of it before they are there (n_trials would be exceeded, or a configuration dropped)."""
    for config in plan.configs[: study.n_trials]:
        session.add(Trial(study_id=study.id, state=TrialState.WAITING.value, source="warm_start", params=config))
