from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, Path, Request
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
# Bounded to the column's range: a longer number is a 422 here, not an OverflowError in the database driver.
TrialNumber = Annotated[int, Path(ge=0, le=2**31 - 1, description="The trial's number in its study.")]


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

    Each key has its own rate limit (keyed by its hash, so two keys of one owner do not share a bucket); a
    request over it is refused before it touches anything else. Unknown keys get no bucket: 401 first.
    """
    if not settings.auth_enabled:
        request.state.key_id = "local"
        return "local"
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("missing bearer API key: send 'Authorization: Bearer <key>'")
    key = credentials.credentials.strip()
    owner = keys.authenticate(db, key)
    request.state.key_id = keys.hash_key(key)  # what per-key limits count by
    request.app.state.rate_limiter.take(request.state.key_id)
    return owner


CurrentOwner = Annotated[str, Depends(current_owner)]
