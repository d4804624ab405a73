"""The soak's count of lost work: which faults hit a running trial, and how many epochs each made a trial
train again.

The database keeps one curve per trial: when a trial resumes, the epochs recorded after its checkpoint are
deleted and trained again (app.services.fates). So the curve at the end cannot show what was lost; an
observer polls the epoch table during the run and keeps every recording it ever saw (an epoch's identity is
its creation time and its duration: a new recording of an epoch number is training done twice). The
injector names, for every fault, the trials it hit (read from the database: running trials and their
worker) and the window in which the fault could stop them.

An epoch is *trained again* when its number was recorded before by the same trial. The re-recordings come in
runs (a resume retrains from its checkpoint up to where the trial had got); each run is charged to the fault
that stopped the attempt that had recorded the epoch just before it, or counted as unprovoked (a lease the
service took back on its own, e.g. a heartbeat starved on a loaded machine).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

WORKER_FAULTS = ("sigkill", "freeze", "sigterm")
GRACEFUL = ("sigterm",)  # a graceful stop checkpoints at the next epoch boundary: it loses nothing
POLL_S = 0.5  # well under the lease grace: an epoch is deleted no sooner than a reaper re-queues its trial
FAST_POLL_S = 0.1  # while a gracefully stopped worker drains, its hand-back deletes epochs at once


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Recording:
    """One recording of one epoch of a trial, as first seen."""

    trial_id: int
    study_id: str  # with the row id, the trial's identity: SQLite reuses the ids of deleted rows
    epoch: int
    attempt: int  # the attempt it was first seen under (a resume relabels kept epochs to the next one)
    created_at: datetime
    seconds: float | None
    lease: tuple[str, int] | None  # (worker, attempt) holding the trial when first seen; None: not running


@dataclass
class FaultHit:
    """A fault that stopped a running trial. `end`: until when the stopped attempt could still record (the
    moment of a kill or a freeze, the end of a graceful drain, the end of an outage)."""

    kind: str
    trial_id: int
    study_id: str
    attempt: int
    start: datetime
    end: datetime | None = None


@dataclass
class Interruption:
    """A run of epochs a trial trained again, and what it is charged to."""

    trial_id: int
    epochs: list[int]
    cause: str  # a fault kind, or "unprovoked"


class EpochObserver(threading.Thread):
    """Polls the epoch table and keeps every recording of every epoch it saw."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.seen: dict[tuple[int, str, int, datetime, float | None], Recording] = {}
        self.fast_until = 0.0
        self.polls = 0

    def run(self) -> None:
        while not self.halt.wait(FAST_POLL_S if time.monotonic() < self.fast_until else POLL_S):
            self.poll()

    def hurry(self, seconds: float) -> None:
        """Poll fast for a while (a graceful drain may hand a trial back, and delete epochs, at once)."""
        self.fast_until = max(self.fast_until, time.monotonic() + seconds)

    def poll(self) -> None:
        from app.models import Trial, TrialEpoch

        try:
            with self.engine.connect() as conn:
                rows = list(conn.execute(select(TrialEpoch.trial_id, Trial.study_id, TrialEpoch.epoch,
                                                TrialEpoch.attempt, TrialEpoch.created_at, TrialEpoch.seconds)
                                         .join(Trial, Trial.id == TrialEpoch.trial_id)))
                leases = {r.id: (str(r.worker_id), int(r.attempt)) for r in conn.execute(
                    select(Trial.id, Trial.worker_id, Trial.attempt).where(Trial.state == "running"))}
        except DBAPIError:
            return  # an outage: nothing can be recorded or deleted meanwhile either
        with self.lock:
            self.polls += 1
            for r in rows:
                key = (r.trial_id, r.study_id, r.epoch, _utc(r.created_at), r.seconds)
                if key not in self.seen:
                    self.seen[key] = Recording(r.trial_id, r.study_id, r.epoch, r.attempt, _utc(r.created_at),
                                               r.seconds, leases.get(r.trial_id))

    def by_trial(self) -> dict[tuple[int, str], list[Recording]]:
        """Every trial's recordings, by (row id, study), in the order they were made."""
        with self.lock:
            out: dict[tuple[int, str], list[Recording]] = defaultdict(list)
            for rec in self.seen.values():
                out[(rec.trial_id, rec.study_id)].append(rec)
        for recs in out.values():
            recs.sort(key=lambda r: r.created_at)
        return out


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def interruptions(recordings: list[Recording], hits: list[FaultHit]) -> list[Interruption]:
    """The runs of re-recorded epochs of one trial, each charged to the fault that stopped the attempt
    which had recorded the epoch before the run."""
    out: list[Interruption] = []
    high, before, in_run = 0, None, False
    for rec in recordings:
        if rec.epoch <= high:
            if in_run and before is not None and rec.epoch == before.epoch + 1:
                out[-1].epochs.append(rec.epoch)  # the same resume, one more epoch trained again
            else:
                out.append(Interruption(rec.trial_id, [rec.epoch], _cause(before, rec, hits)))
            in_run = True
        else:
            in_run = False
        high = max(high, rec.epoch)
        before = rec
    return out


def _cause(before: Recording | None, first_again: Recording, hits: list[FaultHit]) -> str:
    """The fault that stopped the attempt whose last recording is `before`: one that hit that attempt after
    the recording could still be made, and before the trial trained again. (A later fault may hit the
    attempt that retrains, before its first recording: it is not the one that cost those epochs.)"""
    slack = timedelta(seconds=0.5)  # a commit in flight when the fault came
    candidates = [h for h in hits if h.start <= first_again.created_at
                  and (before is None or (h.attempt == before.attempt
                                          and (h.end or first_again.created_at) + slack >= before.created_at))]
    return max(candidates, key=lambda h: h.start).kind if candidates else "unprovoked"


