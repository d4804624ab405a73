from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from app import plugins
from app.api.deps import CurrentOwner, DbDep
from app.ml.space import SpaceError, describe_space
from app.models import Study, Trial, TrialState, Worker
from app.services.errors import InvalidInput

router = APIRouter(tags=["meta"])


@router.get("/search-space")
def search_space(_owner: CurrentOwner, model: Annotated[str, Query(max_length=64)] = "mlp") -> dict[str, Any]:
    """The documented hyperparameter space (of mlp, cnn or an enabled model plugin) with each entry's default
    range, condition and source."""
    try:
        return {"model": model, "hyperparameters": describe_space(model, plugins.table_for(model))}
    except SpaceError as exc:
        raise InvalidInput(("query", "model"), exc.message) from exc


@router.get("/workers")
def list_workers(owner: CurrentOwner, db: DbDep) -> dict[str, Any]:
    """Registered workers (shared by every owner): devices, slots, heartbeat, and which of the caller's
    trials each one runs. Other owners' trials only count towards `busy`, so nothing of theirs shows.
    Hostname and pid are the operator's, and already part of a worker's id."""
    with db.read_session() as session:
        workers = session.scalars(select(Worker).where(Worker.stopped_at.is_(None))
                                  .order_by(Worker.started_at)).all()
        running = session.execute(select(Trial.worker_id, Trial.device, Trial.study_id, Trial.number, Study.owner)
                                  .join(Study, Study.id == Trial.study_id)
                                  .where(Trial.state == TrialState.RUNNING.value)).all()
    data = [{"id": w.id, "hostname": w.hostname, "pid": w.pid, "devices": w.devices, "slots": w.slots,
             "plugins": w.plugins or [],
             "started_at": w.started_at, "heartbeat_at": w.heartbeat_at,
             "busy": sum(1 for wid, *_ in running if wid == w.id),
             "running": [{"device": d, "study_id": sid, "number": n}
                         for wid, d, sid, n, who in running if wid == w.id and who == owner]}
            for w in workers]
    return {"data": data, "count": len(data)}
