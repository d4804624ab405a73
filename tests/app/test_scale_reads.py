"""Trial pages read by index ranges: every sort order, both directions and every state filter list each
trial exactly once, in the order the sort promises, however small the pages."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.core.config import Settings
from app.core.db import Database
from app.models import Study, Trial, TrialState
from app.services import importance
from app.services.errors import InvalidInput
from app.services.paging import encode_cursor
from app.services.trials import list_trials
from tests.factories import API, client_for, study_spec
from tests.study_rows import Outcome, write_trials

STATES = ["complete", "pruned", "fail", "running"]


def _study_with_trials(db: Database, n: int = 41) -> str:
    """Trials of every state; values and durations tie, and running trials have neither nor a finish time."""
    rng = random.Random(5)
    study_id = uuid.uuid4().hex
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with db.session() as session:
        session.add(Study(id=study_id, owner="alice", name="reads", spec=study_spec(), status="running",
                          optuna_name=f"hpsearch-{study_id}", n_trials=n, max_parallel=4))
        session.flush()
        for number in range(n):
            state = rng.choice(STATES)
            finished = state != "running"
            session.add(Trial(
                study_id=study_id, number=number, state=state, params={},
                value=rng.choice([0.5, 0.75, 0.9, rng.random()]) if state in ("complete", "pruned") else None,
                duration_s=rng.choice([1.0, 2.0, rng.random()]) if finished else None,
                finished_at=start + timedelta(seconds=rng.choice([1, 2, number])) if finished else None))
    return study_id


def _all_pages(db: Database, study_id: str, **query: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = list_trials(db, owner="alice", study_id=study_id, limit=3, cursor=cursor, **query)
        seen += [t.model_dump() for t in page.data]
        count = page.count
        cursor = page.next_cursor
        if cursor is None:
            assert count == len(seen)
            return seen


def _expected(trials: list[dict[str, Any]], field: str, desc: bool) -> list[int]:
    """With a value by value (desc reverses it; equal values keep the earlier trial first), then without one
    by number (desc reverses it)."""
    by_number = sorted((t for t in trials if t[field] is not None), key=lambda t: t["number"])
    with_value = sorted(by_number, key=lambda t: t[field], reverse=desc)  # stable: ties stay by number
    without = sorted((t for t in trials if t[field] is None), key=lambda t: t["number"], reverse=desc)
    return [t["number"] for t in with_value + without]


@pytest.mark.parametrize("sort,field", [("number", "number"), ("value", "value"), ("duration", "duration_s"),
                                        ("newest", "finished_at")])
def test_every_order_and_state_filter_lists_each_trial_once_in_order(db: Database, sort: str, field: str) -> None:
    study_id = _study_with_trials(db)
    everything = _all_pages(db, study_id, sort="number", order="asc")
    assert [t["number"] for t in everything] == list(range(41))
    for state in [None, *STATES]:
        chosen = [t for t in everything if state is None or t["state"] == state]
        for order in ("asc", "desc"):
            got = _all_pages(db, study_id, sort=sort, order=order, state=state)
            assert [t["number"] for t in got] == _expected(chosen, field, order == "desc"), (state, order)


def test_default_orders_put_the_best_value_and_the_latest_finished_first(db: Database) -> None:
    study_id = _study_with_trials(db)  # the spec maximizes
    everything = _all_pages(db, study_id)
    by_value = _all_pages(db, study_id, sort="value")
    newest = _all_pages(db, study_id, sort="newest")
    assert [t["number"] for t in by_value] == _expected(everything, "value", desc=True)
    assert [t["number"] for t in newest] == _expected(everything, "finished_at", desc=True)


def test_incremental_polling_lists_only_newer_trials(db: Database) -> None:
    study_id = _study_with_trials(db)
    assert [t["number"] for t in _all_pages(db, study_id, after=37)] == [38, 39, 40]


@pytest.mark.parametrize("values", [[2, 0.5, 3], [0, 0.5], [1, 0.5, 3], ["x", 1]])
def test_a_cursor_of_the_wrong_segment_or_shape_is_invalid_input(db: Database, values: list[Any]) -> None:
    study_id = _study_with_trials(db)
    with pytest.raises(InvalidInput):
        list_trials(db, owner="alice", study_id=study_id, sort="value", cursor=encode_cursor(values))


def test_importance_of_a_large_study_runs_on_a_sample_and_says_so(settings: Settings, db: Database,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def by_learning_rate(number: int, params: dict[str, Any]) -> Outcome:
        return Outcome(TrialState.COMPLETE, [0.95 - 0.1 * (math.log10(params["learning_rate"]) + 2) ** 2])

    client = client_for(settings, db)
    study = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 30, "max_parallel": 1})).json()
    write_trials(db, settings, study_id=study["id"], n=24, outcome=by_learning_rate)
    whole = client.get(f"{API}/studies/{study['id']}/importance").json()
    assert whole["n_trials"] == 24 and whole["sampled_from"] is None
    monkeypatch.setattr(importance, "SAMPLE_TRIALS", 8)
    write_trials(db, settings, study_id=study["id"], n=1, outcome=by_learning_rate, seed=1)  # a new cache key
    sampled = client.get(f"{API}/studies/{study['id']}/importance").json()
    assert sampled["sampled_from"] == 25 and 2 <= sampled["n_trials"] <= 8  # every 4th trial by number
    assert sampled["importances"][0]["name"] == "learning_rate"