@dataclass
class LostWork:
    """What the faults cost, for the report."""

    hits: Counter[str] = field(default_factory=Counter)  # running trials stopped, by fault kind
    again: Counter[str] = field(default_factory=Counter)  # epochs trained again, by cause
    worst: Counter[str] = field(default_factory=Counter)  # the most epochs one interruption trained again
    interrupted_trials: int = 0
    resumed_trials: int = 0  # finished with a curve trained under more than one lease
    recordings: int = 0

    def render(self) -> str:
        def counts(c: Counter[str]) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"
        return (f"lost work: running trials hit: {counts(self.hits)}; epochs trained again by cause: "
                f"{counts(self.again)} (most in one interruption: {counts(self.worst)}); trials interrupted: "
                f"{self.interrupted_trials}, resumed with their epochs kept: {self.resumed_trials}; epoch "
                f"recordings seen: {self.recordings}")


def resumed(final_curve: list[Recording]) -> bool:
    """The trial's final curve holds epochs trained under two leases or more (another worker, or the next
    attempt): it continued from a checkpoint instead of starting over."""
    return len({r.lease for r in final_curve if r.lease is not None}) > 1


def check_lost_work(observer: EpochObserver, hits: list[FaultHit], trials: list[Any], spec_of: dict[str, Any],
                    final_curves: dict[int, list[tuple[int, datetime, float | None]]],
                    report: Any) -> LostWork:
    """Epochs trained again per interruption (at most the study's checkpoint_every; none for a graceful
    stop), and every ended trial's curve one continuous run: epochs 1..n, in the order they were trained,
    none recorded twice under its final attempt."""
    lost = LostWork()
    by_trial = observer.by_trial()
    hits_of: dict[tuple[int, str], list[FaultHit]] = defaultdict(list)
    for h in hits:
        lost.hits[h.kind] += 1
        hits_of[(h.trial_id, h.study_id)].append(h)
    lost.recordings = sum(len(v) for v in by_trial.values())
    report.checks["epoch_recordings"] += lost.recordings
    for t in trials:
        recs, hit = by_trial.get((t.id, t.study_id), []), hits_of.get((t.id, t.study_id), [])
        every = int(spec_of[t.study_id].get("checkpoint_every") or 1)
        runs = interruptions(recs, hit)
        lost.interrupted_trials += int(bool(runs or hit))
        for run in runs:
            charge(run, every, t, lost, report)
        if t.state in ("complete", "pruned", "fail"):
            curve = _final_recordings(recs, final_curves.get(t.id, []))
            lost.resumed_trials += resumed(curve)
            _check_curve(t, recs, final_curves.get(t.id, []), report)
    return lost


def charge(run: Interruption, every: int, t: Any, lost: LostWork, report: Any) -> None:
    """Count one interruption's epochs trained again; more than checkpoint_every, or any after a graceful
    stop, is a violation."""
    n = len(run.epochs)
    report.checks["interruptions"] += 1
    lost.again[run.cause] += n
    lost.worst[run.cause] = max(lost.worst[run.cause], n)
    if run.cause in GRACEFUL:
        report.violate("lost_work", f"study {t.study_id} trial {t.number} trained epoch(s) {run.epochs} again "
                                    f"after a graceful stop ({run.cause}), which must lose nothing")
    elif n > every:
        report.violate("lost_work", f"study {t.study_id} trial {t.number} trained {n} epochs {run.epochs} again "
                                    f"after one interruption ({run.cause}); checkpoint_every is {every}")


def _final_recordings(recs: list[Recording], curve: list[tuple[int, datetime, float | None]]) -> list[Recording]:
    """The observer's recordings that make up the final curve (the same epoch, time and duration)."""
    index = {(r.epoch, r.created_at, r.seconds): r for r in recs}
    return [index[(e, _utc(at), s)] for e, at, s in curve if (e, _utc(at), s) in index]


def _check_curve(t: Any, recs: list[Recording], curve: list[tuple[int, datetime, float | None]],
                 report: Any) -> None:
    """A finished trial's curve continues across resumes: epochs 1..n with none missing, trained in that
    order, and no epoch recorded twice under the final attempt (a resume retrains past its checkpoint under
    the next attempt; a second recording under the same one is a graceful stop or a resume gone wrong)."""
    report.checks["curves"] += 1
    epochs = [e for e, _, _ in curve]
    if epochs != list(range(1, len(epochs) + 1)):
        report.violate("curve", f"study {t.study_id} trial {t.number} ({t.state}, attempt {t.attempt}) has epochs "
                                f"{epochs}, not 1..{len(epochs)}")
    times = [_utc(at) for _, at, _ in sorted(curve)]
    if any(b < a for a, b in zip(times, times[1:], strict=False)):
        report.violate("curve", f"study {t.study_id} trial {t.number}: its epochs were not recorded in order "
                                f"({[e for e, _, _ in sorted(curve, key=lambda c: _utc(c[1]))]})")
    twice = Counter(r.epoch for r in recs if r.attempt == t.attempt)
    again = sorted(e for e, n in twice.items() if n > 1)
    if again:
        report.violate("curve", f"study {t.study_id} trial {t.number}: epoch(s) {again} recorded more than once "
                                f"under its final attempt {t.attempt}")
