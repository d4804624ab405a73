from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.config import Settings
from app.core.db import Database
from app.services import keys
from app.services.errors import RateLimited, Unauthorized


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


class RateLimiter:
    """Token bucket per key: `rate` requests per second sustained, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                raise RateLimited((1 - tokens) / self.rate)
            self._buckets[key] = (tokens - 1, now)


# Declares the scheme in the OpenAPI schema; the key is checked below (only ever from this header).
bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="An API key made by `hpsearch keys create --owner NAME`.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def current_owner(request: Request, db: DbDep, settings: SettingsDep, credentials: BearerDep) -> str:
    """The owner of the bearer key; with auth disabled (loopback only) everyone is 'local'.

    Each key has its own rate limit; a request over it is refused before it touches anything else.
    """
    if not settings.auth_enabled:
        return "local"
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("missing bearer API key: send 'Authorization: Bearer <key>'")
    owner = keys.authenticate(db, credentials.credentials.strip())
    request.app.state.rate_limiter.take(owner)
    return owner


CurrentOwner = Annotated[str, Depends(current_owner)]
