"""GET /studies/{id}/history/overview: bounded at any size, with the best-so-far line exactly as drawn from
every trial and the extremes of the cloud kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.core.db import Database
from app.main import create_app
from app.services.history import best_steps
from benchmarks.dashboard_data import build_study
from tests.conftest import make_settings
from tests.factories import client_for, study_spec
from tests.study_rows import write_trials


def _every_trial(client: TestClient, study_id: str) -> list[tuple[int, str, float | None]]:
    rows: list[tuple[int, str, float | None]] = []
    after = -1
    while after is not None:
        page = client.get(f"/api/v1/studies/{study_id}/history", params={"after": after}).json()
        rows += zip(page["number"], page["state"], page["value"], strict=True)
        after = page["next_after"]
    return rows


def _best_so_far(rows: list[tuple[int, str, float | None]]) -> list[list[float]]:
    steps, best = [], None
    for number, state, value in sorted(rows):
        if state == "complete" and value is not None and (best is None or value > best):
            best = value
            steps.append([number, value])
    return steps


def test_a_large_study_is_downsampled_but_keeps_extremes_and_the_exact_best_line(db_url: str,
                                                                                  tmp_path: Path) -> None:
    built = build_study(db_url, n_trials=1500, epochs=2)
    settings = make_settings(db_url, tmp_path / "home")
    db = Database(db_url)
    try:
        client = TestClient(create_app(settings, db))
        client.headers["Authorization"] = f"Bearer {built.key}"
        rows = _every_trial(client, built.study_id)
        response = client.get(f"/api/v1/studies/{built.study_id}/history/overview", params={"points": 200})
        assert response.status_code == 200
        o = response.json()
        with_value = {s: [(n, v) for n, st, v in rows if st == s and v is not None] for s in ("complete", "pruned")}
        assert o["trials"] == 1500 and o["last_number"] == 1499 and o["first_open"] is None
        assert o["with_value"] == {s: len(v) for s, v in with_value.items()}
        assert o["sampled"] and len(o["complete"]) + len(o["pruned"]) <= 200
        assert o["best"] == _best_so_far(rows)
        for state, points in with_value.items():
            drawn = {tuple(p) for p in o[state]}
            assert drawn <= {tuple(p) for p in points}  # real trials, never invented points
            assert min(points, key=lambda p: p[1]) in drawn and max(points, key=lambda p: p[1]) in drawn
        # The best trials with their parameters, best first, and what the page needs to draw their axes.
        complete = sorted(with_value["complete"], key=lambda p: (-p[1], p[0]))
        assert o["top"]["number"] == [n for n, _ in complete[:2000]]
        assert o["param_kinds"]["batch_size"] == "categorical" and o["param_kinds"]["dropout"] == "float"
        assert "learning_rate" in o["log_scale"] and "dropout" not in o["log_scale"]
        assert len(o["top"]["params"]["learning_rate"]) == len(o["top"]["number"])
        small = client.get(f"/api/v1/studies/{built.study_id}/history/overview", params={"top": 5}).json()
        assert small["top"]["number"] == o["top"]["number"][:5]
    finally:
        db.dispose()


def test_a_small_study_keeps_every_point_and_names_what_the_spec_searched(sqlite_url: str,
                                                                         tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(settings.database_url)
    try:
        alice = client_for(settings, db)
        study = alice.post("/api/v1/studies", json=study_spec(budget={"n_trials": 16, "max_parallel": 1})).json()
        write_trials(db, settings, study_id=study["id"], n=12)
        o = alice.get(f"/api/v1/studies/{study['id']}/history/overview").json()
        rows = _every_trial(alice, study["id"])
        assert not o["sampled"]
        assert sorted(map(tuple, o["complete"])) == sorted((n, v) for n, s, v in rows if s == "complete")
        assert o["best"] == _best_so_far(rows)
        assert set(o["searched"]) == {"learning_rate", "units", "n_layers"}  # optimizer is fixed: not searched
        # Kept while no trial finishes, read afresh once one does.
        write_trials(db, settings, study_id=study["id"], n=4, seed=1)
        again = alice.get(f"/api/v1/studies/{study['id']}/history/overview").json()
        rows = _every_trial(alice, study["id"])
        assert again["trials"] == 16 and again["best"] == _best_so_far(rows)
        assert sorted(map(tuple, again["complete"])) == sorted((n, v) for n, s, v in rows if s == "complete")
        assert client_for(settings, db, owner="mallory").get(
            f"/api/v1/studies/{study['id']}/history/overview").status_code == 404
    finally:
        db.dispose()


def test_best_steps_keep_the_earlier_trial_of_a_tie_and_follow_the_direction() -> None:
    numbers = np.array([0, 1, 2, 3, 4])
    values = np.array([0.5, 0.7, 0.7, 0.6, 0.9])
    assert best_steps(numbers, values, maximize=True) == [(0, 0.5), (1, 0.7), (4, 0.9)]
    assert best_steps(numbers, values, maximize=False) == [(0, 0.5)]
    assert best_steps(numbers[:0], values[:0], maximize=True) == []
