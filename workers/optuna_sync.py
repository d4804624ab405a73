"""Optuna's copy of each trial: told once after our row is recorded, repaired where a crash split them.

Our tables are the record; Optuna's tables follow them. Every change of our rows returns what Optuna must be
told (app.lifecycle.OptunaTell) and `tell` is the one place in the workers that tells it. A failed write
here is logged, not raised, and the repair before a study closes makes the two agree again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState as OptunaState

from app.core.db import Database, retry_on_disconnect
from app.core.optuna_store import optuna_storage
from app.lifecycle import OptunaTell
from app.models import TrialState
from workers import asking, leasing, study_reads

log = logging.getLogger("hpsearch.worker")

OPTUNA_STATE = {TrialState.COMPLETE: OptunaState.COMPLETE, TrialState.PRUNED: OptunaState.PRUNED,
                TrialState.FAIL: OptunaState.FAIL}


def tell(storage: BaseStorage, tells: Iterable[OptunaTell], study: optuna.Study | None = None) -> None:
    """Finish each Optuna trial as our row says; one already finished there is left as it is.

    COMPLETE and PRUNED reach the study's sampler through `study.tell` (`asking.tell`);
    FAIL is written to `storage` alone: a failed trial teaches no sampler anything, and most are of trials
    that will never report again. Without `study` (it has ended: no sampler left to teach) every state is
    written to the storage. By id: a retried row points at its latest Optuna trial, whose number is
    not the row's number.
    """
    for t in tells:
        try:
            if t.state is TrialState.FAIL or study is None:  # no study: it has ended, no sampler to teach
                retry_on_disconnect(storage.set_trial_state_values, t.trial_id, OPTUNA_STATE[t.state], t.values)
            else:
                retry_on_disconnect(asking.tell, study, t.trial_id, OPTUNA_STATE[t.state], t.values)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        except Exception:  # noqa: BLE001 - our row is the record; Optuna's copy is repaired before finalization
            log.exception("could not tell Optuna about trial id %s", t.trial_id)


def record_extension(db: Database, lease: leasing.Lease, values: list[float]) -> None:
    """A completed trial's extension has just completed (our row is recorded): its result becomes an Optuna
    trial of its own (`asking.extended_trial`), and our row points at it. Logged, not raised, as `tell`."""
    assert lease.optuna_trial_id is not None and lease.epochs_target is not None
    try:
        storage = optuna_storage(db.url)
        _, optuna_name = study_reads.study_config(db, lease.study_id)
        curve = study_reads.curve_values(db, lease.trial_id)
        new_id = retry_on_disconnect(asking.extended_trial, storage, optuna_name, lease.optuna_trial_id, values,
                                     curve, max(curve, default=lease.epochs_target))
        leasing.link_optuna_trial(db, lease.trial_id, optuna_trial_id=new_id)
    except Exception:  # noqa: BLE001 - our row is the record
        log.exception("could not record the extension of trial %s in Optuna", lease.number)


def repair(db: Database, study_id: str, study: optuna.Study) -> None:
    """Before a study closes, make Optuna's copy agree with ours where a crash split them.

    A worker killed between Optuna's ask and our bind leaves an Optuna trial we never ran; one killed
    between our finish and its tell leaves a finished trial RUNNING there. Waiting trials are left to
    finalization, which ends them.
    """
    storage = optuna_storage(db.url)
    oid = retry_on_disconnect(storage.get_study_id_from_name, study.study_name)
    stuck = retry_on_disconnect(storage.get_all_trials, oid, deepcopy=False, states=(OptunaState.RUNNING,))
    if not stuck:
        return
    ids = {t.number: retry_on_disconnect(storage.get_trial_id_from_study_id_trial_number, oid, t.number)
           for t in stuck}
    rows = study_reads.recorded_by_optuna_id(db, study_id, list(ids.values()))
    for frozen in stuck:
        row = rows.get(ids[frozen.number])
        if row is not None and not row.state.is_finished():
            continue
        state = row.state if row is not None else TrialState.FAIL
        values = row.values if row is not None and state is TrialState.COMPLETE else None
        tell(storage, [OptunaTell(ids[frozen.number], state, values)], study)
        log.warning("Optuna trial %d was left RUNNING by a crash; now %s", frozen.number,
                    state.value if row is not None else "fail (never ran)")
