"""One attempt of a trial, seen from its supervisor: bind it to an Optuna trial, fork its runner, relay the
runner's messages (record each epoch, ask the pruner, answer go or stop), then record how it ended. The
same loop (`supervise`) follows a fused runner, trial by trial (`workers.group`).

Every outcome is recorded on one path: the service's row and the study's stop criteria in one transaction,
then one write to Optuna.

A solo trial that runs out of memory gets one more attempt at once, in the same slot, at half its batch size
(`retry_smaller`): its row's parameters and error say so. Its Optuna trial keeps the sampler's proposal (half of
a categorical batch size may not be among the choices): the sampler learns what the proposal gave as this service
could run it, and the fresh Optuna trial of the retry carries the batch size run as its `oom_retry` attribute.
"""

from __future__ import annotations

import enum
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from app.core.config import Settings
from app.core.db import Database, retry_on_disconnect
from app.core.optuna_store import optuna_storage
from app.lifecycle import OptunaTell, fail_all
from app.models import FailureKind, TrialState
from app.schemas.scheduler import PbtConfig
from workers import (
    ask_lock,
    asking,
    checkpoint_sweep,
    leasing,
    optuna_sync,
    plugin_runner,
    pruning,
    retries,
    scheduling,
    warm_runners,
)
from workers.devices import check_fork_safe
from workers.precision import resolve_precision
from workers.prepared import PreparedStudies, PreparedStudy
from workers.protocol import Checkpointed, Decision, Done, Epoch, Failed, Message, Resumed, Stopped, Verdict
from workers.publishing import checkpoint_dir, discard, final_stem, publish, staged_stem
from workers.runner import OUT_OF_MEMORY, RunnerJob, RunnerTrial, runner_main
from workers.tensorboard import TrialBoard, board_dir
from workers.trainer import DEFAULT_BATCH_SIZE

log = logging.getLogger("hpsearch.worker")
PIPE_POLL_S = 0.2
STOPPED_MESSAGE = "stopped: the study was cancelled or ended"


