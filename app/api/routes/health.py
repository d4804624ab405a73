from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text

from app.api.deps import DbDep
from app.core import metrics

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


DATABASE_DOWN = {503: {"description": "The database is unreachable; retry after `Retry-After` seconds."}}


@router.get("/readyz", responses={503: {"description": "The database is unreachable."}})
def readyz(db: DbDep) -> Response:
    try:
        with db.read_session() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any database failure means not ready
        return JSONResponse({"status": "unavailable", "detail": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}, **DATABASE_DOWN})
def prometheus_metrics(db: DbDep, request: Request) -> Response:
    body, content_type = metrics.render(db, request.app.state.metrics_cache)
    return Response(body, media_type=content_type)
