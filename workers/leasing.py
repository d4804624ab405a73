"""Trial leases in SQL: claim, bind to an Optuna trial, retry in place, record epochs, finish, hand back and
renew.

Claims lock the study row (PostgreSQL `FOR UPDATE SKIP LOCKED`) or the whole database (SQLite
`BEGIN IMMEDIATE`), so limits hold across any number of workers: never more than n_trials
running+finished+waiting, never more than max_parallel running, never two workers on one trial. Every
writer that locks a study and its trials locks the study first. What each change means for the study (the
budget, stop criteria, retry or fail) is decided by app.lifecycle; this module stores it.

Every public function is one short transaction that is safe to repeat, and repeats itself with backoff
when the connection drops (`@retrying`): a killed connection or a busy database costs a retry, not a trial.

A trial's row names the checkpoint it holds, and its bytes: a running trial's latest, within its owner's
checkpoint quota (`record_checkpoint`); at its end, a completed trial's as long as the study's
keep_checkpoints keeps it, pruned and failed trials' none (`finish_trial`). The files follow the rows after
the commit (`workers.checkpoint_sweep`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app import lifecycle
from app.core.db import Database, retrying
from app.lifecycle import OptunaTell
from app.models import FailureKind, Study, StudyStatus, Trial, TrialEpoch, TrialState, Worker
from app.models.base import utcnow
from app.models.tables import FINISHED_TRIAL_STATES
from app.schemas.scheduler import PbtConfig
from app.schemas.study import StudySpec
from app.services.fates import apply_in_tx, end_extension_in_tx, facts_of, has_ended, park_at_rung_in_tx
from workers import population, scheduling

FINALIZE_LEASE_S = 120.0  # renewed by the finalizing worker's heartbeat; a dead one's job is free after this
CANDIDATES = 200  # studies a claim looks at, oldest first, among those that can take what it claims


@dataclass(frozen=True)
class Lease:
    trial_id: int
    study_id: str
    worker_id: str
    attempt: int
    number: int | None
    optuna_trial_id: int | None
    params: dict[str, Any] | None
    source: str
    checkpoint: str | None = None  # to resume from: the recorded checkpoint, relative to the artifact dir
    checkpoint_epoch: int | None = None
    epochs_target: int | None = None  # an extension's: the epoch a completed trial continues to
    promoted_from: int | None = None  # a promotion's: the rung its scheduler resumes it from
    schedule: list[dict[str, Any]] | None = None  # a PBT member's hyperparameter schedule (params: in force)

    @property
    def resumes(self) -> bool:
        """Whether this attempt continues its trial from a checkpoint, on the trial's Optuna trial."""
        return self.checkpoint is not None and self.optuna_trial_id is not None

    @property
    def extends(self) -> bool:
        """Whether this attempt extends a completed trial: its Optuna trial is over and is not reported to."""
        return self.epochs_target is not None


# ---- the study's side, read under its lock ------------------------------------------------------------------


def counts_in_tx(session: Session, study_id: str) -> lifecycle.Counts:
    """The study's trials by state, in one grouped query: waiting ones apart from extensions, and how many of
    the paused its scheduler parked at a rung."""
    extension, at_rung = Trial.epochs_target.is_not(None).label("extension"), Trial.rung.is_not(None).label("at_rung")
    rows = session.execute(select(Trial.state, extension, at_rung, func.count()).where(Trial.study_id == study_id)
                           .group_by(Trial.state, extension, at_rung)).all()

    def count(state: TrialState, *, extends: bool | None = None, rung: bool | None = None) -> int:
        return sum(n for s, e, r, n in rows if s == state.value and extends in (None, bool(e))
                   and rung in (None, bool(r)))

    waiting = TrialState.WAITING
    return lifecycle.Counts(count(waiting, extends=False), count(TrialState.RUNNING),
                            sum(count(s) for s in TrialState if s.is_finished()), count(TrialState.PAUSED),
                            count(waiting, extends=True), count(TrialState.PAUSED, rung=True))


