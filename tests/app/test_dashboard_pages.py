"""The dashboard pages: served at the root without a key, no data inside, a strict CSP, assets offline."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from tests.conftest import make_settings
from tests.factories import client_for, study_spec


@pytest.fixture
def settings(sqlite_url: str, tmp_path: Path) -> Settings:
    """The pages do not depend on the database: SQLite only."""
    return make_settings(sqlite_url, tmp_path / "home")


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


def test_pages_need_no_key_and_hold_no_data(settings: Settings, db: Database) -> None:
    alice = client_for(settings, db)
    study = alice.post("/api/v1/studies", json=study_spec(name="secret-study-name")).json()
    anonymous = TestClient(create_app(settings, db))
    for path in ("/", f"/studies/{study['id']}", "/studies/does-not-exist"):
        page = anonymous.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "secret-study-name" not in page.text and study["id"] not in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
        assert page.headers["referrer-policy"] == "no-referrer"
    assert anonymous.get(f"/api/v1/studies/{study['id']}").status_code == 401  # the data needs the key


def test_every_asset_a_page_names_is_served_from_this_origin(settings: Settings, db: Database) -> None:
    client = TestClient(create_app(settings, db))
    for page in ("/", "/studies/x", "/docs"):  # /docs: Swagger UI's files from the package too
        html = client.get(page).text
        assets = [a for a in re.findall(r'<(?:script|link)[^>]* (?:src|href)="([^"]+)"', html)
                  if not a.startswith("data:")]  # inline, no request
        assert assets and all(a.startswith("/static/") for a in assets)  # no CDN
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200, asset
            if asset.split("?")[0].endswith(".js"):
                assert "javascript" in response.headers["content-type"]
    echarts = client.get("/static/vendor/echarts.min.js")
    assert echarts.status_code == 200 and len(echarts.content) > 500_000
    for module in ("api.js", "charts.js", "study.js", "index.js"):
        imports = re.findall(r'from "\./([^"]+)"', client.get(f"/static/{module}").text)
        assert all(client.get(f"/static/{name}").status_code == 200 for name in imports)


def test_the_pages_send_the_key_in_a_header_never_in_a_url(settings: Settings, db: Database) -> None:
    client = TestClient(create_app(settings, db))
    api = client.get("/static/api.js").text
    assert "Authorization: `Bearer ${key}`" in api and "sessionStorage" in api
    assert "EventSource(" not in api and "?key=" not in api
    study = client.get("/static/study.js").text
    assert "/events" in study and "/history/overview" in study and "/history?after=" in study and "/trials?" in study


def test_pages_are_not_in_the_api_schema(settings: Settings, db: Database) -> None:
    client = TestClient(create_app(settings, db))
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/studies/{study_id}" not in paths
    assert {"/api/v1/studies/{study_id}/events", "/api/v1/studies/{study_id}/importance",
            "/api/v1/studies/{study_id}/trials.csv", "/api/v1/studies/{study_id}/history",
            "/api/v1/studies/{study_id}/curves", "/api/v1/studies/{study_id}/history/overview"} <= set(paths)


def test_the_study_list_says_it_is_loading_before_its_first_answer(settings: Settings, db: Database) -> None:
    """The page as served, before any script ran: a hint in the table's body, not bare headers."""
    html = TestClient(create_app(settings, db)).get("/").text
    body = re.search(r'<table class="data" id="studies-table">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert body is not None and "Loading studies" in body.group(1)


def test_redoc_is_off_rather_than_loading_a_cdn(settings: Settings, db: Database) -> None:
    client = TestClient(create_app(settings, db))
    assert client.get("/redoc").status_code == 404
    assert "cdn." not in client.get("/docs").text
