"""The reaper: fails or re-queues the leases of dead workers and of trials past their deadline.

It runs in every worker supervisor and in the API process (`hpsearch serve`), so leases are judged even
when no worker is left.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from app.core.db import RETRY_MAX_DELAY_S, Database, is_transient
from app.core.optuna_store import optuna_storage
from workers import checkpoint_sweep, optuna_sync, registry, retries

log = logging.getLogger("hpsearch.worker")


def reap_and_tell(db: Database, grace_s: float, artifact_dir: Path | None = None) -> list[retries.Reaped]:
    """Reap stale leases and fail their Optuna trials (a retry gets a fresh one with the same parameters). A
    trial reaped for good (failed, or its study ended) loses its checkpoint files, which its dead worker could
    not delete (`artifact_dir`: where they are; None: a later sweep of the study deletes them)."""
    reaped = retries.reap(db, grace_s=grace_s)
    storage = optuna_storage(db.url) if reaped else None
    for r in reaped:
        log.warning("reaped trial %s of study %s: %s%s", r.number, r.study_id, r.reason,
                    " (re-queued)" if r.requeued else "")
        optuna_sync.tell(storage, r.tells)  # over either way: a retry runs as a fresh Optuna trial
        if artifact_dir is not None and not r.requeued and r.number is not None:
            checkpoint_sweep.sweep(db, artifact_dir, r.study_id, r.number)
    return reaped


class Reaper:
    """Calls reap_and_tell each tick, but never right after its own database outage.

    An outage stops every heartbeat, so when the database comes back every lease looks stale. A reaper
    that could not reach the database waits one grace period after reaching it again before judging
    anyone, which gives the live workers, cut off by the same outage, time to beat again.
    """

    def __init__(self, db: Database, grace_s: float, artifact_dir: Path | None = None) -> None:
        self.db, self.grace_s, self.artifact_dir = db, grace_s, artifact_dir
        self._resume_at = 0.0
        self._cut_off = False

    @property
    def interval_s(self) -> float:
        return max(1.0, self.grace_s / 4)

    def tick(self) -> list[retries.Reaped]:
        try:
            if self._cut_off or time.monotonic() < self._resume_at:
                registry.ping(self.db)
                if self._cut_off:  # back: give workers a grace period, plus their longest retry pause
                    self._cut_off = False
                    self._resume_at = time.monotonic() + self.grace_s + RETRY_MAX_DELAY_S
                return []
            return reap_and_tell(self.db, self.grace_s, self.artifact_dir)
        except Exception:
            self._cut_off = True
            raise

    def run(self, stop: threading.Event, interval_s: float, logger: Any = log) -> None:
        """Tick every interval_s until stop is set, through any database outage."""
        while not stop.wait(interval_s):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - keep reaping through database outages
                if is_transient(exc):  # an outage: expected, said in one line as the other loops say it
                    logger.warning("reaping failed: the database is unreachable (%s); retrying",
                                   type(exc).__name__)
                else:
                    logger.exception("reaping failed; retrying")
