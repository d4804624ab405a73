"""Helpers for tests that run real `hpsearch` processes: start them, find their runners, read their logs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import optuna
from sqlalchemy import func, select

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.models import Study, Trial, TrialEpoch, TrialState

# Worker processes and their timings are made in tests.factories; the names stay importable from here.
from tests.factories import FAST_LEASES as FAST_LEASES
from tests.factories import GRACE_S as GRACE_S
from tests.factories import HEARTBEAT_S as HEARTBEAT_S
from tests.factories import SHARED_CORES as SHARED_CORES
from tests.factories import process_env, study_spec
from tests.factories import start_worker as start_worker

T = TypeVar("T")


def training_spec(epochs: int, **budget: Any) -> dict[str, Any]:
    """A digits study whose trials train for about a tenth of a second per epoch (batches of 16), so a test
    that waits for trials mid-training still finds them training when it acts."""
    spec = study_spec(budget={"epochs": epochs, "patience": None, **budget})
    spec["search_space"] = {**spec["search_space"], "batch_size": 16}
    return spec


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll until predicate() is truthy; return its value, or fail naming what never happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    """SIGTERM whatever still runs, then SIGKILL what did not exit in time."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list the test appends its processes to; every one is stopped at the end, pass or fail."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        stop_all(procs)


def children_of(pid: int) -> list[int]:
    """Direct child processes of pid (its forked trial runners), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def trials_of(db: Database, study_id: str) -> list[Trial]:
    with db.read_session() as session:
        return list(session.scalars(select(Trial).where(Trial.study_id == study_id).order_by(Trial.id)))


def running_with_epochs(db: Database, study_id: str, at_least: int) -> list[Trial]:
    """The running trials that have reported at least one epoch, when there are at_least of them."""
    with db.read_session() as session:
        rows = list(session.scalars(select(Trial).where(
            Trial.study_id == study_id, Trial.state == TrialState.RUNNING.value,
            select(func.count()).select_from(TrialEpoch).where(TrialEpoch.trial_id == Trial.id,
                                                               TrialEpoch.attempt == Trial.attempt)
            .scalar_subquery() > 0)))
    return rows if len(rows) >= at_least else []


def study_status(db: Database, study_id: str) -> str:
    with db.read_session() as session:
        return str(session.scalar(select(Study.status).where(Study.id == study_id)))


def optuna_trials(db: Database, study_id: str) -> list[optuna.trial.FrozenTrial]:
    with db.read_session() as session:
        name = session.scalar(select(Study.optuna_name).where(Study.id == study_id))
    return optuna.load_study(study_name=name, storage=optuna_storage(db.url)).get_trials(deepcopy=False)


def assert_study_settled(db: Database, study_id: str, n_trials: int) -> list[Trial]:
    """Exactly n_trials finished, one row per number, nothing RUNNING or waiting here or in Optuna."""
    rows = trials_of(db, study_id)
    assert [r.state for r in rows if not TrialState(r.state).is_finished()] == [], rows
    assert len(rows) == n_trials, [(r.number, r.state) for r in rows]
    assert len({r.number for r in rows}) == n_trials
    by_id = {t._trial_id: t for t in optuna_trials(db, study_id)}
    assert [t.number for t in by_id.values() if t.state == optuna.trial.TrialState.RUNNING] == []
    for r in rows:  # our record and Optuna's agree (a retried row points at its latest Optuna trial)
        assert r.optuna_trial_id is not None
        theirs = by_id[r.optuna_trial_id].state
        assert theirs.name.lower() == r.state, (r.number, r.state, theirs)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(settings: Settings, log_path: Path, *, port: int,
              extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`hpsearch serve --workers 0` (API and reaper, no trial slots); returns once /readyz answers."""
    env = process_env(settings, {"HPSEARCH_RATE_LIMIT_PER_S": "100000", "HPSEARCH_RATE_LIMIT_BURST": "100000",
                          **(extra_env or {})})
    out = open(log_path, "wb")  # noqa: SIM115 - the child process owns it
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "0", "--port", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, "the API to answer /readyz", interval_s=0.2)
    return proc
