"""Optuna's RDB storage in the service's own database, so optuna-dashboard opens every study."""

from __future__ import annotations

from functools import lru_cache

import optuna
from optuna.storages import RDBStorage

from app.core.db import SQLITE_BUSY_TIMEOUT_S, is_sqlite

optuna.logging.set_verbosity(optuna.logging.WARNING)


@lru_cache(maxsize=8)
def optuna_storage(url: str) -> RDBStorage:
    """One storage per URL and process; creating it also creates Optuna's tables when missing."""
    if is_sqlite(url):
        kwargs: dict[str, object] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    else:
        kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4}
    return RDBStorage(url, engine_kwargs=kwargs)
