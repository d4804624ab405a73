"""What a study's trials keep of their checkpoints, on SQLite and PostgreSQL: rows and files agree.

Each trial here trains a tiny network with the production checkpoint hook, whose every file is recorded
through the supervisor's own `_on_checkpoint`; the outcome is recorded by `attempt.record` and the files are
swept by `_drop_checkpoints_if_ended`, as a worker does once a runner is gone (no fork: the runner's part
runs in this process).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlalchemy import update

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml.artifacts import build_module, save_trial
from app.models import FailureKind, Trial, TrialState
from app.models.base import utcnow
from app.services import studies
from tests.factories import API, client_for, create_study_via_service, running_supervisor, study_spec, wait_for_status
from tests.workers.test_checkpoints import blobs, model_for
from workers import attempt, checkpoint_sweep, leasing, retries
from workers.checkpoints import CheckpointFile, EpochCheckpointer, read_checkpoint
from workers.prepared import PreparedStudies
from workers.protocol import Checkpointed
from workers.publishing import checkpoint_dir, staged_stem
from workers.trainer import cpu_state, train

LOG = logging.LoggerAdapter(logging.getLogger("hpsearch.worker"), {})
EPOCHS = 3
PARAMS = {"n_layers": 1, "units": 8}  # every trial's checkpoints are the same size: quotas are exact sums


def _slot(db: Database, settings: Settings) -> attempt.Slot:
    return attempt.Slot(db, settings, "w1", PreparedStudies(db, settings), mp.get_context("fork"), 1, lambda: False)


def _study(db: Database, settings: Settings, owner: str = "alice", n_trials: int = 20, max_attempts: int = 2,
           **spec: Any) -> str:
    """A study that leases its n_trials, then leaves the claims to younger studies (the oldest with room is
    claimed from first)."""
    return create_study_via_service(db, settings, owner=owner, **spec, budget={
        "n_trials": n_trials, "max_parallel": 4, "max_attempts": max_attempts})


class Running:
    """A claimed trial bound to its Optuna trial, as `supervise` follows it."""

    def __init__(self, slot: attempt.Slot, study_id: str) -> None:
        lease = leasing.claim_trial(slot.db, worker_id="w1", device="cpu", trial_deadline_s=600)
        assert lease is not None and lease.study_id == study_id
        self.slot, self.p = slot, slot.studies.get(study_id)
        bound = attempt.bind(slot, lease, self.p)
        assert bound is not None and bound.optuna_trial_id is not None
        self.member = attempt.Member(bound, optuna.Trial(self.p.optuna_study, bound.optuna_trial_id), math.inf,
                                     tlog=LOG)
        self.recorded: list[bool] = []  # what _on_checkpoint answered for each checkpoint
        self.sizes: list[int] = []  # of each checkpoint written

    @property
    def lease(self) -> leasing.Lease:
        return self.member.lease

    def train(self, epochs: int = EPOCHS) -> None:
        """The runner's loop: a checkpoint every epoch, each recorded before the older one goes."""
        assert self.slot.settings.artifact_dir is not None
        hook = EpochCheckpointer(checkpoint_dir(self.slot.settings.artifact_dir, self.lease),
                                 on_written=self._written)
        data = blobs()
        train(model_for(data, PARAMS), data, PARAMS, epochs=epochs, objective="val_accuracy",
              direction="maximize", patience=None, checkpoint=hook)
        hook.wait()  # the last write, recorded before the trial's end (as the runner does before Done)

    def _written(self, w: CheckpointFile) -> None:  # the Checkpointed message reaches the supervisor
        self.sizes.append(w.bytes)
        self.recorded.append(attempt._on_checkpoint(
            self.slot, Checkpointed(self.lease.trial_id, str(w.path), w.epoch, w.bytes), self.member))

    def complete(self, accuracy: float) -> None:
        assert self.slot.settings.artifact_dir is not None
        spec = self.p.model_spec(self.lease.params or {})
        save_trial(staged_stem(self.slot.settings.artifact_dir, self.lease), cpu_state(build_module(spec)), spec,
                   metrics={}, layers=[])
        self._end(attempt.Ending(attempt.Outcome.COMPLETE, {
            "metrics": {"val_accuracy": accuracy, "val_loss": 1.0 - accuracy}, "epochs_run": EPOCHS,
            "best_epoch": EPOCHS, "stop_reason": "completed"}))

    def prune(self) -> None:
        self._end(attempt.Ending(attempt.Outcome.PRUNED, {"metrics": {"val_accuracy": 0.1}, "epoch": EPOCHS}))

    def _end(self, ending: attempt.Ending) -> None:
        attempt.record(self.slot, ending, self.lease, self.p, LOG)
        self.ended()

    def ended(self) -> None:
        """What `supervise` does once the runner is gone."""
        attempt._drop_checkpoints_if_ended(self.slot, self.lease)


