from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import CurrentOwner, DbDep
from app.ml.space import describe_space
from app.models import Trial, TrialState, Worker

router = APIRouter(tags=["meta"])


@router.get("/search-space")
def search_space(_owner: CurrentOwner, model: Literal["mlp", "cnn"] = "mlp") -> dict[str, Any]:
    """The documented hyperparameter space with each entry's default range, condition and source."""
    return {"model": model, "hyperparameters": describe_space(model)}


@router.get("/workers")
def list_workers(_owner: CurrentOwner, db: DbDep) -> dict[str, Any]:
    """Registered workers, their devices, last heartbeat and current trials (ids only, no other owner's data)."""
    with db.read_session() as session:
        workers = session.scalars(select(Worker).where(Worker.stopped_at.is_(None))
                                  .order_by(Worker.started_at)).all()
        running = session.execute(select(Trial.worker_id, Trial.device, Trial.study_id, Trial.number)
                                  .where(Trial.state == TrialState.RUNNING.value)).all()
    data = [{"id": w.id, "hostname": w.hostname, "pid": w.pid, "devices": w.devices, "slots": w.slots,
             "started_at": w.started_at, "heartbeat_at": w.heartbeat_at,
             "running": [{"device": d, "number": n} for wid, d, _s, n in running if wid == w.id]}
            for w in workers]
    return {"data": data, "count": len(data)}
