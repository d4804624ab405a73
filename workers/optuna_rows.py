"""A new RUNNING Optuna trial written in one short transaction of four statements.

Optuna's `create_new_trial` with a template trial costs three round trips per parameter (the trial read
back, a lookup of an earlier record of the parameter anywhere in the study, the insert) and a count of the
study's trials, which grows with the study (docs/benchmarks/scale.md). Here the trial row takes
its number in the insert itself (the count of the study's trials, under the study row's lock as Optuna
takes it; SQLite's single writer serializes the statement), and every parameter goes in one multi-row
insert, into Optuna's own tables through its own models, so Optuna reads the trial back as it would its own.
The check that a parameter keeps its distribution is the caller's, against the distributions it has seen.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy import Connection, func, insert, literal, select

from workers import optuna_private

_trials = optuna_private.trials_table
_params = optuna_private.params_table
_studies = optuna_private.studies_table


def create_running(storage: RDBStorage, study_id: int, params: dict[str, Any],
                   distributions: dict[str, BaseDistribution]) -> tuple[int, int]:
    """(Optuna trial id, number) of a new RUNNING trial of study `study_id` holding each parameter of
    `distributions`, its value from `params` (which may hold fixed values too: those are not Optuna's).

    Raises KeyError for a study that does not exist, as Optuna does.
    """
    study = select(_studies.c.study_id).where(_studies.c.study_id == study_id)
    number = select(func.count()).select_from(_trials).where(_trials.c.study_id == study_id).scalar_subquery()
    now = datetime.now(UTC).replace(tzinfo=None)  # Optuna stores naive UTC
    with optuna_private.engine(storage).begin() as conn:
        if conn.dialect.name != "sqlite":  # the lock Optuna's own create_new_trial takes to number trials
            conn.execute(study.with_for_update())
        # From the study's row: no row, no trial (SQLite reads nothing before it writes, or it could find
        # its snapshot stale when it comes to write).
        row = conn.execute(insert(_trials).from_select(
            ["study_id", "number", "state", "datetime_start"],
            select(_studies.c.study_id, number, literal(TrialState.RUNNING, _trials.c.state.type),
                   literal(now, _trials.c.datetime_start.type)).where(_studies.c.study_id == study_id))
            .returning(_trials.c.trial_id, _trials.c.number)).first()
        if row is None:
            raise KeyError(f"No study with study_id {study_id} exists.")
        _insert_params(conn, int(row.trial_id),
                       {name: (dist.to_internal_repr(params[name]), dist) for name, dist in distributions.items()})
    return int(row.trial_id), int(row.number)


def add_params(storage: RDBStorage, trial_id: int, params: dict[str, tuple[float, BaseDistribution]],
               system_attrs: dict[str, Any] | None = None) -> None:
    """Parameters of a trial already written, {name: (internal value, distribution)}, and system attributes,
    in one transaction of a multi-row insert each; the caller checks each distribution against the study's."""
    if params or system_attrs:
        with optuna_private.engine(storage).begin() as conn:
            _insert_params(conn, trial_id, params)
            if system_attrs:
                conn.execute(insert(optuna_private.system_attrs_table), [
                    {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                    for key, value in system_attrs.items()])


def _insert_params(conn: Connection, trial_id: int, params: dict[str, tuple[float, BaseDistribution]]) -> None:
    if params:
        conn.execute(insert(_params), [
            {"trial_id": trial_id, "param_name": name, "param_value": value,
             "distribution_json": distribution_to_json(dist)} for name, (value, dist) in params.items()])