def _run(slot: attempt.Slot, study_id: str, accuracy: float) -> Running:
    trial = Running(slot, study_id)
    trial.train()
    trial.complete(accuracy)
    return trial


def _rows(db: Database, study_id: str) -> dict[int, tuple[str | None, int | None, int | None]]:
    """Each numbered trial's recorded checkpoint: (path, epoch, bytes)."""
    with db.read_session() as session:
        return {t.number: (t.checkpoint_path, t.checkpoint_epoch, t.checkpoint_bytes)
                for t in session.query(Trial).filter(Trial.study_id == study_id, Trial.number.is_not(None))}


def _on_disk(settings: Settings, study_id: str) -> set[str]:
    """Every file under the study's checkpoint folder, relative to the artifact dir."""
    assert settings.artifact_dir is not None
    root = settings.artifact_dir / study_id / "checkpoints"
    return {p.relative_to(settings.artifact_dir).as_posix() for p in root.rglob("*") if p.is_file()}


def _kept(db: Database, settings: Settings, study_id: str) -> dict[int, int]:
    """The trials that hold a checkpoint, with its epoch; asserts that the rows and the files agree: every
    file on disk is one a row names, of the epoch and the size the row says."""
    assert settings.artifact_dir is not None
    held = {n: row for n, row in _rows(db, study_id).items() if row[0] is not None}
    assert _on_disk(settings, study_id) == {path for path, _, _ in held.values()}
    for path, epoch, size in held.values():
        assert path is not None and path.endswith(f"/epoch-{epoch:06d}.safetensors")
        assert (settings.artifact_dir / path).stat().st_size == size
    return {n: epoch for n, (_, epoch, _) in held.items() if epoch is not None}


def test_best_k_of_one_the_better_trial_takes_the_checkpoint_from_the_first(db: Database,
                                                                             settings: Settings) -> None:
    slot = _slot(db, settings)
    sid = _study(db, settings, keep_checkpoints="best_k", keep_best_k=1)
    first = _run(slot, sid, 0.5)
    assert _kept(db, settings, sid) == {first.lease.number: EPOCHS}  # its newest checkpoint, not an older one
    second = _run(slot, sid, 0.7)
    assert _kept(db, settings, sid) == {second.lease.number: EPOCHS}
    worse = _run(slot, sid, 0.6)
    assert _kept(db, settings, sid) == {second.lease.number: EPOCHS}
    assert all(r is True for t in (first, second, worse) for r in t.recorded)

    assert settings.artifact_dir is not None
    path, epoch, _ = _rows(db, sid)[second.lease.number]  # type: ignore[index]
    state = read_checkpoint(settings.artifact_dir / str(path))  # whole, with the best-so-far weights to extend
    assert state.epoch == epoch == EPOCHS and state.best_model
    trial = client_for(settings, db).get(f"{API}/studies/{sid}/trials/{second.lease.number}").json()
    assert (trial["checkpoint_epoch"], trial["checkpoint_bytes"]) == (EPOCHS, _rows(db, sid)[second.lease.number][2])


def test_best_k_ranks_by_the_direction_and_keeps_k(db: Database, settings: Settings) -> None:
    slot = _slot(db, settings)
    sid = _study(db, settings, objective={"metric": "val_loss", "direction": "minimize"}, keep_best_k=2)
    numbers = {}
    for loss in (0.4, 0.2, 0.5, 0.3):  # record() reads val_loss as 1 - accuracy here
        numbers[loss] = _run(slot, sid, 1.0 - loss).lease.number
    assert set(_kept(db, settings, sid)) == {numbers[0.2], numbers[0.3]}


def test_none_keeps_no_completed_trials_checkpoint(db: Database, settings: Settings) -> None:
    slot = _slot(db, settings)
    sid = _study(db, settings, keep_checkpoints="none")
    running = Running(slot, sid)
    running.train()
    assert _kept(db, settings, sid) == {running.lease.number: EPOCHS}  # a running trial keeps its latest
    running.complete(0.9)
    _run(slot, sid, 0.8)
    assert _kept(db, settings, sid) == {}
    assert settings.artifact_dir is not None and not (settings.artifact_dir / sid / "checkpoints").exists()


def test_all_keeps_every_completed_trials_newest_checkpoint(db: Database, settings: Settings) -> None:
    slot = _slot(db, settings)
    sid = _study(db, settings, keep_checkpoints="all")
    numbers = [_run(slot, sid, accuracy).lease.number for accuracy in (0.5, 0.9, 0.7, 0.6)]
    assert _kept(db, settings, sid) == dict.fromkeys(numbers, EPOCHS)


