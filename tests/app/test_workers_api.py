"""GET /api/v1/workers and `hpsearch workers`: live supervisors, their devices, slots and current trials."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from tests.conftest import make_settings
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status

HPSEARCH = Path(sys.executable).with_name("hpsearch")
LONG_STUDY = study_spec(budget={"n_trials": 4, "epochs": 500, "patience": None, "max_parallel": 1})


def _wait_for_running_trial(client: TestClient, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = client.get(f"{API}/workers").json()["data"]
        if workers and workers[0]["running"] and workers[0]["running"][0]["number"] is not None:
            return dict(workers[0])  # the trial got its number (and parameters) from Optuna
        time.sleep(0.1)
    raise AssertionError(f"no running trial after {timeout_s}s")


def test_workers_lists_live_supervisors_with_their_trials(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    assert client.get(f"{API}/workers").json() == {"data": [], "count": 0}
    sid = create_study_via_api(client, LONG_STUDY)
    with running_supervisor(settings, db, slots=2) as supervisor:
        worker = _wait_for_running_trial(client)
        assert worker["id"] == supervisor.worker_id and worker["hostname"] == socket.gethostname()
        assert worker["devices"] == ["cpu"] and worker["slots"] == 2 and worker["pid"] == os.getpid()
        # max_parallel 1: one trial at a time
        assert worker["running"] == [{"device": "cpu", "study_id": sid, "number": 0}] and worker["busy"] == 1
        assert worker["heartbeat_at"] >= worker["started_at"]
        client.post(f"{API}/studies/{sid}/cancel")
        wait_for_status(client, sid, {"cancelled"})
    assert client.get(f"{API}/workers").json()["count"] == 0  # a stopped supervisor unregisters
    assert TestClient(client.app).get(f"{API}/workers").status_code == 401


def _running(client: TestClient, study_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The one worker, once it runs a numbered trial of study_id that this client can see."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker = client.get(f"{API}/workers").json()["data"][0]
        if any(r["study_id"] == study_id and r["number"] is not None for r in worker["running"]):
            return dict(worker)
        time.sleep(0.1)
    raise AssertionError(f"no running trial of {study_id} after {timeout_s}s")


def test_workers_show_each_owner_only_their_own_trials(settings: Settings, db: Database) -> None:
    """Workers are shared; which studies they run is not: another owner's trials only count as busy slots."""
    alice, bob, carol = (client_for(settings, db, name) for name in ("alice", "bob", "carol"))
    mine = create_study_via_api(alice, LONG_STUDY)
    theirs = create_study_via_api(bob, LONG_STUDY)
    with running_supervisor(settings, db, slots=2):
        _running(alice, mine)
        seen_by_bob = _running(bob, theirs)
        seen_by_alice, seen_by_carol = (c.get(f"{API}/workers").json()["data"][0] for c in (alice, carol))
        for client, sid in ((alice, mine), (bob, theirs)):
            client.post(f"{API}/studies/{sid}/cancel")
            wait_for_status(client, sid, {"cancelled"})
    assert seen_by_alice["running"] == [{"device": "cpu", "study_id": mine, "number": 0}]
    assert seen_by_bob["running"] == [{"device": "cpu", "study_id": theirs, "number": 0}]
    assert seen_by_carol["running"] == []
    assert seen_by_alice["busy"] == seen_by_bob["busy"] == seen_by_carol["busy"] == 2
    assert seen_by_alice["slots"] == seen_by_carol["slots"] == 2  # the infrastructure itself stays visible
    assert theirs not in str(seen_by_alice) and mine not in str(seen_by_bob) + str(seen_by_carol)


@contextmanager
def _serving(app: FastAPI) -> Iterator[str]:
    """The app on a real port, so that the command line client talks HTTP to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _hpsearch_workers(url: str, key: str, cwd: Path) -> str:
    env = {**os.environ, "HPSEARCH_API_URL": url, "HPSEARCH_API_KEY": key}
    result = subprocess.run([str(HPSEARCH), "workers"], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_hpsearch_workers_command(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    key = client.headers["Authorization"].removeprefix("Bearer ")
    sid = create_study_via_api(client, LONG_STUDY)
    with _serving(client.app) as url:  # type: ignore[arg-type]
        with running_supervisor(settings, db, slots=1) as supervisor:
            _wait_for_running_trial(client)
            out = _hpsearch_workers(url, key, tmp_path)
            client.post(f"{API}/studies/{sid}/cancel")
            wait_for_status(client, sid, {"cancelled"})
        assert supervisor.worker_id in out and "devices cpu" in out and "slots 1" in out
        assert "trial 0 on cpu" in out
        assert _hpsearch_workers(url, key, tmp_path).strip() == "no live workers"
    db.dispose()
