"""create_app(): routers, error handlers and middleware of the API."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from app import plugins
from app.api import API_PREFIX
from app.api.deps import RateLimiter
from app.api.docs import install_docs
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, LatencyMiddleware
from app.api.routes import datasets, downloads, health, insights, meta, pareto, studies, trials
from app.api.routes.dashboard import install_dashboard
from app.api.streams import StreamLimiter
from app.core.config import Settings, get_settings
from app.core.db import Database
from app.core.metrics import DatabaseMetricsCache


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="hpsearch", version="0.1.0", docs_url=None, redoc_url=None,  # both load a CDN's scripts
                  description="Hyperparameter search for PyTorch: submit studies, watch trials, take models home.")
    app.state.settings = settings
    plugins.configure(settings.plugins)  # validation and predictions know only these plugins
    app.state.db = db or Database(settings.database_url)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.state.stream_limiter = StreamLimiter(settings.max_streams_per_key)
    app.state.metrics_cache = DatabaseMetricsCache(settings.metrics_cache_s)
    api = APIRouter(prefix=API_PREFIX)
    for module in (studies, trials, datasets, meta, pareto, downloads, insights):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health.router)
    install_dashboard(app)  # HTML pages at the root: they sign in from the browser, not with a header
    install_docs(app)  # /docs, with Swagger UI's files from the package
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(LatencyMiddleware)
    return app
