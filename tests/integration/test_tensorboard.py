"""Optional TensorBoard logs: per-epoch scalars of each trial, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.db import Database
from tests.conftest import make_settings
from tests.factories import client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from tests.factories import API


def test_each_trial_writes_its_epoch_scalars_and_deleting_the_study_removes_them(sqlite_url: str,
                                                                               tmp_path: Path) -> None:
    # Event files on disk: SQLite is enough (the study's deletion on each database is tested elsewhere).
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    spec = {**study_spec(budget={"n_trials": 2, "epochs": 3, "patience": None}), "tensorboard": True}
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db):
        assert wait_for_status(client, sid, {"completed", "failed"})["status"] == "completed"
    assert settings.artifact_dir is not None
    root = settings.artifact_dir / "tensorboard" / sid
    assert sorted(p.name for p in root.iterdir()) == ["trial-0", "trial-1"]
    for number in (0, 1):
        events = EventAccumulator(str(root / f"trial-{number}"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "val/loss", "val/val_accuracy", "learning_rate", "epoch_seconds"} <= tags
        curve = client.get(f"{API}/studies/{sid}/trials/{number}").json()["curve"]
        logged = [(e.step, e.value) for e in events.Scalars("val/val_accuracy")]
        assert logged == [(p["epoch"], pytest.approx(p["val_metric"])) for p in curve]

    plain = create_study_via_api(client, budget={"n_trials": 1, "epochs": 1})
    with running_supervisor(settings, db):
        wait_for_status(client, plain, {"completed", "failed"})
    assert not (settings.artifact_dir / "tensorboard" / plain).exists()  # off unless the spec asks

    assert client.delete(f"{API}/studies/{sid}").status_code == 204
    assert not root.exists()
    db.dispose()
