"""Factories for tests: specs, studies, keys and API clients, supervisors and worker processes, upload files."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from app.api import API_PREFIX as API  # the short name reads well inside URL f-strings
from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.schemas.study import StudySpec
from app.services import keys, studies

# ------------------------------------------------------------------------------------------- specs, studies


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


def _spec_or_default(spec: dict[str, Any] | None, overrides: dict[str, Any]) -> dict[str, Any]:
    if spec is not None and overrides:
        raise TypeError("give a whole spec or overrides of the default one, not both")
    return spec if spec is not None else study_spec(**overrides)


def post_study(client: TestClient, spec: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """POST a study (spec, else study_spec(**overrides)) and return the 201 reply's body."""
    response = client.post(f"{API}/studies", json=_spec_or_default(spec, overrides))
    assert response.status_code == 201, response.text
    return dict(response.json())


def create_study_via_api(client: TestClient, spec: dict[str, Any] | None = None, **overrides: Any) -> str:
    """The id of a study created through the API, as a user creates one."""
    return str(post_study(client, spec, **overrides)["id"])


def create_study_via_service(db: Database, settings: Settings, *, owner: str = "alice",
                             spec: dict[str, Any] | None = None, **overrides: Any) -> str:
    """The id of a study created by the service alone, for tests that need no HTTP client."""
    parsed = StudySpec.model_validate(_spec_or_default(spec, overrides))
    return str(studies.create_study(db, settings, owner=owner, spec=parsed)[0].id)


def wait_for_status(client: TestClient, study_id: str, statuses: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        study = client.get(f"{API}/studies/{study_id}").json()
        if study["status"] in statuses:
            return study
        time.sleep(0.2)
    raise AssertionError(f"study {study_id} still {study['status']} after {timeout_s}s: {study['progress']}")


# -------------------------------------------------------------------------------------------- keys, clients


def auth_headers(db: Database, owner: str = "alice") -> dict[str, str]:
    """The Authorization header of a new API key for owner."""
    return {"Authorization": f"Bearer {keys.create_key(db, owner=owner)}"}


def client_for(settings: Settings, db: Database, owner: str = "alice") -> TestClient:
    """An in-process API client signed in with a new key of owner's."""
    client = TestClient(create_app(settings, db))
    client.headers.update(auth_headers(db, owner))
    return client


# ----------------------------------------------------------------------------- supervisors, worker processes

HEARTBEAT_S = 0.3
GRACE_S = 2.0
FAST_LEASES = {"HPSEARCH_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S), "HPSEARCH_LEASE_GRACE_S": str(GRACE_S)}
# Process tests run many workers on two shared cores, each sized for the whole machine. Spinning OpenMP
# threads then slow every trial several times over; sleeping ones keep the tests' timings honest.
SHARED_CORES = {"OMP_WAIT_POLICY": "PASSIVE"}


@contextmanager
def running_supervisor(settings: Settings, db: Database, *, slots: int = 2, shutdown_grace_s: float = 5.0,
                       fuse: int = 1) -> Iterator[Any]:
    """A real supervisor (forked trial runners) serving in a background thread."""
    from workers.supervisor import Supervisor

    supervisor = Supervisor(db, settings, devices=["cpu"], per_device=slots, shutdown_grace_s=shutdown_grace_s,
                            fuse=fuse)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        yield supervisor
    finally:
        supervisor.stop()
        thread.join(60)


def process_env(settings: Settings, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an `hpsearch` subprocess on the test database: short heartbeats and grace, JSON logs."""
    return {**os.environ, "HPSEARCH_DATABASE_URL": settings.database_url, "HPSEARCH_HOME": str(settings.home),
            "HPSEARCH_MNIST_DIR": str(settings.mnist_dir or ""), "HPSEARCH_LOG_JSON": "true", **FAST_LEASES,
            **SHARED_CORES, **(extra_env or {})}


def start_worker(settings: Settings, log_path: Path, *, per_device: int = 1,
                 extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """`hpsearch worker --devices cpu` with short heartbeats and grace, JSON logs into log_path."""
    out = open(log_path, "wb")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--devices", "cpu", "--per-device",
                             str(per_device), *args], env=process_env(settings, extra_env), stdout=out,
                            stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------------------------ upload files


def csv_bytes(header: list[str], rows: list[list[object]]) -> bytes:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def flower_csv(n: int = 30) -> bytes:
    """Four numeric features and string labels, three classes."""
    rng = np.random.default_rng(0)
    labels = ["setosa", "virginica", "versicolor"]
    rows = [[*np.round(rng.normal(size=4), 3), labels[i % 3]] for i in range(n)]
    return csv_bytes(["sl", "sw", "pl", "pw", "species"], rows)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def small_idx(n: int = 20) -> tuple[bytes, bytes]:
    """An IDX image file of n 5x4 images and its label file, three classes."""
    rng = np.random.default_rng(1)
    return idx_images(rng.integers(0, 256, (n, 5, 4))), idx_labels(np.arange(n) % 3)


class Payload:
    """Any object, to pickle."""

    def __init__(self) -> None:
        self.value = [1, 2, 3]
