"""The real service in subprocesses: `hpsearch serve` on a temporary SQLite home, driven over REST."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import MNIST_DIR, ROOT, SearchResult, TrialRecord, seconds_since

API = "/api/v1"
FINISHED = {"completed", "cancelled", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(home: Path, database_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HPSEARCH_HOME": str(home), "HPSEARCH_MNIST_DIR": str(MNIST_DIR),
           "HPSEARCH_RATE_LIMIT_PER_S": "10000", "HPSEARCH_RATE_LIMIT_BURST": "10000",
           "HPSEARCH_LOG_JSON": "false", "PYTHONUNBUFFERED": "1", **extra}
    if database_url:
        env["HPSEARCH_DATABASE_URL"] = database_url
    return env


def hpsearch(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT, text=True,
                          capture_output=True, check=True, **kwargs)


class Service:
    """A running `hpsearch serve` (API + embedded worker, or API only plus separate `hpsearch worker`s)."""

    def __init__(self, home: Path, port: int, env: dict[str, str], key: str, procs: list[subprocess.Popen[str]],
                 log: Path) -> None:
        self.home, self.port, self.env, self.log = home, port, env, log
        self.procs = procs
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}{API}",
                                 headers={"Authorization": f"Bearer {key}"}, timeout=60)

    @property
    def server_pid(self) -> int:
        return self.procs[0].pid

    def wait_for_workers(self, count: int, timeout_s: float = 120.0) -> None:
        """Block until `count` workers registered: their start (importing torch) is not the study's time."""
        deadline = time.monotonic() + timeout_s
        while len(self.http.get("/workers").json()["data"]) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} worker(s) did not register in {timeout_s:.0f}s; see {self.log}")
            time.sleep(0.3)

    def submit(self, spec: dict[str, Any]) -> tuple[str, datetime]:
        """POST the study; returns its id and the moment just before the request left."""
        submitted = datetime.now(UTC)
        response = self.http.post("/studies", json=spec)
        response.raise_for_status()
        return str(response.json()["id"]), submitted

    def study(self, study_id: str) -> dict[str, Any]:
        response = self.http.get(f"/studies/{study_id}")
        response.raise_for_status()
        return dict(response.json())

    def wait(self, study_id: str, timeout_s: float, poll_s: float = 1.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            study = self.study(study_id)
            if study["status"] in FINISHED or time.monotonic() > deadline:
                return study
            time.sleep(poll_s)

    def trials(self, study_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = self.http.get(f"/studies/{study_id}/trials", params=params).json()
            out += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def upload_npz(self, name: str, x: Any, y: Any) -> str:
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, X=x, y=y)
        response = self.http.post("/datasets", data={"kind": "npz", "name": name, "task": "classification"},
                                  files={"file": ("data.npz", buf.getvalue(), "application/octet-stream")})
        response.raise_for_status()
        return str(response.json()["id"])

    def result(self, name: str, study_id: str, submitted: datetime, budget_s: float, wall_s: float,
               **extra: Any) -> SearchResult:
        records = [TrialRecord(t["number"], t["state"], t["value"], seconds_since(submitted, t["started_at"]),
                               seconds_since(submitted, t["finished_at"]), t["epochs_run"])
                   for t in self.trials(study_id) if t["finished_at"] is not None]
        return SearchResult(name, budget_s, records, wall_s, extra)


def _wait_healthy(port: int, procs: list[subprocess.Popen[str]], log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"the service exited early; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the service did not answer /healthz in {timeout_s:.0f}s; see {log}")


@contextmanager
def running_service(*, slots: int = 2, separate_workers: int = 0, database_url: str | None = None,
                    keep: bool = False, fuse: str = "1", **env_extra: str) -> Iterator[Service]:
    """`hpsearch serve --workers slots --fuse fuse` (or API only plus `separate_workers` worker processes)."""
    home = Path(tempfile.mkdtemp(prefix="hpsearch-bench-"))
    env = service_env(home, database_url, **env_extra)
    hpsearch("db", "upgrade", env=env)
    key = hpsearch("keys", "create", "--owner", "bench", env=env).stdout.strip().splitlines()[-1]
    port = free_port()
    log = home / "service.log"
    out = log.open("w")
    workers = 0 if separate_workers else slots
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers), "--fuse", fuse]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)]
    for _ in range(separate_workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--devices", "cpu",
                                       "--per-device", str(slots)], env=env, cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        _wait_healthy(port, procs, log)
        service = Service(home, port, env, key, procs, log)
        service.wait_for_workers(max(1, separate_workers) if (workers or separate_workers) else 0)
        yield service
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        out.close()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