def test_pruned_and_failed_trials_keep_none_and_deleting_the_study_deletes_the_rest(
        db: Database, settings: Settings) -> None:
    slot = _slot(db, settings)
    sid = _study(db, settings, keep_checkpoints="all", max_attempts=1)
    kept = _run(slot, sid, 0.5)
    pruned = Running(slot, sid)
    pruned.train()
    pruned.prune()
    failed = Running(slot, sid)
    failed.train()
    attempt.record(slot, attempt.Ending(attempt.Outcome.FAILED, failure=FailureKind.ERROR, reason="boom"),
                   failed.lease, failed.p, LOG)
    failed.ended()
    reaped = Running(slot, sid)  # its worker died: the reaper fails it for good (no attempt left)
    reaped.train()
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == reaped.lease.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert [r.requeued for r in retries.reap(db, grace_s=5)] == [False]
    assert _rows(db, sid)[reaped.lease.number] == (None, None, None)  # type: ignore[index]
    assert settings.artifact_dir is not None
    # No supervisor of the dead worker sweeps: the next trial end that looks at every folder does, or the
    # study's end (finalization sweeps every folder).
    assert checkpoint_sweep.sweep(db, settings.artifact_dir, sid) != []
    assert _kept(db, settings, sid) == {kept.lease.number: EPOCHS}

    studies.delete_study(db, settings, owner="alice", study_id=sid)
    assert not (settings.artifact_dir / sid).exists()


def test_a_trial_back_in_line_keeps_its_checkpoint(db: Database, settings: Settings) -> None:
    slot = _slot(db, settings)
    sid = _study(db, settings)  # best_k: every trial end looks at every folder of the study
    trial, other = Running(slot, sid), Running(slot, sid)
    trial.train()
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == trial.lease.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert [r.requeued for r in retries.reap(db, grace_s=5)] == [True]  # to resume from its checkpoint
    trial.ended()
    other.train()
    other.complete(0.5)  # its sweep leaves the waiting trial's files alone
    assert _kept(db, settings, sid) == {trial.lease.number: EPOCHS, other.lease.number: EPOCHS}


def _checkpoint_bytes(db: Database, settings: Settings) -> int:
    """The size of one checkpoint of PARAMS' network, written by the production hook."""
    slot = _slot(db, settings)
    sid = _study(db, settings, owner="sizer", n_trials=1)
    trial = Running(slot, sid)
    trial.train(epochs=1)
    size = _rows(db, sid)[trial.lease.number][2]  # type: ignore[index]
    assert size
    return size


@pytest.fixture
def size(db: Database, settings: Settings) -> int:
    return _checkpoint_bytes(db, settings)


def test_a_checkpoint_past_the_owners_quota_fails_the_trial_and_deletes_its_file(
        db: Database, settings: Settings, size: int) -> None:
    # Room for two checkpoints and a half (a later epoch's is a little larger: its header holds more history).
    quota = settings.model_copy(update={"checkpoint_quota_mb": 2.5 * size / 1e6})
    slot = _slot(db, quota)
    first = _study(db, settings, n_trials=1)
    kept = _run(slot, first, 0.5)  # each epoch's checkpoint replaces the last one: never counted twice
    assert _kept(db, settings, first) == {kept.lease.number: EPOCHS}
    running = Running(slot, _study(db, settings, n_trials=1))
    running.train(epochs=2)  # a running trial in another study of hers fits too: two checkpoints now
    assert running.recorded == [True, True]

    second = _study(db, settings, n_trials=1)
    over = Running(slot, second)
    over.train(epochs=1)
    over.ended()
    assert over.recorded == [True] and over.member.ended  # the member ended here: its runner is stopped
    with db.read_session() as session:
        row = session.get(Trial, over.lease.trial_id)
        assert row is not None and row.state == TrialState.FAIL.value
        assert row.failure == FailureKind.CHECKPOINT_QUOTA.value
        would_hold = kept.sizes[-1] + running.sizes[-1] + over.sizes[0]
        assert row.error == (f"checkpoint quota exceeded: owner alice would hold {leasing.human_bytes(would_hold)} "
                             f"of checkpoints, HPSEARCH_CHECKPOINT_QUOTA_MB allows "
                             f"{leasing.human_bytes(int(2.5 * size))}")
        assert (row.checkpoint_path, row.checkpoint_bytes) == (None, None)
    assert _on_disk(settings, second) == set()  # its file is deleted
    assert over.lease.optuna_trial_id is not None
    assert optuna_storage(db.url).get_trial(over.lease.optuna_trial_id).state is optuna.trial.TrialState.FAIL
    assert _kept(db, settings, first) == {kept.lease.number: EPOCHS}  # what she had is untouched

    bob = Running(_slot(db, quota), _study(db, settings, owner="bob", n_trials=1))  # another owner has his own quota
    bob.train(epochs=1)
    assert bob.recorded == [True]


