"""A large finished study written in bulk: our tables and Optuna's, so both dashboards read the same rows.
Epochs are numbered from 1, as workers record them.

Rows go in through SQLAlchemy Core in batches (a real study of 10,000 trials would take days to run). The
values follow a smooth function of the parameters plus noise, so that importance has something to find.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import optuna
import optuna.distributions as od
from optuna.storages._rdb import models as om
from sqlalchemy import insert, select

from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml import data
from app.ml.space import Context, resolve_space
from app.models import Study, StudyStatus, Trial, TrialEpoch
from app.services import keys

OWNER = "bench"
BATCH = 2000
SPEC: dict[str, Any] = {
    "name": "bulk-mlp", "dataset": "builtin:digits", "task": "classification", "model": "mlp",
    "objective": {"metric": "val_accuracy", "direction": "maximize"}, "search_space": {},
    "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "median"},
    "budget": {"n_trials": 10_000, "epochs": 8, "max_parallel": 4, "max_attempts": 2},
    "validation_split": 0.2, "tensorboard": False,
}


@dataclass(frozen=True)
class BuiltStudy:
    study_id: str
    optuna_name: str
    optuna_study_id: int
    key: str
    n_trials: int


def _sample(rng: np.random.Generator, dist: Any) -> Any:
    if isinstance(dist, od.CategoricalDistribution):
        return dist.choices[int(rng.integers(len(dist.choices)))]
    if isinstance(dist, od.IntDistribution):
        if dist.log:
            return int(round(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))))
        return int(rng.integers(dist.low, dist.high + 1))
    assert isinstance(dist, od.FloatDistribution)
    if dist.log:
        return float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
    return float(rng.uniform(dist.low, dist.high))


def _score(params: dict[str, Any], rng: np.random.Generator) -> float:
    """A made-up accuracy: learning rate matters most, then dropout and batch norm."""
    lr = math.log10(params["learning_rate"])
    acc = 0.97 - 0.04 * (lr + 2.5) ** 2 - 0.08 * params["dropout"]
    acc -= 0.02 if params["batch_norm"] == "none" else 0.0
    return float(min(0.995, max(0.05, acc + rng.normal(0, 0.01))))


def build_study(url: str, *, n_trials: int = 10_000, epochs: int = 8, seed: int = 0,
                open_trials: int = 0) -> BuiltStudy:
    """Write a finished study of n_trials (70% complete, 25% pruned early, 5% failed) into url.

    With `open_trials`, the study is queued instead, its budget that many trials more, for workers to go on
    with; it is opened only once every row is in, so that no worker numbers a trial before then.
    """
    rng = np.random.default_rng(seed)
    db = Database(url)
    storage = optuna_storage(url)
    key = keys.create_key(db, owner=OWNER)
    study_id = uuid.uuid4().hex
    optuna_name = f"hpsearch-{study_id}"
    ostudy = optuna.create_study(storage=storage, study_name=optuna_name, direction="maximize")
    ostudy.set_user_attr("hpsearch_study_id", study_id)
    optuna_study_id = storage.get_study_id_from_name(optuna_name)
    described = data.describe(data.load_builtin(SPEC["dataset"]))
    resolved = resolve_space({}, Context.of(described, SPEC["model"]))  # as the service resolves it
    dists = {k: d for k, d in resolved.items() if isinstance(d, od.BaseDistribution)}
    start = datetime.now(UTC) - timedelta(seconds=n_trials * 3)
    spec = {**SPEC, "budget": {**SPEC["budget"], "n_trials": n_trials, "epochs": epochs}}
    with db.session() as session:
        session.add(Study(id=study_id, owner=OWNER, name=f"bulk-{n_trials}", spec=spec, status="completed",
                          optuna_name=optuna_name, n_trials=n_trials, max_parallel=4, created_at=start,
                          started_at=start, finished_at=start + timedelta(seconds=n_trials * 3),
                          stop_reason="n_trials", test_metrics={"test_accuracy": 0.96, "test_loss": 0.12}))
    trials = [_trial(rng, number, dists, epochs, start) for number in range(n_trials)]
    _write_optuna(storage.engine, optuna_study_id, trials, dists)
    _write_ours(db, study_id, trials)
    if open_trials:
        total = n_trials + open_trials
        with db.session() as session:
            study = session.get(Study, study_id)
            assert study is not None
            study.spec = {**spec, "budget": {**spec["budget"], "n_trials": total}}
            study.n_trials, study.status = total, StudyStatus.QUEUED.value
            study.finished_at = study.stop_reason = study.test_metrics = None
    db.dispose()
    return BuiltStudy(study_id, optuna_name, optuna_study_id, key, n_trials)


def _trial(rng: np.random.Generator, number: int, dists: dict[str, Any], epochs: int,
           start: datetime) -> dict[str, Any]:
    params = {name: _sample(rng, d) for name, d in dists.items()}
    if params["optimizer"] not in ("momentum", "nesterov"):
        params.pop("momentum")
    final = _score(params, rng)
    roll = rng.random()
    state = "complete" if roll < 0.70 else "pruned" if roll < 0.95 else "fail"
    if state == "complete":
        n_epochs = epochs
    else:  # pruned in the first half, or failed before its first epoch
        n_epochs = int(rng.integers(1, max(2, epochs // 2))) if state == "pruned" else 0
    curve = [final * (1 - math.exp(-1.2 * (e + 1))) + rng.normal(0, 0.005) for e in range(n_epochs)]
    began = start + timedelta(seconds=number * 3)
    seconds = 0.3 + rng.random() * 0.2
    return {"number": number, "state": state, "params": params, "curve": curve, "began": began,
            "seconds": seconds, "ended": began + timedelta(seconds=seconds * max(1, n_epochs)),
            "value": final if state == "complete" else (curve[-1] if curve else None)}


def _write_optuna(engine: Any, study_id: int, trials: list[dict[str, Any]], dists: dict[str, Any]) -> None:
    states = {"complete": "COMPLETE", "pruned": "PRUNED", "fail": "FAIL"}
    dist_json = {k: od.distribution_to_json(d) for k, d in dists.items()}
    with engine.begin() as conn:
        for chunk in _chunks(trials):
            conn.execute(insert(om.TrialModel.__table__), [
                {"number": t["number"], "study_id": study_id, "state": states[t["state"]],
                 "datetime_start": t["began"].replace(tzinfo=None),
                 "datetime_complete": t["ended"].replace(tzinfo=None)} for t in chunk])
        ids = dict(conn.execute(select(om.TrialModel.number, om.TrialModel.trial_id)
                                .where(om.TrialModel.study_id == study_id)).all())
        for chunk in _chunks(trials):
            conn.execute(insert(om.TrialParamModel.__table__), [
                {"trial_id": ids[t["number"]], "param_name": k, "param_value": dists[k].to_internal_repr(v),
                 "distribution_json": dist_json[k]} for t in chunk for k, v in t["params"].items()])
            values = [{"trial_id": ids[t["number"]], "objective": 0, "value": t["value"],
                       "value_type": "FINITE"} for t in chunk if t["state"] == "complete"]
            if values:
                conn.execute(insert(om.TrialValueModel.__table__), values)
            conn.execute(insert(om.TrialIntermediateValueModel.__table__), [
                {"trial_id": ids[t["number"]], "step": e, "intermediate_value": v,
                 "intermediate_value_type": "FINITE"} for t in chunk for e, v in enumerate(t["curve"], 1)])
    for t in trials:
        t["optuna_trial_id"] = ids[t["number"]]


def _write_ours(db: Database, study_id: str, trials: list[dict[str, Any]]) -> None:
    with db.session() as session:
        conn = session.connection()
        for chunk in _chunks(trials):
            conn.execute(insert(Trial), [
                {"study_id": study_id, "number": t["number"], "optuna_trial_id": t["optuna_trial_id"],
                 "state": t["state"], "source": "sampler", "params": t["params"], "value": t["value"],
                 "values": [t["value"]] if t["state"] == "complete" else None,
                 "metrics": _metrics(t), "attempt": 1, "worker_id": "bench", "device": "cpu",
                 "created_at": t["began"],
                 "started_at": t["began"], "heartbeat_at": t["ended"], "finished_at": t["ended"],
                 "duration_s": (t["ended"] - t["began"]).total_seconds(), "epochs_run": len(t["curve"]),
                 "best_epoch": int(np.argmax(t["curve"])) + 1 if t["curve"] else None,
                 "error": "trial process died (exit code -9)" if t["state"] == "fail" else None}
                for t in chunk])
        ids = dict(conn.execute(select(Trial.number, Trial.id).where(Trial.study_id == study_id)).all())
        for chunk in _chunks(trials):
            conn.execute(insert(TrialEpoch), [
                {"trial_id": ids[t["number"]], "attempt": 1, "epoch": e, "train_loss": 1.1 - v,
                 "val_loss": 1.05 - v, "val_metric": v, "learning_rate": t["params"]["learning_rate"],
                 "seconds": t["seconds"],
                 "created_at": t["began"] + timedelta(seconds=t["seconds"] * e)}
                for t in chunk for e, v in enumerate(t["curve"], 1)])


def _metrics(t: dict[str, Any]) -> dict[str, float] | None:
    return {"val_accuracy": t["value"], "val_loss": 1 - t["value"]} if t["state"] == "complete" else None


def _chunks(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [items[i:i + BATCH] for i in range(0, len(items), BATCH)]


def describe(built: BuiltStudy) -> str:
    return json.dumps({"study_id": built.study_id, "optuna_study_id": built.optuna_study_id,
                       "n_trials": built.n_trials})
