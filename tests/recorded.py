"""Facts read back from what the database recorded, for tests that must not sample while things run."""

from __future__ import annotations

from sqlalchemy import select

from app.core.db import Database
from app.models import Trial


def peak_running(db: Database, study_id: str) -> int:
    """The most trials of the study that were running at one moment, from their recorded intervals.

    A claim stamps started_at and a finish stamps finished_at inside the transaction that holds the study's
    lock, so an interval that ended before a claim's check has finished_at before that claim's started_at:
    the overlap of the intervals is what the claims saw. Each trial's last attempt is counted.
    """
    with db.read_session() as session:
        rows = session.execute(select(Trial.started_at, Trial.finished_at)
                               .where(Trial.study_id == study_id, Trial.started_at.is_not(None))).all()
    # At one moment a finish counts before a start: [started_at, finished_at) intervals.
    moves = sorted([(r.started_at, 1) for r in rows] + [(r.finished_at, -1) for r in rows if r.finished_at],
                   key=lambda m: (m[0], m[1]))
    peak = running = 0
    for _at, step in moves:
        running += step
        peak = max(peak, running)
    return peak