def scheduled_counts_in_tx(session: Session, study: Study) -> tuple[lifecycle.Counts, int | None]:
    """The study's counts, knowing whether its scheduler promotes a paused trial now (and which number)."""
    counts = counts_in_tx(session, study.id)
    if not counts.at_rungs or counts.running >= study.max_parallel:
        return counts, None
    idle = counts.started >= study.n_trials and not (counts.running or counts.waiting or counts.extensions)
    promote = scheduling.promotion_in_tx(session, study, idle=idle)
    return dataclasses.replace(counts, promotable=promote is not None), promote


def budget_of(study: Study) -> lifecycle.Budget:
    return lifecycle.Budget(study.n_trials, study.max_parallel, study.deadline_at, study.stop_requested_at,
                            study.stop_reason)


def lock_study_in_tx(session: Session, db: Database, study_id: str) -> Study | None:
    """Lock a study to claim from it; None when another claim holds it (PostgreSQL skips it)."""
    stmt = select(Study).where(Study.id == study_id)
    if not db.is_sqlite:
        stmt = stmt.with_for_update(skip_locked=True)
    return session.scalars(stmt).first()


def share_study_in_tx(session: Session, study_id: str) -> Study | None:
    """Lock a study against a status change while one of its trials changes (FOR SHARE): a cancel either
    sees the change or the change sees the cancel."""
    return session.scalars(select(Study).where(Study.id == study_id).with_for_update(read=True)).first()


def trials_in(*where: Any) -> Any:
    """A correlated count of the candidate study's trials (those matching `where`, or all)."""
    return select(func.count()).select_from(Trial).where(Trial.study_id == Study.id, *where).scalar_subquery()


def in_state(state: TrialState) -> Any:
    return Trial.state == state.value


def finished_trials() -> Any:
    return trials_in(Trial.state.in_(FINISHED_TRIAL_STATES))


def paused_at_rungs() -> Any:
    """A correlated count of the candidate study's trials its scheduler paused at a rung."""
    return trials_in(in_state(TrialState.PAUSED), Trial.rung.is_not(None))


def waiting_extensions() -> Any:
    """A correlated count of the candidate study's completed trials waiting to be extended."""
    return trials_in(in_state(TrialState.WAITING), Trial.epochs_target.is_not(None))


# ---- claims --------------------------------------------------------------------------------------------------


def _candidate_study_ids(session: Session, statuses: tuple[str, ...], now: datetime) -> list[str]:
    """Studies that can start a trial now, oldest first: full ones are filtered out in SQL, so a page of
    busy old studies never hides a newer one with room (the lock and app.lifecycle.next_trial decide)."""
    running, waiting = trials_in(in_state(TrialState.RUNNING)), trials_in(in_state(TrialState.WAITING))
    within_budget = Study.stop_requested_at.is_(None) & (Study.deadline_at.is_(None) | (Study.deadline_at > now)) \
        & (finished_trials() < Study.n_trials) \
        & ((waiting > 0) | (trials_in() < Study.n_trials) | (paused_at_rungs() > 0))
    return list(session.scalars(select(Study.id).where(
        Study.status.in_(statuses), running < Study.max_parallel, within_budget | (waiting_extensions() > 0))
        .order_by(Study.created_at, Study.id).limit(CANDIDATES)))


@retrying
def claim_trial(db: Database, *, worker_id: str, device: str, trial_deadline_s: float,
                can_run: Callable[[StudySpec], bool] | None = None, artifact_dir: Path | None = None) -> Lease | None:
    """Lease the next trial of the oldest study with room: a waiting one first, else a new slot.

    can_run(spec) False skips a study this worker cannot run (it lacks the study's plugins). `artifact_dir`:
    where PBT's exploit links checkpoints (None: its members keep their own).
    """
    with db.session() as session:
        candidates = _candidate_study_ids(session, (StudyStatus.QUEUED.value, StudyStatus.RUNNING.value), utcnow())
        for study_id in candidates:
            study = lock_study_in_tx(session, db, study_id)
            if study is None or not StudyStatus(study.status).accepts_trials():
                continue
            if can_run is not None and not can_run(study.config):
                continue
            lease = _lease_next_in_tx(session, study, worker_id, device, trial_deadline_s, artifact_dir)
            if lease is not None:
                return lease
    return None


