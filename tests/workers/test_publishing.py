"""A trial's weights take its name only while its lease is held: a runner whose lease was lost never publishes,
and never overwrites the weights of the attempt that took its place."""

from __future__ import annotations

import logging
import multiprocessing as mp
from datetime import timedelta

import torch
from safetensors.torch import load_file
from sqlalchemy import update

from app.core.config import Settings
from app.core.db import Database
from app.ml.artifacts import build_module, save_trial, trial_files
from app.models import Trial, TrialState
from app.models.base import utcnow
from app.schemas.study import StudySpec
from app.services import studies
from tests.factories import study_spec
from workers import attempt, leasing, reaper
from workers.prepared import PreparedStudies
from workers.publishing import final_stem, staged_stem
from workers.trainer import cpu_state

LOG = logging.LoggerAdapter(logging.getLogger("hpsearch.worker"), {})


def _slot(db: Database, settings: Settings, worker: str) -> attempt.Slot:
    return attempt.Slot(db, settings, worker, PreparedStudies(db, settings), mp.get_context("fork"), 1,
                        lambda: False)


def _trained(slot: attempt.Slot, lease: leasing.Lease, seed: int) -> dict[str, torch.Tensor]:
    """What a runner leaves when its attempt completes: the trial network's weights at the attempt's staging
    name. Each seed gives other weights, so the published file tells whose it is."""
    assert slot.settings.artifact_dir is not None
    spec = slot.studies.get(lease.study_id).model_spec(lease.params or {})
    torch.manual_seed(seed)
    state = cpu_state(build_module(spec))
    save_trial(staged_stem(slot.settings.artifact_dir, lease), state, spec, metrics={}, layers=[])
    return state


def _done(accuracy: float) -> attempt.Ending:
    return attempt.Ending(attempt.Outcome.COMPLETE, {"metrics": {"val_accuracy": accuracy, "val_loss": 1.0},
                                                      "epochs_run": 1, "best_epoch": 1, "stop_reason": "completed"})


def _row(db: Database, trial_id: int) -> Trial:
    with db.read_session() as session:
        row = session.get(Trial, trial_id)
        assert row is not None
        session.expunge(row)
        return row


def test_a_runner_whose_lease_was_reaped_never_gives_its_weights_the_trials_name(db: Database,
                                                                                 settings: Settings) -> None:
    spec = StudySpec.model_validate(study_spec(budget={"n_trials": 1, "max_attempts": 2}))
    sid = studies.create_study(db, settings, owner="alice", spec=spec)[0].id
    first_slot, second_slot = _slot(db, settings, "w1"), _slot(db, settings, "w2")
    p = first_slot.studies.get(sid)
    lease = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert lease is not None
    first = attempt.bind(first_slot, lease, p)
    assert first is not None and first.number is not None and settings.artifact_dir is not None
    final = final_stem(settings.artifact_dir, sid, first.number)
    late = trial_files(staged_stem(settings.artifact_dir, first))

    # The first runner finishes after its worker looked dead and the reaper put the trial back in line.
    _trained(first_slot, first, seed=1)
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == first.trial_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert [r.requeued for r in reaper.reap_and_tell(db, grace_s=5)] == [True]
    attempt.record(first_slot, _done(0.9), first, p, LOG)
    assert not any(path.exists() for path in trial_files(final))  # refused: no weights under the trial's name
    assert all(path.exists() for path in late)  # left at its staging name, for its supervisor to discard
    row = _row(db, first.trial_id)
    assert (row.state, row.artifact) == (TrialState.WAITING.value, None)

    # The retry holds its lease: its weights take the trial's name.
    retry = leasing.claim_trial(db, worker_id="w2", device="cpu", trial_deadline_s=600)
    assert retry is not None and retry.attempt == 2
    second = attempt.rebind(second_slot, retry, second_slot.studies.get(sid))
    assert second is not None
    kept = _trained(second_slot, second, seed=2)
    attempt.record(second_slot, _done(0.5), second, second_slot.studies.get(sid), LOG)
    row = _row(db, first.trial_id)
    assert (row.state, row.value, row.artifact) == (TrialState.COMPLETE.value, 0.5, str(final))
    weights, config = trial_files(final)
    assert config.exists()

    # The lost runner reports once more (a late Done): the retry's weights stay the trial's.
    attempt.record(first_slot, _done(0.9), first, p, LOG)
    published = load_file(weights)
    assert published.keys() == kept.keys()
    assert all(torch.equal(published[name], tensor) for name, tensor in kept.items())
    assert _row(db, first.trial_id).value == 0.5
