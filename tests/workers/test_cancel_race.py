"""A cancel that lands between a worker's Optuna ask and its bind: no Optuna trial of the cancelled study may
stay RUNNING, whether the worker goes on to bind or dies before it does. The interleaving is provoked by
calling the real functions in that order, never by load."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta
from typing import Any

import pytest
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select, update

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study, Trial
from app.models.base import utcnow
from app.services import studies
from tests.factories import create_study_via_service
from workers import asking, leasing, reaper
from workers.attempt import Slot, bind, rebind, release
from workers.prepared import PreparedStudies, PreparedStudy


def _slot(db: Database, settings: Settings) -> Slot:
    return Slot(db, settings, "w1", PreparedStudies(db, settings), mp.get_context("fork"), 1, lambda: False)


def _claim(db: Database) -> leasing.Lease:
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert lease is not None
    return lease


def _cancel(db: Database, sid: str) -> None:
    studies.change_state(db, owner="alice", study_id=sid, action="cancel")


def _live_in_optuna(db: Database, sid: str) -> list[int]:
    with db.read_session() as session:
        name = session.scalars(select(Study.optuna_name).where(Study.id == sid)).one()
    storage = optuna_storage(db.url)
    oid = storage.get_study_id_from_name(name)
    return sorted(t.number for t in storage.get_all_trials(oid, deepcopy=False,
                                                          states=(OptunaState.RUNNING, OptunaState.WAITING)))


def _states(db: Database, sid: str) -> list[str]:
    with db.read_session() as session:
        return sorted(session.scalars(select(Trial.state).where(Trial.study_id == sid)))


def _cancelling_first(monkeypatch: pytest.MonkeyPatch, db: Database, sid: str, name: str) -> None:
    """Make leasing.`name` (the bind after the ask) meet a study cancelled a moment before it."""
    real = getattr(leasing, name)

    def cancel_then(*args: Any, **kwargs: Any) -> Any:
        _cancel(db, sid)
        return real(*args, **kwargs)

    monkeypatch.setattr(leasing, name, cancel_then)


def test_a_bind_after_the_cancel_is_refused_and_its_optuna_trial_ends(
        db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 4})
    slot = _slot(db, settings)
    p = slot.studies.get(sid)
    lease = _claim(db)
    _cancelling_first(monkeypatch, db, sid, "bind_trial")
    assert bind(slot, lease, p) is None  # the study ended between the ask and the bind
    assert _live_in_optuna(db, sid) == []
    assert _states(db, sid) == []  # a sampler's slot that never got its configuration is dropped


def test_a_rebind_after_the_cancel_is_refused_and_both_optuna_trials_end(
        db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 4, "max_attempts": 3})
    slot = _slot(db, settings)
    p = slot.studies.get(sid)
    first = bind(slot, _claim(db), p)
    assert first is not None
    _stale(db, first.trial_id)
    assert [r.requeued for r in reaper.reap_and_tell(db, grace_s=5)] == [True]
    retry = _claim(db)
    assert retry.trial_id == first.trial_id and retry.attempt == 2
    _cancelling_first(monkeypatch, db, sid, "rebind_trial")
    assert rebind(slot, retry, p) is None
    assert _live_in_optuna(db, sid) == []
    assert _states(db, sid) == ["fail"]


def test_a_worker_that_dies_between_the_ask_and_the_bind_leaves_nothing_running_once_cancelled(
        db: Database, settings: Settings) -> None:
    sid = create_study_via_service(db, settings, budget={"n_trials": 4})
    p = _slot(db, settings).studies.get(sid)
    lease = _claim(db)
    _ask(db, p)  # ... and the worker dies here: nothing of ours names this Optuna trial
    _cancel(db, sid)
    _stale(db, lease.trial_id)
    reaper.reap_and_tell(db, grace_s=5)
    assert _live_in_optuna(db, sid) == []
    assert _states(db, sid) == []


def _ask(db: Database, p: PreparedStudy) -> int:
    _, trial_id, _ = asking.ask_trial(p.optuna_study, p.resolved, None)
    return trial_id


def _stale(db: Database, trial_id: int) -> None:
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))


def test_a_hand_back_after_the_cancel_ends_the_optuna_trial_the_row_is_bound_to(
        db: Database, settings: Settings) -> None:
    """A worker that hits a database error mid-attempt hands back the lease as it claimed it, unbound: what
    Optuna must be told comes from the row, which names the trial the bind gave it."""
    sid = create_study_via_service(db, settings, budget={"n_trials": 4})
    slot = _slot(db, settings)
    claimed = _claim(db)
    assert bind(slot, claimed, slot.studies.get(sid)) is not None
    _cancel(db, sid)  # the bound trial runs on: its worker stops it, or hands it back
    assert _live_in_optuna(db, sid) == [0]
    release(slot, claimed)
    assert _live_in_optuna(db, sid) == []
    assert _states(db, sid) == ["fail"]
