"""A fused group of trials, seen from its supervisor: claim and bind the members, plan the groups, fork one
runner per group, and supervise every member as `workers.attempt` supervises a solo trial.

Each member keeps its own lease, Optuna trial, curve, pruning decision, deadline, cancellation and outcome,
recorded on the same path as a solo trial's (`attempt.record`). Stopping one member (pruned, cancelled,
late, lost) sends that member a STOP and leaves the others training. A runner that dies fails the current
attempt of each member it still held; each goes back in line while attempts remain, and runs solo then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from app.core.db import retry_on_disconnect
from app.core.optuna_store import optuna_storage
from app.models import FailureKind
from workers import optuna_sync, queue
from workers.attempt import PIPE_POLL_S, STOPPED_MESSAGE, Ending, Outcome, Slot, _on_epoch, bind, record
from workers.fused import can_fuse, max_waste, plan_groups
from workers.fused.layers import member_params
from workers.fusing import fuse_size
from workers.prepared import PreparedStudy
from workers.protocol import Decision, Done, Epoch, Failed, Message, Stopped, Verdict
from workers.publishing import discard, staged_stem
from workers.runner import GroupJob, GroupMemberJob, group_main
from workers.tensorboard import TrialBoard, board_dir
from workers.trainer import DEFAULT_BATCH_SIZE

log = logging.getLogger("hpsearch.worker")


def plan_claim(slot: Slot, first: queue.Lease, device: str, fuse: int | str,
               claim_more: Callable[[int], list[queue.Lease]]) -> list[list[queue.Lease]]:
    """Bind `first`, claim and bind up to K-1 more leases of its study, and split them into runs: a list of
    one lease runs solo (`attempt.run_attempt`), a longer one as a fused group (`run_group`).

    A retried attempt runs solo, beside the others: if its last runner was a group that crashed, no member can
    crash the others twice. A lease lost before it got its trial is left out (its Optuna trial is failed by `bind`).
    """
    p = slot.studies.get(first.study_id)
    lead = _bound(slot, first, p)
    if lead is None:
        return []
    spec = p.model_spec(lead.params or {})
    if not can_fuse([spec])[0]:
        return [[lead]]
    k = fuse_size(fuse, device, spec, int(member_params(spec).get("batch_size", DEFAULT_BATCH_SIZE)))
    leases = [lead]
    if k > 1:
        leases += [b for lease in claim_more(k - 1) if (b := _bound(slot, lease, p)) is not None]
    runs: list[list[queue.Lease]] = [[lease] for lease in leases if lease.attempt > 1]
    fresh = [lease for lease in leases if lease.attempt == 1]
    specs = [p.model_spec(lease.params or {}) for lease in fresh]
    runs += [[fresh[i] for i in g] for g in plan_groups(specs, max_members=max(1, k), max_waste=max_waste(device))]
    return runs


def _bound(slot: Slot, lease: queue.Lease, p: PreparedStudy) -> queue.Lease | None:
    return lease if lease.number is not None else bind(slot, lease, p)


@dataclass
class _Member:
    lease: queue.Lease
    trial: optuna.Trial
    deadline: float
    tlog: Any
    board: TrialBoard | None = None
    stopping: Ending | None = None  # why the supervisor said stop, once it has
    ended: bool = False


def run_group(slot: Slot, leases: list[queue.Lease], device: str) -> None:
    """Train bound leases of one study as one fused runner; record each member's outcome as it ends."""
    p = slot.studies.get(leases[0].study_id)
    assert slot.settings.artifact_dir is not None
    timeout = p.spec.trial_timeout_s(slot.settings.trial_deadline_s)
    members: dict[int, _Member] = {}
    for lease in leases:
        # optuna.Trial reads the storage: open it before spawning, through the same reconnecting retries.
        trial = retry_on_disconnect(optuna.Trial, p.optuna_study, lease.optuna_trial_id)
        members[lease.trial_id] = _Member(lease, trial, time.monotonic() + timeout, None)
    parent, child = slot.mp_context.Pipe()
    proc = slot.mp_context.Process(target=group_main, args=(child, _group_job(slot, leases, p, device)),
                                   daemon=True)
    proc.start()
    child.close()
    for m in members.values():
        m.tlog = logging.LoggerAdapter(log, {"worker_id": slot.worker_id, "study_id": m.lease.study_id,
                                             "trial": m.lease.number, "attempt": m.lease.attempt,
                                             "device": device, "runner": proc.pid})
        m.tlog.info("trial started in a fused group of %d", len(members))
        if p.spec.tensorboard:
            assert m.lease.number is not None
            m.board = TrialBoard(board_dir(slot.settings.artifact_dir, m.lease.study_id, m.lease.number,
                                           m.lease.attempt))
    try:
        _relay(slot, p, proc, parent, members)
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        for m in members.values():
            if m.board is not None:
                m.board.close()
            discard(staged_stem(slot.settings.artifact_dir, m.lease))  # published or refused: nothing to keep


