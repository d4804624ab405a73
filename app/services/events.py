"""Live study events read from the database: trial started, epoch reported, trial finished, study status.

There is no in-memory bus: API processes and workers may run on different machines, so every stream polls
the rows of its study. Each event has a place in one total order (event time, kind, trial, attempt, epoch)
and its SSE id encodes that place. A stream only sends events older than `settle_s`, so a row whose
transaction is still committing cannot land behind an id already sent; a reconnect with `Last-Event-ID`
resumes right after that id, without loss or duplicates. A trial's start is stamped when it is claimed
but it has no number until the worker binds its Optuna trial, so no stream sends anything past the claim
of a trial still unbound: its trial_started comes once, in order.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import and_, func, or_, select, tuple_, union
from sqlalchemy.orm import Session

from app.core.db import Database
from app.models import Study, StudyStatus, Trial, TrialEpoch, TrialState
from app.models.base import utcnow
from app.services import studies
from app.services.errors import InvalidInput, NotFound

POLL_INTERVAL_S = 0.5
SETTLE_S = 1.0  # longer than any write transaction takes between stamping a row and committing it
KEEPALIVE_S = 15.0
MAX_STREAM_S = 600.0  # then the client reconnects with Last-Event-ID; keeps connections short-lived
MAX_BATCH = 1000  # events per poll; a client far behind catches up over several polls
RETRY_MS = 2000
_ID = re.compile(r"^(\d{17})-([0-2])-(\d{11})-(\d{3})-(\d{5})$")
_EPOCH_US = datetime(1970, 1, 1, tzinfo=UTC)
STARTED, EPOCH, FINISHED = 0, 1, 2
_UNFINISHED = (TrialState.RUNNING.value, TrialState.WAITING.value, TrialState.PAUSED.value)
_FINISHED = tuple(s.value for s in TrialState if s.is_finished())


@dataclass(frozen=True, order=True)
class Cursor:
    """A place in the event order; every event at or before it has been sent."""

    at_us: int
    kind: int = FINISHED
    trial_id: int = 10**11 - 1
    attempt: int = 999
    epoch: int = 99999

    @classmethod
    def at(cls, moment: datetime) -> Cursor:
        """Just after every event stamped at or before moment."""
        return cls(_micros(moment))

    @classmethod
    def parse(cls, text: str) -> Cursor:
        match = _ID.match(text.strip())
        if match is None:
            raise InvalidInput(("header", "last-event-id"), "not an event id this stream sent")
        return cls(*(int(g) for g in match.groups()))

    def encode(self) -> str:
        """Zero-padded, so ids also sort as strings in event order."""
        return f"{self.at_us:017d}-{self.kind}-{self.trial_id:011d}-{self.attempt:03d}-{self.epoch:05d}"

    @property
    def moment(self) -> datetime:
        return _EPOCH_US + timedelta(microseconds=self.at_us)


@dataclass(frozen=True)
class Event:
    cursor: Cursor
    kind: str
    data: dict[str, Any]


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH_US) // timedelta(microseconds=1)


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite number is sent as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _finite(v) if not isinstance(v, list) else [_finite(x) for x in v] for k, v in data.items()}


# ---- reading events --------------------------------------------------------------------------------------


def events_in_tx(session: Session, study_id: str, *, after: Cursor, until: datetime,
                 limit: int = MAX_BATCH) -> list[Event]:
    """Events of the study after `after` and stamped no later than `until`, in order, at most limit.

    `until` is held back before the claim of any running trial still waiting for its number: its
    trial_started event is stamped at its claim but can only be sent once the number is bound, so no
    cursor may pass the claim before then.
    """
    until = _held_back_in_tx(session, study_id, until)
    since = after.moment
    # An event stamped at or after `since` belongs to a trial that is unfinished now or finished since then:
    # two indexed reads, never a scan of every trial of the study.
    candidate_ids = union(
        select(Trial.id).where(Trial.study_id == study_id, Trial.state.in_(_UNFINISHED)),
        select(Trial.id).where(Trial.study_id == study_id, Trial.finished_at >= since),
    ).subquery()
    trials = session.execute(select(
        Trial.id, Trial.number, Trial.state, Trial.attempt, Trial.worker_id, Trial.device, Trial.started_at,
        Trial.finished_at).where(Trial.id.in_(select(candidate_ids.c.id)), Trial.number.is_not(None))).all()
    events: list[Event] = []
    numbers = {t.id: t.number for t in trials}
    for t in trials:
        if t.started_at is not None and since <= t.started_at <= until:
            events.append(Event(Cursor(_micros(t.started_at), STARTED, t.id, t.attempt, 0), "trial_started",
                                {"number": t.number, "attempt": t.attempt, "worker_id": t.worker_id,
                                 "device": t.device, "started_at": t.started_at.isoformat()}))
        if t.state in _FINISHED and t.finished_at is not None and since <= t.finished_at <= until:
            cursor = Cursor(_micros(t.finished_at), FINISHED, t.id, t.attempt, 0)
            events.append(Event(cursor, "trial_finished", {"number": t.number}))
    events.extend(_epoch_events_in_tx(session, numbers, since=since, until=until, after=after, limit=limit))
    events = sorted((e for e in events if e.cursor > after), key=lambda e: e.cursor)[:limit]
    _fill_finished_in_tx(session, [e for e in events if e.kind == "trial_finished"])
    return events


def _held_back_in_tx(session: Session, study_id: str, until: datetime) -> datetime:
    """`until`, or just before the earliest claim of a running trial that has no number yet."""
    unbound = session.scalar(select(func.min(Trial.started_at)).where(
        Trial.study_id == study_id, Trial.state == TrialState.RUNNING.value, Trial.number.is_(None)))
    if unbound is None or unbound > until:
        return until
    return unbound - timedelta(microseconds=1)


def _epoch_events_in_tx(session: Session, numbers: dict[int, int], *, since: datetime, until: datetime,
                        after: Cursor, limit: int) -> list[Event]:
    out: list[Event] = []
    ids = list(numbers)
    for start in range(0, len(ids), 500):
        rows = session.scalars(select(TrialEpoch).where(
            TrialEpoch.trial_id.in_(ids[start:start + 500]), _epoch_after(after),
            TrialEpoch.created_at <= until,
        ).order_by(TrialEpoch.created_at, TrialEpoch.trial_id, TrialEpoch.attempt, TrialEpoch.epoch)
            .limit(limit + 1)).all()
        for e in rows:
            cursor = Cursor(_micros(e.created_at), EPOCH, e.trial_id, e.attempt, e.epoch)
            if cursor > after:
                out.append(Event(cursor, "epoch", _clean({
                    "number": numbers[e.trial_id], "attempt": e.attempt, "epoch": e.epoch,
                    "train_loss": e.train_loss, "val_loss": e.val_loss, "val_metric": e.val_metric,
                    "learning_rate": e.learning_rate, "seconds": e.seconds})))
    return out


def _epoch_after(after: Cursor) -> Any:
    """Epoch rows strictly after the cursor in event order, as SQL (a keyset, so a page never repeats)."""
    since = after.moment
    if after.kind < EPOCH:
        same_moment = TrialEpoch.created_at == since
    elif after.kind == EPOCH:
        later_row = tuple_(TrialEpoch.trial_id, TrialEpoch.attempt, TrialEpoch.epoch) > (
            after.trial_id, after.attempt, after.epoch)
        same_moment = and_(TrialEpoch.created_at == since, later_row)
    else:
        return TrialEpoch.created_at > since
    return or_(TrialEpoch.created_at > since, same_moment)


def _fill_finished_in_tx(session: Session, finished: list[Event]) -> None:
    """The outcome of each finished trial, read only for the events being sent."""
    if not finished:
        return
    ids = [e.cursor.trial_id for e in finished]
    rows = {t.id: t for t in session.scalars(select(Trial).where(Trial.id.in_(ids)))}
    for event in finished:
        t = rows.get(event.cursor.trial_id)
        if t is not None:
            event.data.update(_clean({
                "attempt": t.attempt, "state": t.state, "value": t.value, "values": t.values,
                "params": t.params or {}, "duration_s": t.duration_s, "epochs_run": t.epochs_run,
                "best_epoch": t.best_epoch, "error": t.error}))


# ---- the stream ------------------------------------------------------------------------------------------


@dataclass
class StreamOptions:
    poll_s: float = POLL_INTERVAL_S
    settle_s: float = SETTLE_S
    keepalive_s: float = KEEPALIVE_S
    max_s: float = MAX_STREAM_S


def start_cursor(db: Database, *, owner: str, study_id: str, last_event_id: str | None,
                 settle_s: float = SETTLE_S) -> Cursor:
    """Where a new stream begins: after Last-Event-ID, else now (the client loaded the past over REST).

    Raises NotFound for a study that is not the owner's, before any byte is streamed.
    """
    studies.get_study(db, owner=owner, study_id=study_id)
    if last_event_id:
        return Cursor.parse(last_event_id)
    return Cursor.at(utcnow() - timedelta(seconds=settle_s))


def format_sse(kind: str, data: dict[str, Any], event_id: str | None = None) -> str:
    lines = [f"event: {kind}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return "\n".join(lines) + "\n\n"


async def stream(db: Database, *, owner: str, study_id: str, cursor: Cursor,
                 options: StreamOptions | None = None) -> AsyncIterator[str]:
    """SSE text: the study's status first, then its events as they happen, until the study has ended.

    Each database read runs in a worker thread. The stream ends after `max_s` (the client reconnects with
    Last-Event-ID), or with an `end` event once the study has ended and every event before its end was sent.
    """
    opts = options or StreamOptions()
    began = last_output = time.monotonic()
    yield f"retry: {RETRY_MS}\n\n"
    status = await anyio.to_thread.run_sync(_status, db, owner, study_id)
    if status is not None:
        yield format_sse("study_status", status["public"])
    while status is not None and time.monotonic() - began < opts.max_s:
        until = utcnow() - timedelta(seconds=opts.settle_s)
        events, state = await anyio.to_thread.run_sync(_poll, db, study_id, cursor, until)
        for event in events:
            yield format_sse(event.kind, event.data, event.cursor.encode())
            cursor = event.cursor
        if events or state != status["state"]:
            status = await anyio.to_thread.run_sync(_status, db, owner, study_id)
            if status is None:
                break
            yield format_sse("study_status", status["public"])
            last_output = time.monotonic()
            if len(events) >= MAX_BATCH:
                continue  # behind: catch up without waiting
        elif _ended(status["public"], until):
            yield format_sse("end", {"reason": status["public"]["status"]})
            return
        if time.monotonic() - last_output >= opts.keepalive_s:
            yield ": keep-alive\n\n"
            last_output = time.monotonic()
        await anyio.sleep(opts.poll_s)
    if status is None:
        yield format_sse("end", {"reason": "deleted"})


def _status(db: Database, owner: str, study_id: str) -> dict[str, Any] | None:
    """The study as GET /studies/{id} shows it (without its spec), and the state _poll compares with."""
    try:
        study = studies.get_study(db, owner=owner, study_id=study_id)
    except NotFound:
        return None
    public = study.model_dump(mode="json", exclude={"spec"})
    progress = public["progress"]
    return {"public": public, "state": (public["status"], progress["running"] + progress["waiting"])}


def _poll(db: Database, study_id: str, cursor: Cursor, until: datetime) -> tuple[list[Event], Any]:
    """New events, and the study's (status, unfinished trials): a status event is due when that changes."""
    with db.read_session() as session:
        status = session.scalar(select(Study.status).where(Study.id == study_id))
        if status is None:
            return [], None
        events = events_in_tx(session, study_id, after=cursor, until=until)
        unfinished = session.scalar(select(func.count()).select_from(Trial).where(
            Trial.study_id == study_id, Trial.state.in_(_UNFINISHED))) or 0
        return events, (status, unfinished)


def _ended(status: dict[str, Any], until: datetime) -> bool:
    """The study has ended, nothing runs, and the settle window has passed its end."""
    if not StudyStatus(status["status"]).is_finished() or status["progress"]["running"]:
        return False
    finished_at = status.get("finished_at")
    return finished_at is None or datetime.fromisoformat(finished_at) <= until
