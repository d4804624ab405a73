"""Storing app.lifecycle's verdicts on trial rows, inside the caller's transaction: the API's cancel and the
workers' leases, retries and closing write a trial's fate here, and each returns what Optuna must be told."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app import lifecycle
from app.lifecycle import Fate, OptunaTell, TrialFacts, Verdict
from app.models import Study, StudyStatus, Trial, TrialEpoch, TrialState
from app.schemas.scheduler import PbtConfig
from app.schemas.study import StudySpec


def facts_of(trial: Trial) -> TrialFacts:
    return TrialFacts(configured=trial.number is not None or trial.params is not None,
                      began=trial.optuna_trial_id is not None, attempt=trial.attempt,
                      checkpointed=trial.checkpoint_path is not None)


def has_ended(study: Study | None) -> bool:
    """A study that is gone or has ended: none of its trials may run again."""
    return study is None or StudyStatus(study.status).is_finished()


def apply_in_tx(session: Session, trial: Trial, verdict: Verdict, now: datetime) -> list[OptunaTell]:
    """Store `verdict` on `trial`; returns what Optuna must be told: the row's Optuna trial is over, except
    when the trial continues from its checkpoint (a resume, or a checkpointed hand-back or pause), on the
    same one."""
    parks = verdict.fate in (Fate.HAND_BACK, Fate.PAUSE)
    continues = verdict.fate is Fate.RESUME or (parks and trial.checkpoint_path is not None)
    # A pause a client asked for is carried out wherever the trial stops: it waits paused, not in line.
    paused = verdict.fate is Fate.PAUSE or trial.pause_requested_at is not None
    trial.pause_requested_at = None
    if trial.epochs_target is not None and verdict.fate not in (Fate.RESUME, Fate.HAND_BACK, Fate.PAUSE):
        end_extension_in_tx(session, trial, verdict.error or "ended", now)
        return []
    if verdict.fate is Fate.PRUNE:
        return _prune_paused(session, trial, verdict, now)
    tells = [] if continues else lifecycle.fail_all([trial.optuna_trial_id])
    if verdict.fate is Fate.DROP:
        session.delete(trial)
        return tells
    if verdict.fate in (Fate.RETRY, Fate.RESUME, Fate.HAND_BACK, Fate.PAUSE):
        trial.state = (TrialState.PAUSED if paused else TrialState.WAITING).value
        trial.worker_id = trial.device = trial.heartbeat_at = trial.deadline_at = None
        before = trial.attempt
        if not parks:
            trial.attempt += 1
            trial.error, trial.failure = verdict.error, (verdict.failure.value if verdict.failure else None)
        if continues:
            _keep_curve_to_checkpoint(session, trial, before)
            if verdict.fate is Fate.RESUME and not paused:
                return _park_at_scheduler_pause(session, trial)
        elif verdict.fate is Fate.RETRY:  # starts over: a checkpoint of an attempt that failed is no start
            trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None
        else:  # same attempt number: a shutdown is not the trial's failure, and this slot no longer holds it
            session.execute(delete(TrialEpoch).where(TrialEpoch.trial_id == trial.id,
                                                     TrialEpoch.attempt == trial.attempt))
        return tells
    trial.state = TrialState.FAIL.value
    trial.error, trial.failure = verdict.error, (verdict.failure.value if verdict.failure else None)
    trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None  # a failed trial keeps none
    trial.finished_at = now
    trial.duration_s = (now - trial.started_at).total_seconds() if trial.started_at else None
    return tells


def _park_at_scheduler_pause(session: Session, trial: Trial) -> list[OptunaTell]:
    """A trial that died with its checkpoint at its scheduler's pause (an ASHA rung, a PBT boundary), before
    the pause was recorded, waits paused there, as its runner would have left it: resumed in line, it would
    train past the rung without the scheduler's decision. Optuna hears it as a pause tells it."""
    study = session.get(Study, trial.study_id)
    if study is None or trial.epochs_target is not None or trial.checkpoint_epoch is None:
        return []
    spec = study.config
    if trial.checkpoint_epoch not in spec.scheduler_pauses():
        return []
    trial.state = TrialState.PAUSED.value
    return park_at_rung_in_tx(trial, trial.checkpoint_epoch, spec)


def park_at_rung_in_tx(trial: Trial, rung: int, spec: StudySpec) -> list[OptunaTell]:
    """A trial paused with its checkpoint waits at its scheduler's rung (an ASHA rung, a PBT boundary). ASHA's
    Optuna trial ends PRUNED there at once, so the sampler learns from it (a promotion continues on a fresh
    one); a PBT member runs on as one Optuna trial."""
    trial.rung = rung
    if trial.optuna_trial_id is None or isinstance(spec.scheduler, PbtConfig):
        return []
    return [OptunaTell(trial.optuna_trial_id, TrialState.PRUNED)]


