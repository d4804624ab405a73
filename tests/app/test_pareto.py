"""GET /studies/{id}/pareto: non-domination over our trial rows, and who may ask."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.core.config import Settings
from app.core.db import Database
from app.models import Trial
from app.services.pareto import nondominated
from tests.factories import API, client_for, create_study_via_api, study_spec

MULTI = [{"metric": "val_accuracy", "direction": "maximize"},
         {"metric": "param_count", "direction": "minimize"}]


@pytest.mark.parametrize("losses,front", [
    ([[1, 1], [2, 2], [0, 3], [3, 0]], [0, 2, 3]),
    ([[1, 1], [1, 1], [1, 2]], [0, 1]),  # equal points do not dominate each other
    ([[3, 1, 2], [1, 3, 2], [2, 2, 2], [3, 3, 3]], [0, 1, 2]),
    ([[5, 5], [4, 6], [4, 5]], [2]),
])
def test_nondominated_minimizes_every_column(losses: list[list[float]], front: list[int]) -> None:
    assert nondominated(np.array(losses, dtype=float)) == front


def test_nondominated_matches_brute_force_on_random_points() -> None:
    rng = np.random.default_rng(0)
    for k in (2, 3):
        losses = rng.integers(0, 6, size=(200, k)).astype(float)  # many ties
        brute = [i for i, a in enumerate(losses)
                 if not any(np.all(b <= a) and np.any(b < a) for b in losses)]
        assert nondominated(losses) == brute
    assert nondominated(np.empty((0, 2))) == []


def create_multi(client: Any) -> str:
    response = client.post(f"{API}/studies", json=study_spec(objective=MULTI, pruner={"name": "none"}))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def add_trials(db: Database, study_id: str, rows: list[tuple[str, list[float] | None]]) -> None:
    """Finished trials written straight into our table, as the supervisor leaves them."""
    with db.session() as session:
        for number, (state, values) in enumerate(rows):
            session.add(Trial(study_id=study_id, number=number, state=state, values=values,
                              value=values[0] if values else None, params={"units": number}, attempt=1))


def test_front_from_rows_in_both_directions(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_multi(client)
    add_trials(db, sid, [
        ("complete", [0.90, 5000.0]),  # 0: front (most accurate)
        ("complete", [0.80, 800.0]),   # 1: front
        ("complete", [0.70, 900.0]),   # 2: dominated by 1
        ("complete", [0.50, 100.0]),   # 3: front (smallest)
        ("pruned", [0.99, 1.0]),       # 4: not complete: left out even though it would dominate all
        ("fail", None),                # 5
        ("complete", [0.80, 800.0]),   # 6: equal to 1, so on the front too
    ])
    body = client.get(f"{API}/studies/{sid}/pareto").json()
    assert body["objectives"] == MULTI and body["n_complete"] == 5
    assert [t["number"] for t in body["data"]] == [0, 1, 6, 3] and body["count"] == 4
    assert body["data"][1]["params"] == {"units": 1} and body["data"][1]["values"] == [0.8, 800.0]


def test_pareto_is_409_for_one_objective_and_404_for_another_owner(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    single = create_study_via_api(client)
    response = client.get(f"{API}/studies/{single}/pareto")
    assert response.status_code == 409 and "single objective" in response.json()["detail"]
    multi = create_multi(client)
    empty = client.get(f"{API}/studies/{multi}/pareto").json()
    assert (empty["count"], empty["data"], empty["n_complete"]) == (0, [], 0)
    assert client_for(settings, db, owner="mallory").get(f"{API}/studies/{multi}/pareto").status_code == 404
    assert client.get(f"{API}/studies/{'0' * 32}/pareto").status_code == 404