class Outcome(enum.Enum):
    """How an attempt ended, as its supervisor saw it."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    RELEASED = "released"  # handed back at shutdown, no attempt spent
    PAUSED = "paused"  # stopped at an epoch boundary for a client's pause, no attempt spent
    RUNG = "rung"  # paused by its study's scheduler at a rung, checkpointed, until a free slot promotes it
    LOST = "lost"  # the lease was taken away (reaped, re-queued, study deleted): nothing to record


@dataclass
class Ending:
    outcome: Outcome
    result: dict[str, Any] = field(default_factory=dict)  # Done's result, or the last epoch report
    failure: FailureKind | None = None
    reason: str | None = None


@dataclass
class Slot:
    """What an attempt needs from the supervisor that runs it."""

    db: Database
    settings: Settings
    worker_id: str
    studies: PreparedStudies
    mp_context: Any
    cpu_threads: int
    drain_over: Any  # () -> bool: shutting down and past the grace period
    shutting_down: Any = lambda: False  # () -> bool: checkpoint running trials at their next boundary, hand back


def run_attempt(slot: Slot, lease: leasing.Lease, device: str) -> None:
    """Run one leased attempt to its end and record it."""
    with slot.studies.using(lease.study_id) as p:
        _run(slot, lease, p, device)


def _run(slot: Slot, lease: leasing.Lease, p: PreparedStudy, device: str) -> None:
    if lease.number is None:
        bound = bind(slot, lease, p)
    elif lease.promoted_from is not None and lease.resumes:
        bound = promote(slot, lease, p)
    else:
        bound = resume(slot, lease) if lease.resumes else rebind(slot, lease, p)
    if bound is None:
        log.warning("lease of study %s lost before its trial started", lease.study_id)
        return
    for m in supervise(slot, p, [bound], device, on_death=_fail_died):
        retry_smaller(slot, p, m, device)


def retry_smaller(slot: Slot, p: PreparedStudy, m: Member, device: str) -> None:
    """A solo trial ran out of memory: run it once more at half its batch size (at least 1), on the same
    lease under its next attempt number; out of memory again, or with no batch to halve, it fails for good."""
    params = dict(m.lease.params or {})
    batch = _batch_size(p, params)
    if batch is None or batch <= 1 or m.lease.extends:  # an extension continues its checkpoint's batch or none
        record(slot, _out_of_memory(OUT_OF_MEMORY), m.lease, p, m.tlog)
        return
    half = batch // 2
    note = f"attempt {m.lease.attempt}: {OUT_OF_MEMORY} at batch size {batch}; retried at batch size {half}"
    retried = leasing.retry_in_place(slot.db, m.lease, params={**params, "batch_size": half}, note=note)
    if retried is None:
        m.tlog.warning("lease lost (reaped or study deleted); result dropped")
        return
    storage = optuna_storage(slot.db.url)
    optuna_sync.tell(storage, fail_all([m.lease.optuna_trial_id]))  # that attempt is over; the retry runs anew
    bound = rebind(slot, retried, p)
    if bound is None:
        m.tlog.warning("lease lost (reaped, or the study ended) before the retry started")
        return
    m.tlog.warning("trial ran out of memory at batch size %d; retrying at %d", batch, half)
    assert bound.optuna_trial_id is not None
    retry_on_disconnect(storage.set_trial_user_attr, bound.optuna_trial_id, "oom_retry",
                        {"batch_size": half, "out_of_memory_at": batch})
    for again in supervise(slot, p, [bound], device, on_death=_fail_died, note=note):
        record(slot, _out_of_memory(f"{OUT_OF_MEMORY} at batch size {half}, after a retry at half of {batch}"),
               again.lease, p, again.tlog)


def _batch_size(p: PreparedStudy, params: dict[str, Any]) -> int | None:
    """The trial's batch size; None for a model plugin's own loop that takes none."""
    if "batch_size" not in params and plugin_runner.own_loop(p.model_spec(params)) is not None:
        return None
    return int(params.get("batch_size", DEFAULT_BATCH_SIZE))


def _out_of_memory(reason: str) -> Ending:
    return Ending(Outcome.FAILED, failure=FailureKind.OUT_OF_MEMORY, reason=reason)


def bind(slot: Slot, lease: leasing.Lease, p: PreparedStudy) -> leasing.Lease | None:
    """Give a fresh lease its Optuna trial: enqueued parameters, or the sampler's next proposal.

    None when the lease was reaped meanwhile (this worker looked dead): that Optuna trial is failed.
    """
    storage = optuna_storage(slot.db.url)
    across_workers = ask_lock.asking_alone(slot.db, lease.study_id) if asking.asks_alone(p.optuna_study) else \
        nullcontext()
    with p.lock, across_workers:
        number, trial_id, params = retry_on_disconnect(asking.ask_trial, p.optuna_study, p.resolved, lease.params)
        bound = None
        try:
            bound = leasing.bind_trial(slot.db, lease, number=number, optuna_trial_id=trial_id, params=params)
            return bound
        finally:
            if bound is None:
                optuna_sync.tell(storage, fail_all([trial_id]))  # never leave an orphan RUNNING in Optuna


def rebind(slot: Slot, lease: leasing.Lease, p: PreparedStudy) -> leasing.Lease | None:
    """Give a re-run (a retry, or a trial handed back at shutdown) a fresh Optuna trial with its parameters.

    Optuna ignores a step already reported, so reusing the old trial would leave the pruner judging this
    attempt on the last one's curve. The old Optuna trial ends FAIL (the reaper usually did that already).
    """
    assert lease.optuna_trial_id is not None
    storage = optuna_storage(slot.db.url)
    with p.lock:
        trial_id = retry_on_disconnect(asking.retry_trial, p.optuna_study, lease.optuna_trial_id)
        bound = None
        try:
            bound = leasing.rebind_trial(slot.db, lease, optuna_trial_id=trial_id)
        finally:
            optuna_sync.tell(storage, fail_all([lease.optuna_trial_id if bound is not None else trial_id]))
    return bound


def resume(slot: Slot, lease: leasing.Lease) -> leasing.Lease | None:
    """A trial that continues from its checkpoint keeps its Optuna trial (still running there): each epoch is
    reported to it once, the resumed run's after the recorded ones. Its Optuna trial ends FAIL when the study
    ended meanwhile."""
    assert lease.optuna_trial_id is not None
    storage = optuna_storage(slot.db.url)
    bound = leasing.rebind_trial(slot.db, lease, optuna_trial_id=lease.optuna_trial_id)
    if bound is None:
        optuna_sync.tell(storage, fail_all([lease.optuna_trial_id]))
    elif lease.schedule:  # a PBT member that continued from another's checkpoint: Optuna's copy says how
        retry_on_disconnect(storage.set_trial_user_attr, lease.optuna_trial_id, "pbt_schedule", lease.schedule)
    return bound


def promote(slot: Slot, lease: leasing.Lease, p: PreparedStudy) -> leasing.Lease | None:
    """A trial its scheduler promotes from a rung continues from its checkpoint on a fresh Optuna trial: the
    one it paused on ended pruned at the rung, so the sampler learned from it then
    (`asking.promoted_trial`)."""
    assert lease.optuna_trial_id is not None and lease.checkpoint_epoch is not None
    storage = optuna_storage(slot.db.url)
    with p.lock:
        trial_id = retry_on_disconnect(asking.promoted_trial, p.optuna_study, lease.optuna_trial_id,
                                       lease.checkpoint_epoch)
        bound = leasing.rebind_trial(slot.db, lease, optuna_trial_id=trial_id)
        if bound is None:
            optuna_sync.tell(storage, fail_all([trial_id]))
    return bound


def release(slot: Slot, lease: leasing.Lease) -> None:
    """Hand a lease back unrun; its Optuna trial, if bound, ends (a re-run asks for a fresh one)."""
    optuna_sync.tell(optuna_storage(slot.db.url), leasing.release_trial(slot.db, lease) or [])


def runner_job(slot: Slot, leases: list[leasing.Lease], p: PreparedStudy, device: str) -> RunnerJob:
    """What the runner of bound `leases` trains: one trial alone, or several fused."""
    spec, splits = p.spec, p.splits
    assert slot.settings.artifact_dir is not None
    # A PBT member trains every epoch: its scheduler, not patience, decides what becomes of a poor one.
    epochs, patience = spec.budget.epochs, None if isinstance(spec.scheduler, PbtConfig) else spec.budget.patience
    trials = [RunnerTrial(trial=lease.trial_id, spec=p.model_spec(lease.params or {}, lease.schedule),
                          seed=spec.seed + (lease.number or 0),
                          artifact_path=str(staged_stem(slot.settings.artifact_dir, lease)))
              for lease in leases]
    for t, lease in zip(trials, leases, strict=True):  # a plugin's loop without `resume` writes none
        if plugin_runner.checkpoints(t.spec):
            t.checkpoint_dir = str(checkpoint_dir(slot.settings.artifact_dir, lease))
    if len(leases) == 1 and trials[0].checkpoint_dir is not None:  # resumes, rungs and extensions run solo
        t, lease = trials[0], leases[0]
        if lease.resumes:
            assert lease.checkpoint is not None
            t.resume_from = str(slot.settings.artifact_dir / lease.checkpoint)
            t.resume_epoch = lease.checkpoint_epoch or 0
        if not lease.extends:
            t.pause_at = scheduling.next_pause(spec, t.resume_epoch)
        if lease.epochs_target is not None:  # an extension trains on to its target, however the best moves
            epochs, patience = lease.epochs_target, None
    return RunnerJob(trials=trials, x_train=splits.x_train, y_train=splits.y_train, x_val=splits.x_val,
                     y_val=splits.y_val, epochs=epochs, patience=patience,
                     objective=spec.primary.metric, direction=str(spec.primary.direction), device=device,
                     threads=slot.cpu_threads if device == "cpu" else 1,
                     precision=resolve_precision(spec.precision, spec.task, device),
                     memory_limit_mb=slot.settings.trial_memory_mb, image=p.dataset.image_shape is not None,
                     checkpoint_every=spec.checkpoint_every)


@dataclass
class Member:
    """A trial its runner holds, as the supervisor follows it (a solo runner holds one, a fused one several)."""

    lease: leasing.Lease
    trial: optuna.Trial | None  # None for an extension: its Optuna trial is over, the pruner not asked
    deadline: float
    tlog: Any = None
    board: TrialBoard | None = None
    stopping: Ending | None = None  # why the supervisor said stop, once it has
    ended: bool = False
    note: str | None = None  # kept as the error of an attempt that does not fail (why it ran as it did)
    checkpointed: bool = False  # a checkpoint of this attempt was recorded
    checkpoints: bool = False  # its runner writes checkpoints: it can pause at an epoch boundary
    pause_at: int | None = None  # the rung its runner pauses it at, for its scheduler
    told_end: bool = False  # its runner told how it ended (Done, Stopped, Failed): the runner is done with it


OnDeath = Callable[[Slot, PreparedStudy, Any, list[Member]], None]  # (slot, study, runner, members still open)


def supervise(slot: Slot, p: PreparedStudy, leases: list[leasing.Lease], device: str, on_death: OnDeath,
              note: str | None = None) -> list[Member]:
    """Fork the runner of bound `leases` (`runner_job`), relay its messages trial by trial and record each
    trial as it ends; `on_death(slot, p, proc, members)` ends those still open when the runner dies.

    Returns the members that ran out of memory, unrecorded: their caller retries them (`retry_smaller`, or
    solo after a fused group). `note` stays as the error of each attempt that does not fail."""
    assert slot.settings.artifact_dir is not None
    timeout = p.spec.trial_timeout_s(slot.settings.trial_deadline_s)
    members: dict[int, Member] = {}
    for lease in leases:
        assert lease.number is not None and lease.params is not None
        # optuna.Trial reads the storage: open it before spawning, through the same reconnecting retries.
        trial = None if lease.extends else retry_on_disconnect(pruning.trial, p.optuna_study, lease.optuna_trial_id)
        members[lease.trial_id] = Member(lease, trial, time.monotonic() + timeout, note=note)
    job = runner_job(slot, leases, p, device)
    for t in job.trials:
        members[t.trial].checkpoints = t.checkpoint_dir is not None
        members[t.trial].pause_at = t.pause_at
    key = warm_runners.key_of(p.study_id, job)
    runner = warm_runners.take(key, job) or warm_runners.WarmRunner(*_spawn(slot, job), key=key)
    proc, conn = runner.proc, runner.conn
    for m in members.values():
        lease = m.lease
        m.tlog = logging.LoggerAdapter(log, {"worker_id": slot.worker_id, "study_id": lease.study_id,
                                             "trial": lease.number, "attempt": lease.attempt, "device": device,
                                             "runner": proc.pid})
        if len(members) == 1:
            m.tlog.info("trial started")
        else:
            m.tlog.info("trial started in a fused group of %d", len(members))
        if p.spec.tensorboard:
            m.board = TrialBoard(board_dir(slot.settings.artifact_dir, lease.study_id, lease.number, lease.attempt))
    out_of_memory: list[Member] = []
    try:
        out_of_memory = _relay(slot, p, proc, conn, members, on_death)
        return out_of_memory
    finally:
        clean = all(m.told_end for m in members.values()) and not out_of_memory and not slot.shutting_down() \
            and warm_runners.may_serve_again(job)
        warm_runners.keep_or_stop(runner, reusable=clean, max_jobs=slot.settings.runner_trials)
        for m in members.values():
            if m.board is not None:
                m.board.close()
            discard(staged_stem(slot.settings.artifact_dir, m.lease))  # published or refused: nothing to keep
            _drop_checkpoints_if_ended(slot, m.lease)


def _drop_checkpoints_if_ended(slot: Slot, lease: leasing.Lease) -> None:
    """A trial that ended for good keeps at most the checkpoint its row still names (a completed trial that
    the study's keep_checkpoints keeps), and completed trials its end pushed out of the best k lose theirs;
    one back in line (resumed, handed back, reaped) keeps them for its next attempt."""
    assert slot.settings.artifact_dir is not None
    if not retry_on_disconnect(leasing.trial_ended, slot.db, lease.trial_id):
        return
    checkpoint_sweep.sweep(slot.db, slot.settings.artifact_dir, lease.study_id, lease.number)


def _spawn(slot: Slot, job: RunnerJob) -> tuple[Any, Connection]:
    check_fork_safe(job.device)  # a runner forked from a process holding CUDA could not use its GPU
    parent, child = slot.mp_context.Pipe()
    proc = slot.mp_context.Process(target=runner_main, args=(child, job), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def _relay(slot: Slot, p: PreparedStudy, proc: Any, conn: Connection, members: dict[int, Member],
           on_death: OnDeath) -> list[Member]:
    """Relay every member's messages until each has ended: stop one when pruned, lost, cancelled or late,
    all when shutting down; the runner's death ends those still open. Returns those out of memory, unrecorded."""
    out_of_memory: list[Member] = []

    def end(m: Member, ending: Ending) -> None:
        m.ended = True
        record(slot, ending, m.lease, p, m.tlog, note=m.note)

    def tell_runner(trial_id: int, verdict: Verdict = Verdict.STOP, answers_epoch: bool = True) -> None:
        try:
            conn.send(Decision(trial_id, verdict, answers_epoch))
        except OSError:  # the runner is gone: its death is noticed below
            pass

    def died() -> None:
        on_death(slot, p, proc, [m for m in members.values() if not m.ended])

    while True:
        open_members = [m for m in members.values() if not m.ended]
        if not open_members:
            return out_of_memory
        if slot.drain_over():
            for m in open_members:
                end(m, Ending(Outcome.RELEASED))
            return out_of_memory
        if slot.shutting_down():  # checkpoint at the next boundary and hand back; the rest run on to the grace
            for m in open_members:
                if m.checkpoints and m.stopping is None:
                    m.stopping = Ending(Outcome.RELEASED)
                    tell_runner(m.lease.trial_id, Verdict.PAUSE, answers_epoch=False)
        now = time.monotonic()
        for m in open_members:
            if now > m.deadline and (m.checkpointed or m.lease.checkpoint is not None):
                m.ended = True  # hung, or slow: it continues from its checkpoint under its next attempt
                tell_runner(m.lease.trial_id)
                settle(slot, m, retries.retry_attempt(slot.db, m.lease, reason="deadline exceeded",
                                                      failure=FailureKind.DEADLINE), "deadline exceeded")
            elif now > m.deadline:
                end(m, Ending(Outcome.FAILED, failure=FailureKind.DEADLINE, reason="deadline exceeded"))
                tell_runner(m.lease.trial_id)
        if not conn.poll(PIPE_POLL_S):
            if not proc.is_alive() and not conn.poll(0):
                died()
                return out_of_memory
            continue
        try:
            msg: Message = conn.recv()
        except (EOFError, OSError):  # killed with bytes unread, the pipe reads as reset rather than closed
            proc.join(1)
            died()
            return out_of_memory
        m = members.get(msg.trial)
        assert m is not None, f"a runner spoke of trial {msg.trial}, which it does not hold"
        m.told_end = m.told_end or isinstance(msg, Done | Stopped | Failed)
        if isinstance(msg, Epoch):
            if m.ended:  # ended here already (late, lost): let the runner drop it
                tell_runner(msg.trial)
                continue
            if m.board is not None:
                m.board.epoch(msg.report)
            verdict = _on_epoch(slot, msg.report, m.lease, m.trial, p)
            if verdict is not None and verdict.outcome is Outcome.LOST:
                end(m, verdict)
                tell_runner(msg.trial)
                continue
            if verdict is None and msg.report["epoch"] == m.pause_at:  # its runner pauses here by itself
                verdict = Ending(Outcome.RUNG)
            if verdict is not None and verdict.outcome in (Outcome.PAUSED, Outcome.RUNG) and m.stopping is not None:
                verdict = None  # pausing already (a shutdown's hand-back): let it reach its boundary
            m.stopping = m.stopping or verdict
            if verdict is None:
                tell_runner(msg.trial, Verdict.GO)
            elif verdict.outcome in (Outcome.PAUSED, Outcome.RUNG):  # without a checkpoint: stop, to start over
                tell_runner(msg.trial, Verdict.PAUSE if m.checkpoints else Verdict.STOP)
            else:
                tell_runner(msg.trial)
        elif m.ended:
            continue
        elif isinstance(msg, Checkpointed | Resumed):
            if not _on_checkpoint(slot, msg, m):
                end(m, Ending(Outcome.LOST))
                tell_runner(msg.trial)
        elif isinstance(msg, Stopped):
            ending = m.stopping or Ending(Outcome.FAILED, failure=FailureKind.CANCELLED, reason=STOPPED_MESSAGE)
            if ending.outcome is Outcome.RELEASED and (msg.last or {}).get("epoch") == m.pause_at:
                ending = Ending(Outcome.RUNG)  # a shutdown met it at its rung: its scheduler decides what next
            ending.result = msg.last or {}
            end(m, ending)
        elif isinstance(msg, Done):
            end(m, Ending(Outcome.COMPLETE, msg.result))
        elif isinstance(msg, Failed) and msg.failure is FailureKind.OUT_OF_MEMORY and not m.stopping:
            m.ended = True
            out_of_memory.append(m)
        elif isinstance(msg, Failed):
            end(m, Ending(Outcome.FAILED, failure=msg.failure, reason=msg.reason))


def _on_checkpoint(slot: Slot, msg: Checkpointed | Resumed, m: Member) -> bool:
    """Record a checkpoint on disk, or where a resumed trial continues; False when the lease was lost. A
    checkpoint past its owner's quota fails the trial for good and ends the member."""
    assert slot.settings.artifact_dir is not None
    if isinstance(msg, Resumed):
        if msg.skipped:
            m.tlog.warning("resumed after epoch %d: %s", msg.epoch, "; ".join(msg.skipped))
            start = f"resumed after epoch {msg.epoch}" if msg.epoch else "started over"
            return leasing.note_trial(slot.db, m.lease, f"{start}: " + "; ".join(msg.skipped),
                                      unusable_checkpoints=len(msg.skipped))
        m.tlog.info("resumed after epoch %d", msg.epoch)
        return True
    path = str(Path(msg.path).relative_to(slot.settings.artifact_dir))
    recorded = leasing.record_checkpoint(slot.db, m.lease, path=path, epoch=msg.epoch, size=msg.size,
                                         quota_bytes=slot.settings.checkpoint_quota_bytes)
    if recorded.refused is not None:  # past the owner's checkpoint quota: the trial fails for good, here
        if leasing.finish_trial(slot.db, m.lease, state=TrialState.FAIL, error=recorded.refused,
                                failure=FailureKind.CHECKPOINT_QUOTA) is None:
            return False
        optuna_sync.tell(optuna_storage(slot.db.url), fail_all([m.lease.optuna_trial_id]))
        m.tlog.warning("trial failed: %s", recorded.refused)
        m.ended = True  # followed no more: its runner is stopped, then its files go (_drop_checkpoints_if_ended)
        return True
    if not recorded.held:
        return False
    resumed_from = (slot.settings.artifact_dir / m.lease.checkpoint).parent if m.lease.checkpoint else None
    if not m.checkpointed and resumed_from is not None and resumed_from != Path(msg.path).parent:
        shutil.rmtree(resumed_from, ignore_errors=True)  # the last attempt's checkpoints are superseded
    m.checkpointed = True
    return True


def _fail_died(slot: Slot, p: PreparedStudy, proc: Any, members: list[Member]) -> None:
    """A solo runner that died took its one trial with it: that attempt fails, blamed on the trial, unless a
    checkpoint of the trial is recorded: then, while attempts remain, it resumes from there."""
    reason = f"trial process died (exit code {proc.exitcode})"
    for m in members:
        if m.checkpointed or m.lease.checkpoint is not None:
            settle(slot, m, retries.retry_attempt(slot.db, m.lease, reason=reason, failure=FailureKind.PROCESS_DIED),
                   reason)
            continue
        record(slot, Ending(Outcome.FAILED, failure=FailureKind.PROCESS_DIED, reason=reason), m.lease, p, m.tlog)


def settle(slot: Slot, m: Member, stored: retries.Reaped | None, reason: str) -> None:
    """Log how a failed attempt was stored (back in line, or over) and tell Optuna what it must know."""
    if stored is None:
        m.tlog.warning("lease lost (reaped or study deleted); result dropped")
        return
    if stored.requeued:
        m.tlog.warning("trial attempt failed: %s; back in line", reason)
    else:
        m.tlog.warning("trial failed: %s", stored.reason)
    optuna_sync.tell(optuna_storage(slot.db.url), stored.tells)  # a retry runs as a fresh Optuna trial


def _on_epoch(slot: Slot, report: dict[str, Any], lease: leasing.Lease, trial: optuna.Trial | None,
              p: PreparedStudy) -> Ending | None:
    """Record one epoch; None to go on, else why this attempt stops here. Without `trial` (an extension)
    Optuna hears nothing until the end."""
    metric = report["metrics"].get(p.spec.primary.metric)
    status = leasing.record_epoch(slot.db, lease, epoch=report["epoch"], train_loss=report["train_loss"],
                                  val_loss=report["val_loss"], val_metric=metric,
                                  learning_rate=report["learning_rate"], seconds=report["seconds"])
    if status is leasing.EpochStatus.LOST:
        return Ending(Outcome.LOST)
    stop = status is leasing.EpochStatus.STOP
    pause = Ending(Outcome.PAUSED) if status is leasing.EpochStatus.PAUSE else None
    if p.spec.is_multi_objective or metric is None or trial is None:
        return Ending(Outcome.FAILED, failure=FailureKind.CANCELLED, reason=STOPPED_MESSAGE) if stop else pause
    try:  # an epoch the service recorded reaches Optuna too, also the last one before a cancel
        retry_on_disconnect(trial.report, float(metric), step=report["epoch"])
        # A client's pause outranks the pruner: it asked to look at this trial later. The pruner may write
        # to the trial (successive halving notes its rung), so it too can find it ended.
        prune = not stop and pause is None and retry_on_disconnect(trial.should_prune)
    except UpdateFinishedTrialError:  # the reaper ended this attempt's Optuna trial meanwhile
        return Ending(Outcome.LOST)
    if stop:
        return Ending(Outcome.FAILED, failure=FailureKind.CANCELLED, reason=STOPPED_MESSAGE)
    if pause is not None:
        return pause
    return Ending(Outcome.PRUNED) if prune else None


def record(slot: Slot, ending: Ending, lease: leasing.Lease, p: PreparedStudy, tlog: Any,
           note: str | None = None) -> None:
    """Write how the attempt ended: our row and stop criteria in one transaction, then Optuna once. `note`
    stays as the error of a complete or pruned attempt (why it ran as it did: a smaller batch, say)."""
    if ending.outcome is Outcome.LOST:
        tlog.warning("lease lost (reaped or study deleted); result dropped")
        return
    if ending.outcome is Outcome.RELEASED:
        release(slot, lease)
        tlog.info("trial handed back at shutdown")
        return
    if ending.outcome in (Outcome.PAUSED, Outcome.RUNG):
        rung = ending.result.get("epoch", 0) if ending.outcome is Outcome.RUNG else None
        tells = leasing.pause_trial(slot.db, lease, rung=rung)
        if tells is None:
            tlog.warning("lease lost (reaped or study deleted); pause dropped")
            return
        optuna_sync.tell(optuna_storage(slot.db.url), tells, p.optuna_study)
        tlog.info("trial paused after epoch %s%s", ending.result.get("epoch", 0), " (its rung)" if rung else "")
        return
    assert lease.number is not None and slot.settings.artifact_dir is not None
    if ending.outcome is Outcome.COMPLETE:
        values = [float(ending.result["metrics"][o.metric]) for o in p.spec.objectives]
        if not all(map(math.isfinite, values)):
            ending = Ending(Outcome.FAILED, failure=FailureKind.NON_FINITE, reason="non_finite_objective")
    staged = staged_stem(slot.settings.artifact_dir, lease)
    final = final_stem(slot.settings.artifact_dir, lease.study_id, lease.number)
    if ending.outcome is Outcome.COMPLETE:
        state, result = TrialState.COMPLETE, ending.result
        finished = leasing.finish_trial(slot.db, lease, state=state, value=values[0], values=values,
                                        metrics=result["metrics"], epochs_run=result["epochs_run"],
                                        best_epoch=result["best_epoch"], artifact=str(final), error=note,
                                        while_held=lambda: _publish(staged, final, tlog))
    elif ending.outcome is Outcome.PRUNED:
        state, values = TrialState.PRUNED, None
        finished = leasing.finish_trial(slot.db, lease, state=state,
                                        value=(ending.result.get("metrics") or {}).get(p.spec.primary.metric),
                                        epochs_run=ending.result.get("epoch", 0), error=note)  # epochs from 1
    else:
        state, values = TrialState.FAIL, None
        finished = leasing.finish_trial(slot.db, lease, state=state, error=ending.reason, failure=ending.failure)
    if finished is None:
        tlog.warning("lease lost (reaped or study deleted); late result refused")
        return
    assert lease.optuna_trial_id is not None
    if lease.extends:
        if state is TrialState.COMPLETE:
            assert values is not None
            optuna_sync.record_extension(slot.db, lease, values)
            tlog.info("trial extension complete: %s after %s epochs", values[0], ending.result["epochs_run"])
        else:  # the trial stays complete as it was (finish_trial), its Optuna trial too
            tlog.warning("trial extension ended without completing: %s", ending.reason or state.value)
        return
    optuna_sync.tell(optuna_storage(slot.db.url), [OptunaTell(lease.optuna_trial_id, state, values)], p.optuna_study)
    tlog.log(logging.WARNING if state is TrialState.FAIL else logging.INFO, "trial %s%s", state.value,
             f": {values[0] if values else ending.reason}" if values or ending.reason else "")


def _publish(staged: Any, final: Any, tlog: Any) -> None:
    try:
        publish(staged, final)
    except OSError:  # recorded without weights: finalization and downloads skip it
        tlog.exception("could not publish the trial's weights")
