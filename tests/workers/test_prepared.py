"""What a supervisor keeps loaded: the studies its slots run, and a few idle ones that may still run."""

from __future__ import annotations

from app.core.config import Settings
from app.core.db import Database
from app.schemas.study import StudySpec
from app.services import studies
from tests.factories import study_spec
from workers.prepared import PreparedStudies
from workers.supervisor import Supervisor


def _study(db: Database, settings: Settings, **overrides: object) -> str:
    spec = StudySpec.model_validate(study_spec(**overrides))
    return studies.create_study(db, settings, owner="alice", spec=spec)[0].id


def test_a_worker_lets_go_of_a_study_that_ended_without_it(settings: Settings, db: Database) -> None:
    """Cancelled (or finalized by another worker): no slot here runs it and it gives no more work."""
    small = {"budget": {"n_trials": 3, "max_parallel": 1, "epochs": 1}}
    supervisor = Supervisor(db, settings, devices=["cpu"], per_device=1)
    cancelled = _study(db, settings, **small)
    assert supervisor._step("cpu")  # trains a trial of the first study
    studies.change_state(db, owner="alice", study_id=cancelled, action="cancel")
    running = _study(db, settings, **small)
    assert supervisor._step("cpu")  # and one of the second
    assert supervisor.slot.studies.held() == [running]


def test_idle_studies_are_bounded_and_those_in_use_are_kept(settings: Settings, db: Database) -> None:
    ids = [_study(db, settings) for _ in range(3)]
    prepared = PreparedStudies(db, settings, idle_limit=1)
    with prepared.using(ids[0]), prepared.using(ids[1]), prepared.using(ids[2]):
        assert prepared.held() == ids
    assert prepared.held() == [ids[2]]  # the most recently used idle study
    for study_id in ids:
        with prepared.using(study_id):
            pass
    assert prepared.held() == [ids[2]]