def test_a_worker_fails_each_trial_past_the_quota_and_goes_on(db: Database, settings: Settings) -> None:
    """A real supervisor and forked runners: the quota's failure stops the runner and the study goes on."""
    tiny = settings.model_copy(update={"checkpoint_quota_mb": 0.001})  # 1 kB: below any checkpoint
    client = client_for(tiny, db)
    sid = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 2, "epochs": 3, "max_parallel": 1},
                                                        checkpoint_every=1)).json()["id"]
    with running_supervisor(tiny, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["progress"]["fail"] == 2 and study["checkpoint_bytes"] == 0, study
    for trial in client.get(f"{API}/studies/{sid}/trials").json()["data"]:
        detail = client.get(f"{API}/studies/{sid}/trials/{trial['number']}").json()
        assert detail["failure"] == "checkpoint_quota", detail
        assert detail["error"].startswith("checkpoint quota exceeded: owner alice would hold ")
        assert [e["epoch"] for e in detail["curve"]] == [1]  # stopped at its first checkpoint
    assert _on_disk(settings, sid) == set()


def test_the_quota_counts_what_rows_hold_and_a_row_s_own_checkpoint_once(db: Database, settings: Settings) -> None:
    sid = _study(db, settings, n_trials=1)
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert lease is not None
    lease = leasing.bind_trial(db, lease, number=0, optuna_trial_id=1000, params={})
    assert lease is not None
    record = leasing.record_checkpoint(db, lease, path=f"{sid}/checkpoints/trial-0-1/epoch-000001.safetensors",
                                       epoch=1, size=600, quota_bytes=1000)
    assert record.recorded
    again = leasing.record_checkpoint(db, lease, path=f"{sid}/checkpoints/trial-0-1/epoch-000002.safetensors",
                                      epoch=2, size=1000, quota_bytes=1000)
    assert again.recorded  # 1000 bytes at most at once: the new file replaces the row's 600
    refused = leasing.record_checkpoint(db, lease, path=f"{sid}/checkpoints/trial-0-1/epoch-000003.safetensors",
                                        epoch=3, size=1001, quota_bytes=1000)
    assert refused.held and refused.refused == ("checkpoint quota exceeded: owner alice would hold 1.0 kB of "
                                                "checkpoints, HPSEARCH_CHECKPOINT_QUOTA_MB allows 1.0 kB")
    assert _rows(db, sid)[0] == (f"{sid}/checkpoints/trial-0-1/epoch-000002.safetensors", 2, 1000)  # unchanged
    assert leasing.record_checkpoint(db, lease, path="x", epoch=3, size=10**9).recorded  # no quota: no limit


def test_get_study_shows_the_checkpoint_bytes_its_trials_hold(db: Database, settings: Settings) -> None:
    client = client_for(settings, db)
    sid = _study(db, settings, keep_checkpoints="all", n_trials=2)
    other = _study(db, settings, n_trials=1)
    sizes = {}
    for study_id, size in ((sid, 1_500_000), (sid, 2_900_000), (other, 7)):
        lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
        assert lease is not None and lease.study_id == study_id
        lease = leasing.bind_trial(db, lease, number=len(sizes), optuna_trial_id=1000 + len(sizes), params={})
        assert lease is not None
        assert leasing.record_checkpoint(db, lease, path=f"{study_id}/checkpoints/c{size}", epoch=1, size=size).held
        sizes[lease.number] = size
    study = client.get(f"{API}/studies/{sid}").json()
    assert study["checkpoint_bytes"] == 4_400_000
    listed = {s["id"]: s["checkpoint_bytes"] for s in client.get(f"{API}/studies").json()["data"]}
    assert listed == {sid: 4_400_000, other: 7}
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert [(t["checkpoint_epoch"], t["checkpoint_bytes"]) for t in trials] == [(1, 1_500_000), (1, 2_900_000)]


def test_bytes_read_as_people_read_them() -> None:
    assert [leasing.human_bytes(n) for n in (0, 999, 1000, 4_400_000, 12_345_678, 1_200_000_000)] == [
        "0 B", "999 B", "1.0 kB", "4.4 MB", "12 MB", "1.2 GB"]


def test_checkpoint_folders_are_found_by_trial_number(tmp_path: Path) -> None:
    from workers.publishing import checkpoint_folders

    root = tmp_path / "s" / "checkpoints"
    for name in ("trial-3-1", "trial-3-2", "trial-12-1", "not-a-trial"):
        (root / name).mkdir(parents=True)
    (root / "trial-4-1").write_text("a file, not a folder")
    found = {n: sorted(p.name for p in paths) for n, paths in checkpoint_folders(tmp_path, "s").items()}
    assert found == {3: ["trial-3-1", "trial-3-2"], 12: ["trial-12-1"]}
    assert checkpoint_folders(tmp_path, "absent") == {}