def _group_job(slot: Slot, leases: list[queue.Lease], p: PreparedStudy, device: str) -> GroupJob:
    spec, splits = p.spec, p.splits
    assert slot.settings.artifact_dir is not None
    members = [GroupMemberJob(trial=lease.trial_id, spec=p.model_spec(lease.params or {}),
                              seed=spec.seed + (lease.number or 0),
                              artifact_path=str(staged_stem(slot.settings.artifact_dir, lease)))
               for lease in leases]
    return GroupJob(members=members, x_train=splits.x_train, y_train=splits.y_train, x_val=splits.x_val,
                    y_val=splits.y_val, epochs=spec.budget.epochs, patience=spec.budget.patience,
                    objective=spec.primary.metric, direction=str(spec.primary.direction), device=device,
                    threads=slot.cpu_threads if device == "cpu" else 1, amp=device.startswith("cuda"),
                    memory_limit_mb=slot.settings.trial_memory_mb, image=p.dataset.image_shape is not None)


def _relay(slot: Slot, p: PreparedStudy, proc: Any, conn: Any, members: dict[int, _Member]) -> None:
    """Relay every member's messages until each has ended; the runner's death ends those still open."""

    def end(m: _Member, ending: Ending) -> None:
        m.ended = True
        record(slot, ending, m.lease, p, m.tlog)

    def stop(trial_id: int) -> None:
        try:
            conn.send(Decision(trial_id, Verdict.STOP))
        except OSError:  # the runner is gone: its death is noticed below
            pass

    while True:
        open_members = [m for m in members.values() if not m.ended]
        if not open_members:
            return
        if slot.drain_over():
            for m in open_members:
                end(m, Ending(Outcome.RELEASED))
            return
        now = time.monotonic()
        for m in open_members:
            if now > m.deadline:
                end(m, Ending(Outcome.FAILED, failure=FailureKind.DEADLINE, reason="deadline exceeded"))
                stop(m.lease.trial_id)
        if not conn.poll(PIPE_POLL_S):
            if not proc.is_alive() and not conn.poll(0):
                _runner_died(slot, proc, members)
                return
            continue
        try:
            msg: Message = conn.recv()
        except (EOFError, OSError):  # killed with bytes unread, the pipe reads as reset rather than closed
            proc.join(1)
            _runner_died(slot, proc, members)
            return
        m = members.get(msg.trial)
        assert m is not None, f"a fused runner spoke of trial {msg.trial}, not its member"
        if isinstance(msg, Epoch):
            if m.ended:  # ended here already (late, lost): let the runner drop it
                stop(msg.trial)
                continue
            if m.board is not None:
                m.board.epoch(msg.report)
            verdict = _on_epoch(slot, msg.report, m.lease, m.trial, p)
            if verdict is not None and verdict.outcome is Outcome.LOST:
                end(m, verdict)
                stop(msg.trial)
                continue
            m.stopping = m.stopping or verdict
            if verdict is None:
                try:
                    conn.send(Decision(msg.trial, Verdict.GO))
                except OSError:  # the runner is gone: its death is noticed above
                    pass
            else:
                stop(msg.trial)
        elif m.ended:
            continue
        elif isinstance(msg, Stopped):
            ending = m.stopping or Ending(Outcome.FAILED, failure=FailureKind.CANCELLED, reason=STOPPED_MESSAGE)
            ending.result = msg.last or {}
            end(m, ending)
        elif isinstance(msg, Done):
            end(m, Ending(Outcome.COMPLETE, msg.result))
        elif isinstance(msg, Failed):
            end(m, Ending(Outcome.FAILED, failure=msg.failure, reason=msg.reason))


def _runner_died(slot: Slot, proc: Any, members: dict[int, _Member]) -> None:
    """Fail the current attempt of each member still open; each is retried while attempts remain."""
    reason = f"fused trial process died (exit code {proc.exitcode})"
    for m in members.values():
        if m.ended:
            continue
        m.ended = True
        reaped = queue.retry_attempt(slot.db, m.lease, reason=reason, failure=FailureKind.PROCESS_DIED)
        if reaped is None:
            m.tlog.warning("lease lost (reaped or study deleted); result dropped")
        elif reaped.requeued:
            m.tlog.warning("trial attempt failed: %s; back in line", reason)
        else:
            if reaped.optuna_trial_id is not None:
                optuna_sync.fail_trial(optuna_storage(slot.db.url), reaped.optuna_trial_id)
            m.tlog.warning("trial failed: %s", reaped.reason)
