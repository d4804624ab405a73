"""What the dashboard reads besides the trial pages: importance, live events, CSV, history, curves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import CurrentOwner, DbDep, SettingsDep
from app.api.streams import HeldStreamingResponse
from app.schemas.insights import CurvesPublic, HistoryPublic, ImportancePublic, RungsPublic
from app.schemas.overview import HistoryOverviewPublic
from app.services import events, exports, importance, rungs
from app.services import history as history_overview

router = APIRouter(prefix="/studies/{study_id}", tags=["insights"])
NUMBERS_PATTERN = r"^\d{1,9}(,\d{1,9}){0,59}$"


@router.get("/importance", response_model=ImportancePublic)
def get_importance(study_id: str, owner: CurrentOwner, db: DbDep, settings: SettingsDep) -> ImportancePublic:
    """Parameter importance (fANOVA; PED-ANOVA past 1,000 complete trials), cached until a trial finishes."""
    return importance.param_importance(db, settings, owner=owner, study_id=study_id)


@router.get("/rungs", response_model=RungsPublic)
def get_rungs(study_id: str, owner: CurrentOwner, db: DbDep) -> RungsPublic:
    """Where the study's scheduler pauses trials (ASHA's rungs, PBT's boundaries): per epoch, how many trials
    reached it, wait paused there, and went on past it; an empty list without a scheduler."""
    return rungs.study_rungs(db, owner=owner, study_id=study_id)


@router.get("/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "trial_started, epoch, trial_finished, study_status, end"}})
def stream_events(study_id: str, owner: CurrentOwner, db: DbDep, request: Request,
                  last_event_id: Annotated[str | None, Header(max_length=64)] = None) -> StreamingResponse:
    """Server-Sent Events of the study; send Last-Event-ID to resume after a disconnect."""
    # Tests may set shorter poll and settle intervals on app.state.
    options = getattr(request.app.state, "event_stream_options", None) or events.StreamOptions()
    cursor = events.start_cursor(db, owner=owner, study_id=study_id, last_event_id=last_event_id,
                                 settle_s=options.settle_s)
    release = request.app.state.stream_limiter.acquire(request.state.key_id)  # 429 beyond the key's limit
    body = events.stream(db, owner=owner, study_id=study_id, cursor=cursor, options=options)
    return HeldStreamingResponse(body, media_type="text/event-stream", release=release,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/trials.csv", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}}, "description": "every trial, params as columns"}})
def trials_csv(study_id: str, owner: CurrentOwner, db: DbDep, settings: SettingsDep) -> StreamingResponse:
    chunks = exports.trials_csv(db, settings, owner=owner, study_id=study_id)
    disposition = f'attachment; filename="study-{study_id}-trials.csv"'
    return StreamingResponse(chunks, media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": disposition})


@router.get("/history", response_model=HistoryPublic)
def get_history(study_id: str, owner: CurrentOwner, db: DbDep,
                after: Annotated[int, Query(ge=-1, le=10**9)] = -1,
                limit: Annotated[int, Query(ge=1, le=exports.HISTORY_PAGE)] = exports.HISTORY_PAGE,
                ) -> HistoryPublic:
    """Trials numbered after `after`, in columns (compact for plots of every trial)."""
    return exports.history(db, owner=owner, study_id=study_id, after=after, limit=limit)


@router.get("/history/overview", response_model=HistoryOverviewPublic)
def get_history_overview(study_id: str, owner: CurrentOwner, db: DbDep,
                         points: Annotated[int, Query(ge=100, le=history_overview.MAX_POINTS)] = (
                             history_overview.MAX_POINTS),
                         top: Annotated[int, Query(ge=0, le=history_overview.MAX_TOP)] = history_overview.MAX_TOP,
                         ) -> HistoryOverviewPublic:
    """Finished trials' points (downsampled past `points`), the exact best-so-far line, the `top` best trials."""
    return history_overview.overview(db, owner=owner, study_id=study_id, max_points=points, top=top)


@router.get("/curves", response_model=CurvesPublic)
def get_curves(study_id: str, owner: CurrentOwner, db: DbDep,
               numbers: Annotated[str | None, Query(max_length=600, pattern=NUMBERS_PATTERN)] = None,
               top: Annotated[int, Query(ge=0, le=exports.MAX_CURVES)] = 0,
               recent: Annotated[int, Query(ge=0, le=exports.MAX_CURVES)] = 0) -> CurvesPublic:
    """Per-epoch curves of the listed trials, the `top` best and the `recent` latest finished."""
    wanted = [int(n) for n in numbers.split(",")] if numbers else []
    return exports.curves(db, owner=owner, study_id=study_id, numbers=wanted, top=top, recent=recent)
