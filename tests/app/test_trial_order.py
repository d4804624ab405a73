"""One best-first rule everywhere: the study's best trial and `sort=value` agree, and the earlier trial wins a
tie. A pruned trial's value is its last epoch's, listed by that value; `state=complete` ranks finished ones."""

from __future__ import annotations

from typing import Any

from app.core.config import Settings
from app.core.db import Database
from app.models import TrialState
from tests.factories import API, client_for, study_spec
from tests.study_rows import Outcome, write_trials

OUTCOMES = {0: Outcome(TrialState.PRUNED, [0.99]), 1: Outcome(TrialState.COMPLETE, [0.5]),
            2: Outcome(TrialState.COMPLETE, [0.8]), 3: Outcome(TrialState.COMPLETE, [0.8]),
            4: Outcome(TrialState.FAIL, [], error="boom")}


def _outcome(number: int, _params: dict[str, Any]) -> Outcome:
    return OUTCOMES[number]


def test_ties_go_to_the_earlier_trial_in_every_listing(settings: Settings,
                                                                                 db: Database) -> None:
    client = client_for(settings, db)
    sid = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 5, "max_parallel": 5})).json()["id"]
    write_trials(db, settings, study_id=sid, n=5, outcome=_outcome)
    assert client.get(f"{API}/studies/{sid}").json()["best_trial"]["number"] == 2
    by_value = client.get(f"{API}/studies/{sid}/trials", params={"sort": "value"}).json()["data"]
    assert [t["number"] for t in by_value] == [0, 2, 3, 1, 4]
    paged, cursor = [], None  # the same order across pages
    while True:
        page = client.get(f"{API}/studies/{sid}/trials",
                          params={"sort": "value", "limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        paged += [t["number"] for t in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == [0, 2, 3, 1, 4]
    complete = client.get(f"{API}/studies/{sid}/trials", params={"sort": "value", "state": "complete"}).json()
    assert [t["number"] for t in complete["data"]] == [2, 3, 1]
    ascending = client.get(f"{API}/studies/{sid}/trials", params={"sort": "value", "order": "asc"}).json()["data"]
    assert [t["number"] for t in ascending] == [1, 2, 3, 0, 4]  # ties still go to the earlier trial
