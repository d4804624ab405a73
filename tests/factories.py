"""Factories for tests: specs, owners with keys, API clients, in-process supervisors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.services import keys


def study_spec(**overrides: Any) -> dict[str, Any]:
    """A small digits MLP study that finishes in seconds on a CPU."""
    spec: dict[str, Any] = {
        "name": "digits-mlp",
        "dataset": "builtin:digits",
        "model": "mlp",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "search_space": {"learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                         "optimizer": "adam", "units": {"type": "int", "low": 32, "high": 64},
                         "n_layers": {"type": "int", "low": 1, "high": 2}},
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 3, "epochs": 3, "max_parallel": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def client_for(settings: Settings, db: Database, owner: str = "alice") -> TestClient:
    client = TestClient(create_app(settings, db))
    client.headers["Authorization"] = f"Bearer {keys.create_key(db, owner=owner)}"
    return client


@contextmanager
def running_supervisor(settings: Settings, db: Database, *, slots: int = 2) -> Iterator[Any]:
    """A real supervisor (forked trial runners) serving in a background thread."""
    from workers.supervisor import Supervisor

    supervisor = Supervisor(db, settings, devices=["cpu"], per_device=slots, shutdown_grace_s=5.0)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        yield supervisor
    finally:
        supervisor.stop()
        thread.join(60)


def wait_for_status(client: TestClient, study_id: str, statuses: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        study = client.get(f"/api/v1/studies/{study_id}").json()
        if study["status"] in statuses:
            return study
        time.sleep(0.2)
    raise AssertionError(f"study {study_id} still {study['status']} after {timeout_s}s: {study['progress']}")


def worker_process(settings: Settings, *, per_device: int = 1, extra_env: dict[str, str] | None = None,
                   log_path: Any = None) -> Any:
    """A real `hpsearch worker` subprocess against the test database."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HPSEARCH_DATABASE_URL": settings.database_url, "HPSEARCH_HOME": str(settings.home),
           "HPSEARCH_MNIST_DIR": str(settings.mnist_dir or ""), "HPSEARCH_HEARTBEAT_INTERVAL_S": "0.5",
           "HPSEARCH_LEASE_GRACE_S": str(settings.lease_grace_s), "HPSEARCH_LOG_JSON": "true",
           **(extra_env or {})}
    out = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115 - closed by caller
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--devices", "cpu", "--per-device",
                             str(per_device)], env=env, stdout=out, stderr=subprocess.STDOUT)
