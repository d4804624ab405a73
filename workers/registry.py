"""The worker registry in SQL: a supervisor registers at start, shows as stopped at its end, and answers
whether the database is there at all. Heartbeats ride on workers.leasing.renew_leases."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from app.core.db import Database, retrying
from app.models import Worker
from app.models.base import utcnow


def ping(db: Database) -> None:
    """Raise unless the database answers."""
    with db.read_session() as session:
        session.execute(select(1))


@retrying
def register_worker(db: Database, *, worker_id: str, hostname: str, pid: int, devices: list[str],
                    slots: int, plugins: list[dict[str, Any]] | None = None) -> None:
    with db.session() as session:
        session.merge(Worker(id=worker_id, hostname=hostname, pid=pid, devices=devices, slots=slots,
                             plugins=plugins or [], started_at=utcnow(), heartbeat_at=utcnow()))


@retrying
def unregister_worker(db: Database, *, worker_id: str) -> None:
    with db.session() as session:
        session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))