@retrying
def claim_trials(db: Database, *, worker_id: str, device: str, trial_deadline_s: float, study_id: str,
                 limit: int, artifact_dir: Path | None = None) -> list[Lease]:
    """Lease up to `limit` more trials of one study, within its max_parallel and n_trials (a fused group).

    Waiting trials first (in id order), then new slots; none when the study no longer accepts trials.
    """
    out: list[Lease] = []
    with db.session() as session:
        study = lock_study_in_tx(session, db, study_id)
        if study is None or not StudyStatus(study.status).accepts_trials():
            return out
        while len(out) < limit:
            lease = _lease_next_in_tx(session, study, worker_id, device, trial_deadline_s, artifact_dir)
            if lease is None:
                break
            out.append(lease)
    return out


def _lease_next_in_tx(session: Session, study: Study, worker_id: str, device: str,
                      trial_deadline_s: float, artifact_dir: Path | None = None) -> Lease | None:
    """Lease the study's next trial if its limits allow; the caller holds the study's lock."""
    now = utcnow()  # after the lock: a stamp older than its commit by a lock wait would hide the event
    counts, promote = scheduled_counts_in_tx(session, study)
    which = lifecycle.next_trial(budget_of(study), counts, now)
    if which is None:
        return None
    promoted_from = None
    if which is lifecycle.NextTrial.PROMOTION:
        trial = session.scalars(select(Trial).where(Trial.study_id == study.id, Trial.number == promote)).one()
        if isinstance(study.config.scheduler, PbtConfig):  # a generation's members continue on their Optuna trials
            population.start_generation_in_tx(session, study, artifact_dir)
        else:
            promoted_from, trial.rung = trial.rung, None
    elif which is not lifecycle.NextTrial.NEW_SLOT:
        extension = Trial.epochs_target.is_not(None)
        trial = session.scalars(select(Trial).where(
            Trial.study_id == study.id, Trial.state == TrialState.WAITING.value,
            extension if which is lifecycle.NextTrial.EXTENSION else ~extension).order_by(Trial.id).limit(1)).one()
    else:
        trial = Trial(study_id=study.id, state=TrialState.RUNNING.value, attempt=1)
        session.add(trial)
    trial.state = TrialState.RUNNING.value
    trial.worker_id, trial.device = worker_id, device
    trial.started_at = trial.heartbeat_at = now
    trial.deadline_at = now + timedelta(seconds=study.config.trial_timeout_s(trial_deadline_s))
    trial.error = trial.failure = None
    status = lifecycle.after_claim(StudyStatus(study.status))
    if status.value != study.status:
        study.status = status.value
        study.started_at = study.started_at or now
        timeout_s = study.config.budget.timeout_s
        study.deadline_at = now + timedelta(seconds=timeout_s) if timeout_s else None
    session.flush()
    return Lease(trial.id, study.id, worker_id, trial.attempt, trial.number, trial.optuna_trial_id,
                 population.params_in_force(trial), trial.source, trial.checkpoint_path, trial.checkpoint_epoch,
                 trial.epochs_target, promoted_from, trial.schedule)


# ---- a held lease --------------------------------------------------------------------------------------------


def held_in_tx(session: Session, lease: Lease) -> Trial | None:
    """The leased row if this lease still holds it (not reaped, re-queued, cancelled or deleted)."""
    trial = session.get(Trial, lease.trial_id, with_for_update=True)
    if trial is None or trial.state != TrialState.RUNNING.value or trial.worker_id != lease.worker_id \
            or trial.attempt != lease.attempt:
        return None
    return trial


def _bindable_in_tx(session: Session, lease: Lease) -> Trial | None:
    """The leased row, if it may take an Optuna trial now. A study that ended since the claim ends the row
    here (study first, then the trial, as every writer locks them), so no Optuna trial asked during a cancel
    is bound to a study that is over: the caller fails it in Optuna."""
    study = share_study_in_tx(session, lease.study_id)
    trial = held_in_tx(session, lease) if study is not None else None
    if trial is None:
        return None
    if has_ended(study):
        apply_in_tx(session, trial, lifecycle.when_study_ended(facts_of(trial), "stopped: the study ended"),
                    utcnow())
        return None
    return trial


@retrying
def bind_trial(db: Database, lease: Lease, *, number: int, optuna_trial_id: int,
               params: dict[str, Any]) -> Lease | None:
    """Record the Optuna trial a new lease got its parameters from; None when the lease was lost meanwhile or
    the study ended (the caller fails that Optuna trial)."""
    with db.session() as session:
        trial = _bindable_in_tx(session, lease)
        if trial is None:
            return None
        trial.number, trial.optuna_trial_id, trial.params = number, optuna_trial_id, params
    return dataclasses.replace(lease, number=number, optuna_trial_id=optuna_trial_id, params=params)


@retrying
def rebind_trial(db: Database, lease: Lease, *, optuna_trial_id: int) -> Lease | None:
    """Point a re-run's row at its fresh Optuna trial; the row keeps its number, parameters and attempts.
    None when the lease was lost meanwhile or the study ended (the caller fails that Optuna trial)."""
    with db.session() as session:
        trial = _bindable_in_tx(session, lease)
        if trial is None:
            return None
        trial.optuna_trial_id = optuna_trial_id
    return dataclasses.replace(lease, optuna_trial_id=optuna_trial_id)


@retrying
def retry_in_place(db: Database, lease: Lease, *, params: dict[str, Any], note: str) -> Lease | None:
    """Start the held trial's next attempt on this same lease with changed parameters (an out-of-memory retry
    at a smaller batch); `note` stands as its error until it ends. The attempt starts now, with the whole time
    an attempt has, as a claimed one does. None when the lease was lost meanwhile. The returned lease still
    names the last attempt's Optuna trial: the caller rebinds it to a fresh one (`rebind_trial`)."""
    with db.session() as session:
        study = share_study_in_tx(session, lease.study_id)
        trial = held_in_tx(session, lease) if study is not None else None
        if trial is None:
            return None
        now = utcnow()
        if trial.deadline_at is not None and trial.started_at is not None:
            trial.deadline_at = now + (trial.deadline_at - trial.started_at)
        trial.started_at = trial.heartbeat_at = now
        trial.attempt += 1
        trial.params = params
        trial.error, trial.failure = note, FailureKind.OUT_OF_MEMORY.value
        # Another batch size trains afresh: a checkpoint of the old one would resume a loop these params never ran.
        trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None
    return Lease(lease.trial_id, lease.study_id, lease.worker_id, lease.attempt + 1, lease.number,
                 lease.optuna_trial_id, params, lease.source)


class EpochStatus(enum.StrEnum):
    """What recording an epoch found out about the trial."""

    OK = "ok"
    LOST = "lost"  # the lease is gone (reaped, re-queued, study deleted): drop the attempt's result
    STOP = "stop"  # the study no longer runs this trial (cancelled, or a stop criterion that cancels)
    PAUSE = "pause"  # a client asked to pause the trial: checkpoint it at the next epoch boundary


@retrying
def record_epoch(db: Database, lease: Lease, *, epoch: int, train_loss: float | None, val_loss: float | None,
                 val_metric: float | None, learning_rate: float | None, seconds: float | None) -> EpochStatus:
    """Store one curve point and renew the lease."""
    with db.session() as session:
        trial = held_in_tx(session, lease)
        if trial is None:
            return EpochStatus.LOST
        trial.heartbeat_at = utcnow()
        session.merge(TrialEpoch(trial_id=lease.trial_id, attempt=lease.attempt, epoch=epoch,
                                 train_loss=train_loss, val_loss=val_loss, val_metric=val_metric,
                                 learning_rate=learning_rate, seconds=seconds))
        study = session.get(Study, lease.study_id)
        assert study is not None  # the trial row cascades with it
        goes_on = lifecycle.keeps_running(StudyStatus(study.status), budget_of(study), utcnow(),
                                          cancels_running=study.config.cancels_running_trials)
        if not goes_on:
            return EpochStatus.STOP
        return EpochStatus.OK if trial.pause_requested_at is None else EpochStatus.PAUSE


