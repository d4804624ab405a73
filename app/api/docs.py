"""The API's interactive page (Swagger UI at /docs), served from the package: it works offline and behind
proxies that block CDNs, as the dashboard does with ECharts (app/web/static/VENDORED.md)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

VENDOR = "/static/vendor"


def install_docs(app: FastAPI) -> None:
    """GET /docs; create the app with docs_url=None so that FastAPI's CDN page is not installed as well."""

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{VENDOR}/swagger-ui.css",
                                   swagger_favicon_url="data:,")  # no icon rather than one from the web
