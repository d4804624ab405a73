"""A fused group of trials, seen from its supervisor: claim and bind the members, plan the groups, fork one
runner per group, and supervise its members through `attempt.supervise`, as a solo trial is supervised.

Each member keeps its own lease, Optuna trial, curve, pruning decision, deadline, cancellation and outcome,
recorded on the same path as a solo trial's (`attempt.record`). Stopping one member (pruned, cancelled,
late, lost) sends that member a STOP and leaves the others training. A runner that runs out of memory or dies
ends the current attempt of each member it still held, none of them to blame: each goes back in line under its
next attempt, whatever attempts remain, and runs solo then, from its checkpoint if one is recorded (where out
of memory, it is retried at half its batch size, as any solo trial). A group is never failed wholesale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.models import FailureKind
from workers import leasing, retries
from workers.attempt import Member, Slot, bind, settle, supervise
from workers.fused import can_fuse, max_waste, plan_groups
from workers.fused.layers import member_params
from workers.fusing import fuse_size
from workers.prepared import PreparedStudy
from workers.runner import OUT_OF_MEMORY
from workers.trainer import DEFAULT_BATCH_SIZE


def plan_claim(slot: Slot, first: leasing.Lease, device: str, fuse: int | str,
               claim_more: Callable[[int], list[leasing.Lease]]) -> list[list[leasing.Lease]]:
    """Bind `first`, claim and bind up to K-1 more leases of its study, and split them into runs: a list of
    one lease runs solo (`attempt.run_attempt`), a longer one as a fused group (`run_group`).

    A retried attempt runs solo, beside the others: if its last runner was a group that crashed, no member can
    crash the others twice. So does a resumed or extended one: it continues from its checkpoint, which is in
    the solo loop's form whoever wrote it. A lease lost before it got its trial is left out (its Optuna trial
    is failed by `bind`).
    """
    p = slot.studies.get(first.study_id)
    lead = _bound(slot, first, p)
    if lead is None:
        return []
    spec = p.model_spec(lead.params or {})
    if not can_fuse([spec])[0] or p.spec.scheduler is not None:  # a scheduler pauses trials at checkpoints
        return [[lead]]
    k = fuse_size(fuse, device, spec, int(member_params(spec).get("batch_size", DEFAULT_BATCH_SIZE)))
    leases = [lead]
    if k > 1:
        leases += [b for lease in claim_more(k - 1) if (b := _bound(slot, lease, p)) is not None]
    runs: list[list[leasing.Lease]] = [[lease] for lease in leases if lease.attempt > 1 or lease.resumes]
    fresh = [lease for lease in leases if lease.attempt == 1 and not lease.resumes]
    specs = [p.model_spec(lease.params or {}) for lease in fresh]
    runs += [[fresh[i] for i in g] for g in plan_groups(specs, max_members=max(1, k), max_waste=max_waste(device))]
    return runs


def _bound(slot: Slot, lease: leasing.Lease, p: PreparedStudy) -> leasing.Lease | None:
    return lease if lease.number is not None else bind(slot, lease, p)


def run_group(slot: Slot, leases: list[leasing.Lease], device: str) -> None:
    """Train bound leases of one study as one fused runner; record each member's outcome as it ends."""
    p = slot.studies.get(leases[0].study_id)
    out_of_memory = supervise(slot, p, leases, device, on_death=_retry_members)
    _requeue(slot, out_of_memory, f"{OUT_OF_MEMORY} in a fused group of {len(leases)}", FailureKind.OUT_OF_MEMORY)


def _retry_members(slot: Slot, p: PreparedStudy, proc: Any, members: list[Member]) -> None:
    """A fused runner that died (the kernel's OOM killer, say) took each member still open with it."""
    _requeue(slot, members, f"fused trial process died (exit code {proc.exitcode})", FailureKind.PROCESS_DIED)


def _requeue(slot: Slot, members: list[Member], reason: str, failure: FailureKind) -> None:
    """Each member back in line to run solo, under its next attempt (`retries.requeue_attempt`)."""
    for m in members:
        settle(slot, m, retries.requeue_attempt(slot.db, m.lease, reason=reason, failure=failure), reason)
