"""Errors in the supervisor itself, outside any trial's process: counted as attempts, so a study ends."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.config import Settings
from app.core.db import Database
from tests.factories import client_for, running_supervisor, study_spec, wait_for_status
from workers.supervisor import Supervisor

API = "/api/v1"


def test_a_runner_that_cannot_be_forked_fails_its_trials_after_max_attempts(
        settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(self: Supervisor, job: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(Supervisor, "_spawn", no_memory)
    client = client_for(settings, db)
    spec = study_spec(budget={"n_trials": 1, "epochs": 1, "max_parallel": 1, "max_attempts": 2})
    sid = client.post(f"{API}/studies", json=spec).json()["id"]
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=60)
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert [(t["state"], t["attempt"]) for t in trials] == [("fail", 2)]
    assert "Cannot allocate memory" in trials[0]["error"] and "2 attempt(s) used" in trials[0]["error"]
    assert study["status"] == "failed" and study["progress"]["fail"] == 1