@dataclass(frozen=True)
class CheckpointRecord:
    """What recording a checkpoint did. `held`: the lease still holds (else nothing was recorded); `refused`:
    why the checkpoint was not recorded although the lease holds (it would take the trial's owner past the
    checkpoint quota): the caller fails the trial for good."""

    held: bool
    refused: str | None = None

    @property
    def recorded(self) -> bool:
        return self.held and self.refused is None


@retrying
def record_checkpoint(db: Database, lease: Lease, *, path: str, epoch: int, size: int,
                      quota_bytes: int = 0) -> CheckpointRecord:
    """Record the trial's latest checkpoint, already on disk (`path` relative to the artifact dir), and renew
    the lease.

    With a quota (`quota_bytes` > 0), the checkpoint is refused when the bytes the owner's trial rows would then
    hold together (this trial's new file replacing the one its row names) go beyond it. Checks of one owner
    run one at a time (SQLite: every write does), so concurrent trials cannot pass it together.
    """
    with db.session() as session:
        owner = _lock_owner_quota_in_tx(session, db, lease.study_id) if quota_bytes > 0 else None
        trial = held_in_tx(session, lease)
        if trial is None:
            return CheckpointRecord(held=False)
        trial.heartbeat_at = utcnow()
        if owner is not None:
            refused = _over_quota_in_tx(session, owner, trial, size, quota_bytes)
            if refused is not None:
                return CheckpointRecord(held=True, refused=refused)
        trial.checkpoint_path, trial.checkpoint_epoch, trial.checkpoint_bytes = path, epoch, size
        return CheckpointRecord(held=True)


