"""One asker at a time per study across every worker, for samplers that coordinate through the storage."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.core.db import Database


@contextmanager
def asking_alone(db: Database, study_id: str) -> Iterator[None]:
    """Hold the study's ask lock across every worker while a sampler that coordinates through the storage
    (QMC counts its draws in a study attribute, the grid reads which points are taken) proposes a trial:
    two workers asking at once would be handed the same draw.

    PostgreSQL: a transaction-scoped advisory lock keyed by the study (released at commit, or when the holder
    dies); SQLite: a lock on a file beside the database (its workers share one machine).
    """
    if db.is_sqlite:
        path = make_url(db.url).database
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.ask-lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    key = int.from_bytes(hashlib.sha256(study_id.encode()).digest()[:8], "big", signed=True)
    with db.session() as session:
        # The sampler computes while this transaction sits idle: longer than any ask takes, and a frozen
        # asker still frees the study's other workers in the end.
        session.execute(text("SET LOCAL idle_in_transaction_session_timeout = '5min'"))
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield
