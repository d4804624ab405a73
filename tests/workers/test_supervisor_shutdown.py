"""A supervisor told to stop while it runs a study's final evaluation hands that evaluation back."""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.models import Study
from tests.factories import API, client_for, create_study_via_api, running_supervisor, wait_for_status
from workers import final_evaluation
from workers.supervisor import Supervisor

GRACE_S = 1.0


def _finalizer(db: Database, study_id: str) -> str | None:
    with db.read_session() as session:
        return session.scalar(select(Study.finalize_worker).where(Study.id == study_id))


def test_a_final_evaluation_past_the_shutdown_grace_is_handed_back_and_done_by_the_next_worker(
        settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 1, "epochs": 1})

    def slow(_name: str, _scores: dict[str, float]) -> None:  # runs in the forked evaluation child
        time.sleep(120)

    final_evaluation.test_evaluation_hooks.append(slow)
    try:
        supervisor = Supervisor(db, settings, devices=["cpu"], per_device=1, shutdown_grace_s=GRACE_S)
        thread = threading.Thread(target=supervisor.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while _finalizer(db, sid) is None:
            assert time.monotonic() < deadline, "the final evaluation never started"
            time.sleep(0.1)
        supervisor.stop()
        thread.join(90)  # the evaluation sleeps 120 s: a supervisor that waited for it would still run
        assert not thread.is_alive()
    finally:
        final_evaluation.test_evaluation_hooks.remove(slow)
    handed_back = client.get(f"{API}/studies/{sid}").json()
    assert handed_back["status"] == "running" and handed_back["test_metrics"] is None  # not evaluated
    assert _finalizer(db, sid) is None  # free for the next worker now, not when the lease runs out
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=60)
    assert study["status"] == "completed" and study["test_metrics"]["test_accuracy"] is not None
