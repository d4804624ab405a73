"""A supervisor's connection pool grows with its slots: each slot writes every epoch of its trials."""

from __future__ import annotations

import pytest

from app.core.db import Database
from workers.supervisor import database_pool_size


@pytest.mark.postgres
def test_every_slot_the_heartbeat_and_the_reaper_hold_a_pooled_connection_at_once(postgres_url: str) -> None:
    db = Database(postgres_url, pool_size=database_pool_size(8))
    try:
        held = [db.engine.connect() for _ in range(8 + 2)]  # 8 slots, the heartbeat, the reaper
        # All inside the pool: none is an overflow connection opened and closed per use.
        assert db.engine.pool.checkedout() == 10 and db.engine.pool.overflow() <= 0
        for conn in held:
            conn.close()
    finally:
        db.engine.dispose()


@pytest.mark.postgres
def test_a_workers_optuna_storage_keeps_a_connection_per_slot_too(postgres_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core import optuna_store

    monkeypatch.setitem(optuna_store._pool, "size", 2)  # restored after: other processes keep the default
    optuna_store.size_pool(database_pool_size(8))  # as `hpsearch worker` does for 8 slots
    optuna_store.optuna_storage.cache_clear()
    engine = optuna_store.optuna_storage(postgres_url).engine
    try:
        held = [engine.connect() for _ in range(8 + 2)]
        assert engine.pool.checkedout() == 10 and engine.pool.overflow() <= 0
        for conn in held:
            conn.close()
    finally:
        engine.dispose()
        optuna_store.optuna_storage.cache_clear()