def _prune_paused(session: Session, trial: Trial, verdict: Verdict, now: datetime) -> list[OptunaTell]:
    """A paused trial whose study ended: PRUNED with its last recorded epoch's value, as a pruner leaves one;
    its checkpoint goes (the caller deletes the files). Optuna's trial ends PRUNED with that value; one that
    the pause already ended (no checkpoint: a resume would have started over) stays as it is."""
    last = session.execute(select(TrialEpoch.epoch, TrialEpoch.val_metric).where(
        TrialEpoch.trial_id == trial.id, TrialEpoch.attempt == trial.attempt)
        .order_by(TrialEpoch.epoch.desc()).limit(1)).first()
    continued = trial.checkpoint_path is not None
    trial.state = TrialState.PRUNED.value
    trial.value = last.val_metric if last is not None else None
    trial.epochs_run = last.epoch if last is not None else 0
    trial.error, trial.failure = verdict.error, None
    if trial.rung is not None:
        trial.error = f"paused at rung {trial.rung} by the scheduler, not promoted before the study ended"
        trial.rung = None
    trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None
    trial.finished_at = now
    if trial.optuna_trial_id is None or not continued:
        return []
    values = [trial.value] if trial.value is not None else None
    return [OptunaTell(trial.optuna_trial_id, TrialState.PRUNED, values)]


def end_extension_in_tx(session: Session, trial: Trial, reason: str, now: datetime) -> None:
    """An extension that did not complete (it failed, or its study ended first) leaves the trial complete as
    it was: its result, weights and Optuna trial were never replaced; the epochs the extension recorded go,
    and so does a checkpoint newer than the result (the next extension starts from the result again)."""
    trial.state = TrialState.COMPLETE.value
    trial.epochs_target = None
    trial.worker_id = trial.device = trial.heartbeat_at = trial.deadline_at = None
    trial.error = f"extension ended without completing: {reason}"[:2000]
    trial.finished_at = trial.finished_at or now
    session.execute(delete(TrialEpoch).where(TrialEpoch.trial_id == trial.id,
                                             TrialEpoch.epoch > (trial.epochs_run or 0)))
    if trial.checkpoint_epoch is not None and trial.checkpoint_epoch > (trial.epochs_run or 0):
        trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None


def _keep_curve_to_checkpoint(session: Session, trial: Trial, attempt: int) -> None:
    """A trial that continues from its checkpoint keeps one curve: attempt `attempt`'s epochs up to the
    checkpoint move to the trial's current attempt; those after it go, the resumed run records them again."""
    epochs = (TrialEpoch.trial_id == trial.id) & (TrialEpoch.attempt == attempt)
    session.execute(delete(TrialEpoch).where(epochs, TrialEpoch.epoch > (trial.checkpoint_epoch or 0)))
    if trial.attempt != attempt:
        session.execute(update(TrialEpoch).where(epochs).values(attempt=trial.attempt))


def remove_checkpoints(artifact_dir: Path, paths: Iterable[str]) -> None:
    """Delete the checkpoint folders of recorded checkpoints (paths relative to the artifact dir) that no trial
    keeps any more; after the commit that let go of them."""
    for path in paths:
        shutil.rmtree((artifact_dir / path).parent, ignore_errors=True)


def end_waiting_in_tx(session: Session, study_id: str, end: StudyStatus, now: datetime,
                      drop_checkpoint: Callable[[str], None] | None = None) -> list[OptunaTell]:
    """The study has just ended `end`: each trial still waiting is dropped or ends FAIL, each paused one that
    ran ends PRUNED (app.lifecycle's one rule for every end), its earlier error kept in the message.
    `drop_checkpoint(path)` hears each checkpoint those trials no longer keep (the caller deletes it once
    committed)."""
    tells: list[OptunaTell] = []
    for trial in session.scalars(select(Trial).where(
            Trial.study_id == study_id, Trial.state.in_([TrialState.WAITING.value, TrialState.PAUSED.value]))).all():
        verdict = lifecycle.waiting_at_end(facts_of(trial), end, paused=trial.state == TrialState.PAUSED.value)
        if verdict.error and trial.error:
            verdict = lifecycle.Verdict(verdict.fate, f"{verdict.error} ({trial.error})", verdict.failure)
        held = trial.checkpoint_path
        tells += apply_in_tx(session, trial, verdict, now)
        if held is not None and drop_checkpoint is not None and trial.checkpoint_path != held:
            drop_checkpoint(held)  # not a complete trial's whose extension never ran: that one keeps it
    return tells
