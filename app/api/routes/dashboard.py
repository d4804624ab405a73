"""The dashboard's HTML pages and static files, served by the API process.

The pages carry no data: their scripts sign in from the browser (key from a field or the URL fragment,
kept in sessionStorage) and call the JSON API with the Authorization header. So the pages need no key
themselves, and a strict Content-Security-Policy allows only this origin's scripts.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
STATIC_PREFIX = "/static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class RevalidatedStaticFiles(StaticFiles):
    """Browsers check back before each use (a cheap 304 by ETag): the pages' module imports carry no version,
    so without this a browser could keep running an old script after an upgrade."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


@lru_cache(maxsize=1)
def _asset_version() -> str:
    """A digest of the static files: asset URLs change with any file, so browsers never run stale code."""
    digest = hashlib.sha256()
    for path in sorted((WEB_DIR / "static").rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@lru_cache(maxsize=4)
def _page(name: str) -> str:
    return (WEB_DIR / "templates" / name).read_text(encoding="utf-8").replace("{{version}}", _asset_version())


@router.get("/", response_class=HTMLResponse)
def studies_page() -> HTMLResponse:
    return HTMLResponse(_page("index.html"), headers=SECURITY_HEADERS)


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(study_id: str) -> HTMLResponse:
    return HTMLResponse(_page("study.html"), headers=SECURITY_HEADERS)


def install_dashboard(app: FastAPI) -> None:
    """Pages at the root (not under /api/v1) and the scripts, styles and vendored charting library."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, RevalidatedStaticFiles(directory=WEB_DIR / "static"), name="static")
