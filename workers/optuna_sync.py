"""Optuna's copy of each trial: told once after our row is recorded, repaired where a crash split them.

Our tables are the record; Optuna's tables follow them. A failed write here is logged, not raised, and the
repair before a study closes makes the two agree again.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState

from app.core.db import Database, retry_on_disconnect
from app.core.optuna_store import optuna_storage
from app.models import TrialState
from workers import asking, queue

log = logging.getLogger("hpsearch.worker")

OPTUNA_STATE = {TrialState.COMPLETE: OptunaState.COMPLETE, TrialState.PRUNED: OptunaState.PRUNED,
                TrialState.FAIL: OptunaState.FAIL}


def tell(study: optuna.Study, trial_id: int, state: TrialState, values: list[float] | None = None) -> None:
    """Finish Optuna trial `trial_id` as our row finished.

    By id: a retried row points at its latest Optuna trial, whose number is not the row's number.
    """
    try:
        retry_on_disconnect(asking.tell, study, trial_id, OPTUNA_STATE[state], values)
    except Exception:  # noqa: BLE001 - our row is the record; Optuna's copy is repaired before finalization
        log.exception("could not tell Optuna about trial id %s", trial_id)


def fail_trial(storage: Any, trial_id: int) -> None:
    """Fail an Optuna trial that will never run or report again (no-op when it already finished)."""
    try:
        retry_on_disconnect(storage.set_trial_state_values, trial_id, OptunaState.FAIL)
    except Exception:  # noqa: BLE001 - already finished there
        pass


def repair(db: Database, study_id: str, study: optuna.Study) -> None:
    """Before a study closes, make Optuna's copy agree with ours where a crash split them.

    A worker killed between Optuna's ask and our bind leaves an Optuna trial we never ran; one killed
    between our finish and its tell leaves a finished trial RUNNING there. Waiting trials are left to
    finalization, which drops them.
    """
    storage = optuna_storage(db.url)
    oid = retry_on_disconnect(storage.get_study_id_from_name, study.study_name)
    stuck = retry_on_disconnect(storage.get_all_trials, oid, deepcopy=False, states=(OptunaState.RUNNING,))
    if not stuck:
        return
    ids = {t.number: retry_on_disconnect(storage.get_trial_id_from_study_id_trial_number, oid, t.number)
           for t in stuck}
    rows = queue.recorded_by_optuna_id(db, study_id, list(ids.values()))
    for frozen in stuck:
        row = rows.get(ids[frozen.number])
        if row is not None and not row.state.is_finished():
            continue
        state = row.state if row is not None else TrialState.FAIL
        tell(study, ids[frozen.number], state, row.values if row is not None and state is TrialState.COMPLETE else None)
        log.warning("Optuna trial %d was left RUNNING by a crash; now %s", frozen.number,
                    state.value if row is not None else "fail (never ran)")
