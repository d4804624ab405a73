"""Optuna's RDB storage in the service's own database, so optuna-dashboard opens every study."""

from __future__ import annotations

from functools import lru_cache

import optuna
from optuna.storages import RDBStorage

from app.core.db import SQLITE_BUSY_TIMEOUT_S, is_sqlite

optuna.logging.set_verbosity(optuna.logging.WARNING)

_pool = {"size": 2}  # connections a PostgreSQL storage keeps (and as many more at a peak)


def size_pool(connections: int) -> None:
    """How many connections this process's storages keep, set before the first is made: a worker keeps one
    per slot and two, as its own pool (every slot's thread reports to Optuna at each epoch)."""
    _pool["size"] = max(1, connections)


@lru_cache(maxsize=8)
def optuna_storage(url: str) -> RDBStorage:
    """One storage per URL and process; creating it also creates Optuna's tables when missing."""
    if is_sqlite(url):
        kwargs: dict[str, object] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    else:
        kwargs = {"pool_pre_ping": True, "pool_size": _pool["size"], "max_overflow": _pool["size"]}
    return RDBStorage(url, engine_kwargs=kwargs)
