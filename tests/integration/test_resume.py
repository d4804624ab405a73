"""A solo trial whose runner or worker dies resumes from its last recorded checkpoint: real worker processes,
real SIGKILLs. The resumed trial ends exactly as the same trial run without a kill (same study seed and trial
number), on the same Optuna trial, each epoch recorded once; a checkpoint that cannot be read is passed over
with the reason on the trial, never a crash loop."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.db import Database
from app.models import Trial, TrialState
from tests.factories import create_study_via_api
from tests.integration.processes import (
    alive,
    children_of,
    processes,
    start_worker,
    study_status,
    training_spec,
    trials_of,
    wait_until,
)
from tests.integration.resumes import assert_same_trial_as, only_trial, reference_database, resume_env

EPOCHS = 12
EVERY = 3  # checkpoint_every


def _spec() -> dict[str, object]:
    spec = training_spec(EPOCHS, n_trials=1, max_parallel=1, max_attempts=2)
    spec["checkpoint_every"] = EVERY
    return spec


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           sqlite_template: Path) -> Iterator[tuple[str, str]]:
    """(database URL, reference study id): the uninterrupted run of _spec(), made once per database for every
    test here; each test runs its own study of the same spec in that database and stops it."""
    yield from reference_database(request.param, tmp_path_factory.mktemp("resume"), sqlite_template, _spec())


def _checkpointed_mid_run(db: Database, sid: str) -> Trial | None:
    """The running trial once a checkpoint of it is recorded and epochs remain to train."""
    rows = [t for t in trials_of(db, sid) if t.state == TrialState.RUNNING.value and t.checkpoint_epoch]
    return rows[0] if rows and rows[0].checkpoint_epoch < EPOCHS else None


def _kill_after_a_checkpoint(db: Database, settings: Settings, sid: str, procs: list[subprocess.Popen[bytes]],
                             tmp_path: Path, kill: str) -> Trial:
    """Start a worker on the study and SIGKILL its runner (`kill="runner"`) or the whole worker, with its
    orphaned runner gone too, once a checkpoint is recorded mid-run; the trial as it was then."""
    procs.append(start_worker(settings, tmp_path / "w0.log"))
    before = wait_until(lambda: _checkpointed_mid_run(db, sid), 120, "a checkpoint recorded mid-run")
    (runner,) = children_of(procs[0].pid)
    os.kill(procs[0].pid if kill == "worker" else runner, signal.SIGKILL)
    if kill == "worker":
        procs[0].wait(10)
        wait_until(lambda: not alive(runner), 10, "the orphaned runner to die")
    return before


def _assert_keeps_only_its_newest_checkpoint(settings: Settings, ended: Trial) -> None:
    """A completed trial (kept by the default keep_checkpoints, best_k) keeps its last checkpoint, that of its
    last epoch, written by its last attempt: on its row and on disk, and nothing else (no older epoch, not the
    first attempt's folder)."""
    assert settings.artifact_dir is not None
    assert ended.checkpoint_epoch == EPOCHS
    assert ended.checkpoint_path == f"{ended.study_id}/checkpoints/trial-{ended.number}-{ended.attempt}/" \
                                    f"epoch-{EPOCHS:06d}.safetensors"
    files = [p for p in (settings.artifact_dir / ended.study_id / "checkpoints").rglob("*") if p.is_file()]
    assert files == [settings.artifact_dir / ended.checkpoint_path]
    assert files[0].stat().st_size == ended.checkpoint_bytes


@pytest.mark.parametrize("kill", ["runner", "worker"])
def test_a_killed_trial_resumes_from_its_checkpoint_and_ends_as_if_never_killed(
        shared: tuple[str, str], tmp_path: Path, kill: str) -> None:
    """`runner`: the trial's process dies, its worker lives and puts it back in line; `worker`: the whole
    worker dies, the reaper of another worker process re-queues the trial, which resumes there."""
    db_url, reference_id = shared
    db, client, settings = resume_env(db_url, tmp_path)

    sid = create_study_via_api(client, _spec())
    with processes() as procs:
        before = _kill_after_a_checkpoint(db, settings, sid, procs, tmp_path, kill)
        if kill == "worker":
            procs.append(start_worker(settings, tmp_path / "w1.log"))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")

    resumed = only_trial(db, sid)
    assert before.attempt == 1 and resumed.attempt == 2, resumed.error
    assert resumed.number == before.number
    assert_same_trial_as(db, resumed, only_trial(db, reference_id), before.optuna_trial_id, EPOCHS)
    _assert_keeps_only_its_newest_checkpoint(settings, resumed)


def test_a_truncated_checkpoint_is_passed_over_with_the_reason_recorded(shared: tuple[str, str],
                                                                        tmp_path: Path) -> None:
    db_url, reference_id = shared
    db, client, settings = resume_env(db_url, tmp_path)

    sid = create_study_via_api(client, _spec())
    with processes() as procs:
        before = _kill_after_a_checkpoint(db, settings, sid, procs, tmp_path, "worker")
        recorded = only_trial(db, sid)  # the last one recorded before the kill
        assert settings.artifact_dir is not None and recorded.checkpoint_path is not None
        path = settings.artifact_dir / recorded.checkpoint_path
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        procs.append(start_worker(settings, tmp_path / "w1.log"))
        wait_until(lambda: study_status(db, sid) in ("completed", "failed"), 180, "the study to end")

    resumed = only_trial(db, sid)
    assert resumed.attempt == 2
    assert resumed.error is not None and \
        f"checkpoint of epoch {recorded.checkpoint_epoch} unusable (corrupt" in resumed.error, resumed.error
    assert resumed.unusable_checkpoints >= 1  # counted in /metrics (hpsearch_checkpoints_unusable)
    # An older checkpoint or none (from scratch): the same trial either way, each epoch recorded once.
    assert_same_trial_as(db, resumed, only_trial(db, reference_id), before.optuna_trial_id, EPOCHS)
    _assert_keeps_only_its_newest_checkpoint(settings, resumed)