def _lock_owner_quota_in_tx(session: Session, db: Database, study_id: str) -> str | None:
    """The study's owner, holding the owner's quota lock until the commit (PostgreSQL: an advisory lock keyed by
    the owner; SQLite: writes are serialized already). None when the study is gone."""
    owner = session.scalar(select(Study.owner).where(Study.id == study_id))
    if owner is not None and not db.is_sqlite:
        key = int.from_bytes(hashlib.sha256(f"checkpoint-quota:{owner}".encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    return owner


def _over_quota_in_tx(session: Session, owner: str, trial: Trial, size: int, quota_bytes: int) -> str | None:
    """Why a checkpoint of `size` bytes would take the owner past the quota, or None when it fits."""
    held = session.scalar(select(func.coalesce(func.sum(Trial.checkpoint_bytes), 0))
                          .join(Study, Study.id == Trial.study_id).where(Study.owner == owner)) or 0
    total = held - (trial.checkpoint_bytes or 0) + size
    if total <= quota_bytes:
        return None
    return (f"checkpoint quota exceeded: owner {owner} would hold {human_bytes(total)} of checkpoints, "
            f"HPSEARCH_CHECKPOINT_QUOTA_MB allows {human_bytes(quota_bytes)}")


def human_bytes(n: int) -> str:
    """Bytes in decimal units, as the quota counts them: 4.4 MB, 1.2 GB."""
    value, unit = float(n), 0
    units = ("B", "kB", "MB", "GB", "TB")
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.{1 if value < 10 else 0}f} {units[unit]}"


@retrying
def note_trial(db: Database, lease: Lease, note: str, *, unusable_checkpoints: int = 0) -> bool:
    """Record why a held trial did not go as planned (a checkpoint it could not resume from) in its error
    field; an outcome without an error of its own keeps it. `unusable_checkpoints`: how many checkpoints it
    passed over, added to the trial's count. False when the lease no longer holds."""
    with db.session() as session:
        trial = held_in_tx(session, lease)
        if trial is None:
            return False
        trial.error = note[:2000]
        trial.unusable_checkpoints = (trial.unusable_checkpoints or 0) + unusable_checkpoints
        return True


def trial_ended(db: Database, trial_id: int) -> bool:
    """Whether the trial ended for good (or is gone): nothing will resume it."""
    with db.read_session() as session:
        state = session.scalar(select(Trial.state).where(Trial.id == trial_id))
    return state is None or TrialState(state).is_finished()


@dataclass(frozen=True)
class Finished:
    """A recorded outcome; stop_reason names the stop criterion it made fire, if any."""

    stop_reason: str | None


@retrying
def finish_trial(db: Database, lease: Lease, *, state: TrialState, value: float | None = None,
                 values: list[float] | None = None, metrics: dict[str, float] | None = None,
                 error: str | None = None, failure: FailureKind | None = None, epochs_run: int | None = None,
                 best_epoch: int | None = None, artifact: str | None = None,
                 while_held: Callable[[], None] | None = None) -> Finished | None:
    """Record an attempt's outcome and check the study's stop criteria, in one transaction.

    None (and nothing written) when the lease was lost meanwhile. `while_held` runs once the lease is known
    to hold, before the commit: a complete trial's weights take its name there, so no reaper can take the
    lease between publishing and recording, and no finalization sees the row without its weights.

    A complete trial's row keeps naming its newest checkpoint if the study's keep_checkpoints keeps it, and
    the completed trials it pushes out of the best k lose theirs (`_keep_checkpoints_in_tx`); a pruned or
    failed trial keeps none. Their files go after the commit (`workers.checkpoint_sweep`).
    """
    with db.session() as session:
        # The study first, as every writer that locks both does: deleting a study locks it, then its trials.
        study = session.get(Study, lease.study_id, with_for_update=True)
        now = utcnow()  # after the lock, so the stamp is no older than the commit by a lock wait
        trial = held_in_tx(session, lease) if study is not None else None
        if trial is None:
            # A retry after a commit whose reply was lost finds its own outcome already there.
            return Finished(None) if _finished_by_in_tx(session, lease, state, error) else None
        if trial.epochs_target is not None and state is not TrialState.COMPLETE:
            end_extension_in_tx(session, trial, error or state.value, now)
            return Finished(None)
        if while_held is not None:
            while_held()
        trial.state = state.value
        trial.epochs_target = None
        trial.value, trial.values, trial.metrics = value, values, metrics
        trial.error = error if error is not None else trial.error  # a note of this attempt stays
        trial.failure = failure.value if failure is not None else None
        trial.epochs_run, trial.best_epoch, trial.artifact = epochs_run, best_epoch, artifact
        trial.pause_requested_at = None  # ended before it could pause
        trial.finished_at = now
        trial.duration_s = (now - trial.started_at).total_seconds() if trial.started_at else None
        assert study is not None
        if state is TrialState.COMPLETE and trial.checkpoint_path is not None:
            _keep_checkpoints_in_tx(session, study, trial)
        else:
            trial.checkpoint_path = trial.checkpoint_epoch = trial.checkpoint_bytes = None  # its files go
        session.flush()
        return Finished(_apply_stop_criteria_in_tx(session, study, now))


def _keep_checkpoints_in_tx(session: Session, study: Study, trial: Trial) -> None:
    """`trial` has just completed holding a checkpoint (its newest: the runner records the last one before it
    says Done). Apply the study's keep_checkpoints (`workers.checkpoints.retention`) and clear the checkpoint
    of each completed trial that keeps none now, this one included. Only best_k weighs completed trials
    against each other: under all and none the others keep what they hold. The caller holds the study's
    lock, so completions of one study are ranked one at a time."""
    from workers.checkpoints.files import CheckpointFile  # torch: workers only, never the API's reaper
    from workers.checkpoints.retention import KeepCheckpoints, TrialCheckpoints, TrialPhase, retained, retention_of

    retention = retention_of(study.config)
    holders = [trial]
    if retention.policy is KeepCheckpoints.BEST_K:
        holders += session.scalars(select(Trial).where(
            Trial.study_id == study.id, Trial.state == TrialState.COMPLETE.value, Trial.id != trial.id,
            Trial.number.is_not(None), Trial.checkpoint_path.is_not(None))).all()
    by_number = {t.number: t for t in holders}
    kept = retained([TrialCheckpoints(
        trial=number, phase=TrialPhase.COMPLETED, recorded_epoch=t.checkpoint_epoch, value=t.value,
        files=[CheckpointFile(Path(t.checkpoint_path or ""), t.checkpoint_epoch or 0, t.checkpoint_bytes or 0)])
        for number, t in by_number.items() if number is not None], retention)
    for number, t in by_number.items():
        if number not in kept:
            t.checkpoint_path = t.checkpoint_epoch = t.checkpoint_bytes = None


def _finished_by_in_tx(session: Session, lease: Lease, state: TrialState, error: str | None) -> bool:
    """True when this lease's own outcome is already recorded (and not, say, a reaper's verdict)."""
    trial = session.get(Trial, lease.trial_id)
    return trial is not None and trial.state == state.value and (error is None or trial.error == error) \
        and trial.worker_id == lease.worker_id and trial.attempt == lease.attempt


def _apply_stop_criteria_in_tx(session: Session, study: Study, now: datetime) -> str | None:
    """After a trial finished: when a stop criterion fires, no new trial starts and the study is finalized.
    Returns the criterion that fired now."""
    stop = study.config.stop
    if study.stop_requested_at is not None or stop is None:
        return None
    rows = session.execute(select(Trial.state, Trial.value).where(
        Trial.study_id == study.id, Trial.state.in_(FINISHED_TRIAL_STATES))
        .order_by(Trial.finished_at, Trial.id)).all()
    outcomes = [value if state == TrialState.COMPLETE.value else None for state, value in rows]
    reason = lifecycle.stop_reason(outcomes, maximize=study.config.maximize, stop=stop)
    if reason is not None:
        study.stop_requested_at, study.stop_reason = now, reason
    return reason


@retrying
def link_optuna_trial(db: Database, trial_id: int, *, optuna_trial_id: int) -> None:
    """Point a completed trial's row at the Optuna trial that records its extended result."""
    with db.session() as session:
        session.execute(update(Trial).where(Trial.id == trial_id, Trial.state == TrialState.COMPLETE.value)
                        .values(optuna_trial_id=optuna_trial_id))


@retrying
def release_trial(db: Database, lease: Lease) -> list[OptunaTell] | None:
    """Hand a running trial back for another worker without counting an attempt (graceful shutdown).

    None when the lease no longer held; else what Optuna must be told (the row's Optuna trial is over either
    way: a re-run gets a fresh one), read from the row, which may be bound although `lease` is not.
    """
    with db.session() as session:
        study = share_study_in_tx(session, lease.study_id)
        trial = held_in_tx(session, lease) if study is not None else None
        if trial is None:
            return None
        verdict = lifecycle.after_hand_back(facts_of(trial), study_ended=has_ended(study))
        return apply_in_tx(session, trial, verdict, utcnow())


@retrying
def pause_trial(db: Database, lease: Lease, *, rung: int | None = None) -> list[OptunaTell] | None:
    """Park a running trial that stopped at an epoch boundary for a client's pause: it waits `paused` under
    the same attempt, with the checkpoint recorded at that boundary, until a client resumes it.

    None when the lease no longer held; else what Optuna must be told (nothing while it has a checkpoint: it
    continues on its Optuna trial; without one, that trial is over and a resume starts afresh).
    """
    with db.session() as session:
        study = share_study_in_tx(session, lease.study_id)
        trial = held_in_tx(session, lease) if study is not None else None
        if trial is None:
            return None
        verdict = lifecycle.after_pause(facts_of(trial), study_ended=has_ended(study))
        tells = apply_in_tx(session, trial, verdict, utcnow())
        if rung is None or trial.state != TrialState.PAUSED.value:
            return tells
        if tells:  # no checkpoint: its Optuna trial was failed already
            trial.rung = rung
            return tells
        return park_at_rung_in_tx(trial, rung, study.config)  # paused by its scheduler


@retrying
def renew_leases(db: Database, *, worker_id: str, trial_ids: list[int], finalizing: Collection[str] = ()) -> None:
    """Heartbeat for this worker, every trial it still runs and every study it is finalizing.

    A worker the reaper took for dead (frozen, or cut off longer than the grace period) shows as alive again.
    """
    now = utcnow()
    with db.session() as session:
        session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now, stopped_at=None))
        if finalizing:
            session.execute(update(Study).where(Study.id.in_(finalizing), Study.finalize_worker == worker_id)
                            .values(finalize_until=now + timedelta(seconds=FINALIZE_LEASE_S)))
        if trial_ids:
            session.execute(update(Trial).where(Trial.id.in_(trial_ids), Trial.worker_id == worker_id,
                                                Trial.state == TrialState.RUNNING.value).values(heartbeat_at=now))
