"""A chaos soak of the trial lifecycle: real worker supervisors and an API on one database, many studies at
once, and a fault injector killing, freezing and stopping workers that hold a running trial and cutting the
database off. At the end it checks from the database, the artifact folder, the epochs it saw recorded and the
logs that every study ended sound, and counts the epochs each fault made a trial train again.

    python -m benchmarks.soak --database postgresql --minutes 30 --workers 3 --studies 40 --seed 1

Exits 1 when any check finds a violation; prints the faults injected, the actions taken, the trials seen and
every violation, one per line.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError

from benchmarks.soak_checks import (
    check_checkpoint_files,
    check_creates,
    check_optuna_links,
    check_outcome,
    check_worker_logs,
)
from benchmarks.soak_lost_work import WORKER_FAULTS, EpochObserver, FaultHit, LostWork, check_lost_work, utcnow

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("HPSEARCH_TEST_POSTGRES_URL",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
API = "/api/v1"
HEARTBEAT_S = 0.3
GRACE_S = 2.0
ENDED = ("completed", "failed", "cancelled")
MEMORY_GROWTH_MAX = 0.10  # a supervisor's RSS after warm-up may grow by at most this fraction
WARM_UP_STUDIES = 3  # the witness worker has finished trials of this many studies before its first sample
SAMPLERS = ("random", "tpe", "cmaes", "grid", "qmc", "nsga2")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")


@dataclass(frozen=True)
class SoakConfig:
    database: str = "postgresql"  # or "sqlite"
    minutes: float = 2.0  # how long studies are created and faults injected; then everything must settle
    workers: int = 3  # supervisors kept alive (one slot each)
    studies: int = 10
    seed: int = 0
    settle_s: float | None = None  # at most this long for studies to end once the chaos stops (the bound)
    quiet_s: float = 120.0  # ...and the settling ends sooner when the database shows no progress this long
    home: Path | None = None  # keep processes' logs, database and artifacts here (default: a temporary folder)

    @property
    def settle_bound_s(self) -> float:
        return self.settle_s if self.settle_s is not None else max(600.0, 30.0 * self.studies)


@dataclass
class Report:
    faults: Counter[str] = field(default_factory=Counter)
    faults_skipped: Counter[str] = field(default_factory=Counter)  # drawn when nothing could take them
    actions: Counter[str] = field(default_factory=Counter)
    trials: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)  # how many things each check looked at
    retried_trials: int = 0
    lost_work: LostWork = field(default_factory=LostWork)
    failures: Counter[str] = field(default_factory=Counter)  # the last failure kind of each trial that had one
    studies: Counter[str] = field(default_factory=Counter)
    memory: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    settled: str = ""  # how the settling ended: all ended, stuck (no progress), or the bound

    def violate(self, check: str, evidence: str) -> None:
        self.violations.append(f"{check}: {evidence}")

    def render(self, config: SoakConfig) -> str:
        lines = [f"soak: database={config.database} minutes={config.minutes} workers={config.workers} "
                 f"studies={config.studies} seed={config.seed} ran {self.seconds:.0f}s",
                 "faults injected: " + _counts(self.faults) + "; drawn but skipped (no worker mid-trial, or "
                 "pool full): " + _counts(self.faults_skipped),
                 "actions: " + _counts(self.actions),
                 "studies: " + _counts(self.studies) + f" (settling: {self.settled})",
                 "trials: " + _counts(self.trials) + f"; retried (attempt > 1): {self.retried_trials}; "
                 "failures: " + _counts(self.failures),
                 self.lost_work.render(),
                 "memory: " + json.dumps(self.memory),
                 "checked: " + _counts(self.checks),
                 f"violations: {len(self.violations)}"]
        return "\n".join(lines + [f"  {v}" for v in self.violations])


def read(engine: Engine, statement: Any, params: dict[str, Any] | None = None) -> list[Any]:
    """The rows of one query, retried while the injector holds the database down (the driver is a client)."""
    for _ in range(120):
        try:
            with engine.connect() as conn:
                return list(conn.execute(statement, params or {}))
        except DBAPIError:
            time.sleep(0.5)
    raise RuntimeError("the database stayed away for a minute")


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"


# ---- the database and the processes ----------------------------------------------------------------------


@contextmanager
def fresh_database(kind: str, home: Path) -> Iterator[str]:
    """A migrated database of its own (PostgreSQL: dropped at the end)."""
    from app.core import migrate

    if kind == "sqlite":
        url = f"sqlite:///{home / 'hpsearch.db'}"
        migrate.upgrade(url)
        yield url
        return
    name = f"hpsearch_soak_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _env(url: str, home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HPSEARCH_DATABASE_URL": url, "HPSEARCH_HOME": str(home),
            "HPSEARCH_LOG_JSON": "true", "HPSEARCH_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "HPSEARCH_LEASE_GRACE_S": str(GRACE_S), "HPSEARCH_RATE_LIMIT_PER_S": "100000",
            "HPSEARCH_RATE_LIMIT_BURST": "100000",
            # Many processes on few shared cores: sleeping OpenMP threads instead of spinning ones.
            "OMP_WAIT_POLICY": "PASSIVE"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int | None:
    """Resident memory of a process, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Supervisor:
    proc: subprocess.Popen[bytes]
    name: str
    witness: bool  # spared by the injector so its memory can be followed from warm-up to the end
    frozen: bool = False
    gone: bool = False  # killed or told to stop by the injector


class Cluster:
    """The API (with its reaper) and the worker supervisors, started and stopped as real processes."""

    def __init__(self, url: str, home: Path, workers: int) -> None:
        self.url, self.home, self.target = url, home, workers
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.api: subprocess.Popen[bytes] | None = None
        self.supervisors: list[Supervisor] = []
        self.lock = threading.RLock()
        self._started = 0
        self.exits: list[str] = []  # processes that ended on their own, not by the injector

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        out = open(self.logs / log_name, "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=_env(self.url, self.home),
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def start_api(self) -> None:
        self.api = self._spawn(["serve", "--workers", "0", "--port", str(self.port)], "api.log")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"serve exited with {self.api.returncode}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the API never answered /readyz")

    def start_worker(self, *, witness: bool = False) -> Supervisor:
        with self.lock:
            self._started += 1
            name = f"worker-{self._started}"
            sup = Supervisor(self._spawn(["worker", "--devices", "cpu", "--per-device", "1"], f"{name}.log"),
                             name, witness)
            self.supervisors.append(sup)
            return sup

    def live(self) -> list[Supervisor]:
        return [s for s in self.supervisors if not s.gone and s.proc.poll() is None]

    def victims(self) -> list[Supervisor]:
        return [s for s in self.live() if not s.witness and not s.frozen]

    def witness(self) -> Supervisor | None:
        return next((s for s in self.supervisors if s.witness), None)

    def top_up(self) -> None:
        """Start workers until the pool is full again, noting first any process that ended on its own."""
        with self.lock:
            self.note_exits()
            while len(self.live()) < self.target:
                self.start_worker()

    def note_exits(self) -> None:
        """A supervisor or the API that exited without the injector's signal is a violation; the API is
        started again so the client can go on."""
        with self.lock:
            for sup in self.supervisors:
                if not sup.gone and sup.proc.poll() is not None:
                    sup.gone = True
                    self.exits.append(f"{sup.name} (pid {sup.proc.pid}{', the witness' if sup.witness else ''}) "
                                      f"exited on its own with code {sup.proc.returncode}: {self._tail(sup.name)}")
            if self.api is not None and self.api.poll() is not None:
                self.exits.append(f"the API (pid {self.api.pid}) exited on its own with code "
                                  f"{self.api.returncode}: {self._tail('api')}")
                self.start_api()

    def kill_api(self) -> None:
        with self.lock:
            assert self.api is not None
            self.api.kill()
            self.api.wait()
            self.start_api()

    def _tail(self, name: str) -> str:
        try:
            lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return (lines[-1] if lines else "empty log")[:300]

    def stop(self) -> None:
        procs = [s.proc for s in self.supervisors] + ([self.api] if self.api else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---- the client side: studies and what is done to them ---------------------------------------------------

BASE_SPACE: dict[str, Any] = {
    # Two continuous entries: two sampled trials sharing a configuration can only come from a defect.
    "learning_rate": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3},
    "units": {"type": "int", "low": 16, "high": 64},
    "n_layers": {"type": "int", "low": 1, "high": 2},
    # Small batches: an epoch takes a tenth of a second or more, so a fault can find a trial mid-run.
    "optimizer": "adam", "batch_norm": "none", "lr_schedule": "constant", "batch_size": 8,
}
GRID_SPACE: dict[str, Any] = {
    "learning_rate": {"type": "categorical", "choices": [0.003, 0.01, 0.03]},
    "units": {"type": "categorical", "choices": [16, 32]}, "n_layers": 1, "dropout": 0.0,
    "weight_decay": 1e-5, "activation": "relu", "weight_init": "he_normal", "layer_shape": "constant",
    "optimizer": "adam", "batch_norm": "none", "lr_schedule": "constant", "batch_size": 8,
}
GRID_EXTRA = {"builtin:iris": {"branch_merge": "concat"}, "builtin:digits": {"augmentation": "none"}}


def study_spec(rng: random.Random, sampler: str, *, dataset: str | None = None) -> dict[str, Any]:
    """A small study (iris or digits) with this sampler, a random pruner, maybe a seed, and a checkpoint
    policy. Trials run 5 to 10 epochs, long enough for a fault to stop one mid-run, and few of them."""
    grid = sampler == "grid"
    spec: dict[str, Any] = {
        "name": f"soak-{sampler}",
        "dataset": dataset or rng.choice(["builtin:iris", "builtin:digits", "builtin:digits"]),
        "model": "mlp", "search_space": dict(GRID_SPACE if grid else BASE_SPACE),
        "sampler": {"name": sampler}, "pruner": {"name": "none"},
        "budget": {"n_trials": rng.randint(3, 5 if grid else 6), "epochs": rng.randint(5, 10), "patience": None,
                   "max_parallel": rng.randint(1, 3), "max_attempts": rng.choice([3, 4])},
        "checkpoint_every": rng.choice([1, 1, 2]),
    }
    keep = rng.choice(["best_k", "best_k", "all", "none"])
    spec["keep_checkpoints"] = keep
    if keep == "best_k" and rng.random() < 0.5:
        spec["keep_best_k"] = rng.randint(1, 2)
    if grid:  # the dataset's own categorical entry, fixed too: a grid study enqueues whole configurations
        spec["search_space"].update(GRID_EXTRA[spec["dataset"]])
    elif spec["dataset"] == "builtin:iris":
        spec["search_space"]["batch_size"] = 4
    if rng.random() < 0.6:
        spec["sampler"]["seed"] = rng.randrange(1000)
    if sampler == "nsga2":
        spec["objective"] = [{"metric": "val_accuracy", "direction": "maximize"},
                             {"metric": "param_count", "direction": "minimize"}]
    else:
        pruner = rng.choice(PRUNERS)
        spec["pruner"] = {"name": pruner}
        if pruner in ("median", "percentile"):
            spec["pruner"]["n_startup_trials"] = 1
            spec["pruner"]["n_warmup_steps"] = 0
        if pruner == "percentile":
            spec["pruner"]["percentile"] = 50.0
    return spec


def one_sample_class_csv(rng: random.Random) -> bytes:
    """A classification CSV whose class "c" has one row: no stratified split can hold it."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["a", "b", "label"])
    for i in range(40):
        w.writerow([rng.random(), rng.random(), "c" if i == 17 else ("x" if i % 2 else "y")])
    return out.getvalue().encode()


def split_fails(engine: Engine, home: Path, ref: str, seed: int) -> bool:
    """Whether the service's own split of this dataset fails with this study seed (as every worker's will)."""
    from app.core.config import Settings
    from app.core.db import Database
    from app.ml import data
    from app.services.datasets import load_dataset

    db = Database(str(engine.url.render_as_string(hide_password=False)))
    try:
        for _ in range(120):  # the injector may hold the database down
            try:
                ds = load_dataset(db, Settings(home=home, database_url=db.url), ref)
                break
            except DBAPIError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the database stayed away for a minute")
    finally:
        db.dispose()
    try:
        data.split_dataset(ds, validation_split=0.2, seed=seed)
    except data.DatasetError:
        return True
    return False


def canonical(params: dict[str, Any] | None) -> str:
    """A configuration as a comparable text (numbers as floats, keys sorted)."""
    def norm(v: Any) -> Any:
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
    return json.dumps({k: norm(v) for k, v in (params or {}).items()}, sort_keys=True)


@dataclass
class Ledger:
    """What the driver did: the only facts the checks take from outside the database."""

    created: dict[str, str] = field(default_factory=dict)  # study id -> sampler
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    optuna_names: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    bad_dataset: set[str] = field(default_factory=set)
    allowed_duplicates: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    paused: dict[str, float] = field(default_factory=dict)  # study id -> when it was paused (monotonic)
    cancel_sent: set[str] = field(default_factory=set)  # the client asked to cancel (answered or not)
    delete_sent: set[str] = field(default_factory=set)  # ...to delete (a lost answer may still have deleted)
    failure_causes: dict[str, str] = field(default_factory=dict)  # study id -> why it must end failed
    idempotency_keys: dict[str, str] = field(default_factory=dict)  # study id -> the key its create carried
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (UTC time, action, study id), to match logs

    def note(self, action: str, sid: str) -> None:
        self.events.append((utcnow().isoformat(timespec="milliseconds"), action, sid))

    def save(self, path: Path) -> None:
        """The ledger as JSON beside the logs: what the client did and when, for reading a violation."""
        path.write_text(json.dumps({
            "created": self.created, "deleted": sorted(self.deleted), "delete_sent": sorted(self.delete_sent),
            "cancel_sent": sorted(self.cancel_sent), "failure_causes": self.failure_causes,
            "idempotency_keys": self.idempotency_keys, "events": self.events}, indent=1))

    def deleted_or_gone(self, rows: dict[str, Any]) -> set[str]:
        """Studies the client deleted: an answered delete, or one whose answer was lost and whose row is gone."""
        return self.deleted | {sid for sid in self.delete_sent if sid not in rows}


class Driver:
    """Creates studies and steers them through the API, as clients would, with a seeded RNG."""

    def __init__(self, cluster: Cluster, key: str, rng: random.Random, report: Report, ledger: Ledger,
                 engine: Engine) -> None:
        self.cluster, self.rng, self.report, self.ledger, self.engine = cluster, rng, report, ledger, engine
        self.home = cluster.home
        self.cap = 1  # cancels and deletes each end at most this many studies (set by run: a share of them)
        self.spared: Callable[[], set[str]] = set  # studies a cancel or delete leaves alone (set by run)
        # ...and those a pause leaves alone: the study the injector waits on for a trial mid-run, which a
        # pause would hold off the workers for the whole wait (set by run)
        self.unpausable: Callable[[], set[str]] = set
        self.headers = {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, *, headers: dict[str, str] | None = None,
             **kw: Any) -> httpx.Response | None:
        """One request; retried while the API or the database is away (a fault, not the driver's business)."""
        for tries in range(60):
            try:
                r = httpx.request(method, f"{self.cluster.base}{API}{path}",
                                  headers={**self.headers, **(headers or {})}, timeout=60, **kw)
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if tries and method == "POST" and path == "/studies":
                self.report.actions["create_retried_with_key"] += 1  # the same key: at most one study
            if r.status_code == 503:
                time.sleep(0.5)
                continue
            if r.status_code >= 500:
                self.report.violate("api", f"{method} {path} answered {r.status_code}: {r.text[:200]}")
            return r
        return None

    def create(self, spec: dict[str, Any], kind: str) -> str | None:
        # Every create carries a key: one the API's kill cut off is sent again, and must not make two studies.
        key = f"soak-{uuid.UUID(int=self.rng.getrandbits(128))}"
        r = self.call("POST", "/studies", json=spec, headers={"Idempotency-Key": key})
        if r is None or r.status_code not in (200, 201):
            self.report.actions[f"create_refused_{kind}_{r.status_code if r is not None else 'no_answer'}"] += 1
            if kind != "bad_dataset" and r is not None:
                self.report.violate("api", f"creating a {kind} study answered {r.status_code}: {r.text[:300]}")
            return None
        sid = str(r.json()["id"])
        self.ledger.created[sid] = kind
        self.ledger.idempotency_keys[sid] = key
        self.ledger.note(f"create_{kind}", sid)
        self.ledger.specs[sid] = spec
        self.ledger.optuna_names[sid] = str(read(self.engine, text("SELECT optuna_name FROM hp_studies "
                                                                   "WHERE id = :i"), {"i": sid})[0][0])
        self.report.actions[f"create_{kind}"] += 1
        return sid

    def create_study(self) -> None:
        self.create(study_spec(self.rng, sampler := self.rng.choice(SAMPLERS)), sampler)

    def create_long_study(self) -> str | None:
        """The run's first study: three trials of 40 epochs, two at a time (one slot is the witness's at most),
        a checkpoint at every epoch, no pruner, on digits in small batches. A fault waits for one of its trials
        mid-run with a checkpoint recorded (seconds of each trial), so that every run, however short, sees a
        trial resume rather than restart."""
        spec = study_spec(self.rng, "random", dataset="builtin:digits")
        spec["pruner"] = {"name": "none"}
        spec["budget"].update(n_trials=3, epochs=40, max_parallel=2, max_attempts=4)
        spec["checkpoint_every"], spec["keep_checkpoints"] = 1, "best_k"
        spec.pop("keep_best_k", None)
        return self.create(spec, "long")

    def create_bad_dataset_study(self) -> None:
        """A study on an uploaded CSV with a one-sample class. Its split is decided by the data and the
        study's seed, so the driver works out (with the service's own split) whether any worker can ever split
        it; a seed that cannot is chosen when one exists, and such a study must end `failed`, with its reason."""
        files = {"file": ("one-sample-class.csv", one_sample_class_csv(self.rng), "text/csv")}
        r = self.call("POST", "/datasets", data={"kind": "csv", "label_column": "label",
                                                 "task": "classification", "name": "one sample class"},
                      files=files)
        if r is None or r.status_code not in (200, 201):
            self.report.actions[f"bad_upload_refused_{r.status_code if r is not None else 'no_answer'}"] += 1
            return
        ref = str(r.json()["id"])
        spec = study_spec(self.rng, "random", dataset=ref)
        spec["search_space"].pop("batch_size", None)
        seed = next((k for k in range(50) if split_fails(self.engine, self.home, ref, k)), None)
        if seed is not None:
            spec["sampler"]["seed"] = seed
        sid = self.create(spec, "bad_dataset" if seed is not None else "one_sample_class")
        if sid is not None and seed is not None:
            self.ledger.bad_dataset.add(sid)
            self.ledger.failure_causes[sid] = f"no split of its one-sample class with seed {seed}"

    def create_warm_start(self) -> None:
        done = [s for s in self._studies("completed") if self.ledger.created.get(s) not in ("nsga2", "grid",
                                                                                            "bad_dataset")]
        if not done:
            return
        source = self.rng.choice(done)
        # The source's dataset: what a configuration fixes (batch size, the dataset's own entries) must fit.
        spec = study_spec(self.rng, self.rng.choice(["tpe", "random"]), dataset=self.ledger.specs[source]["dataset"])
        history = self.rng.random() < 0.5
        spec["warm_start"] = {"studies": [source], "top_k": 2, "history": history}
        self.create(spec, "warm_history" if history else "warm_start")

    def _studies(self, *statuses: str) -> list[str]:
        rows = read(self.engine, text("SELECT id, status FROM hp_studies"))
        return sorted(i for i, s in rows if s in statuses and i not in self.ledger.deleted)

    def enqueue(self) -> None:
        live = [s for s in self._studies("queued", "running", "paused") if s not in self.ledger.bad_dataset]
        if not live:
            return
        sid = self.rng.choice(live)
        grid = self.ledger.created.get(sid) == "grid"
        if self.rng.random() < 0.4:  # the full configuration of a trial already run, on purpose
            r = self.call("GET", f"/studies/{sid}/trials?limit=50")
            ran = [t["params"] for t in (r.json().get("data", []) if r is not None and r.status_code == 200
                                         else []) if t.get("params")]
            if not ran:
                return
            params = self.rng.choice(ran)
            r = self.call("POST", f"/studies/{sid}/trials", json={"params": params, "allow_duplicate": True})
            if r is not None and r.status_code == 201:
                self.ledger.allowed_duplicates[sid][canonical(r.json()["params"])] += 1
                self.report.actions["enqueue_duplicate"] += 1
            return
        if grid:
            spec = self.ledger.specs[sid]["search_space"]
            params = {k: (self.rng.choice(v["choices"]) if isinstance(v, dict) else v) for k, v in spec.items()}
        else:
            params = {"learning_rate": round(self.rng.uniform(2e-3, 4e-2), 6), "units": self.rng.randint(16, 64)}
        r = self.call("POST", f"/studies/{sid}/trials", json={"params": params})
        if r is not None and r.status_code in (200, 201):
            self.report.actions["enqueue" if r.status_code == 201 else "enqueue_refused_duplicate"] += 1

    def steer(self, action: str) -> None:
        """pause, resume, cancel or delete a study that allows it."""
        states = {"pause": ("queued", "running"), "resume": ("paused",), "cancel": ("queued", "running", "paused"),
                  "delete": ENDED + ("queued", "running", "paused")}[action]
        picks = self._studies(*states)
        if action in ("cancel", "delete"):  # a trial a fault stopped must be seen to resume
            picks = [s for s in picks if s not in self.spared()]
        if action == "pause":
            picks = [s for s in picks if s not in self.unpausable()]
        if action == "resume":
            picks = [s for s in picks if time.monotonic() - self.ledger.paused.get(s, 0.0) > 3.0]
        if not picks:
            return
        sid = self.rng.choice(picks)
        self.ledger.note(action, sid)
        if action == "delete":
            self.ledger.delete_sent.add(sid)
            r = self.call("DELETE", f"/studies/{sid}")
            if r is not None and r.status_code in (200, 204):
                self.ledger.deleted.add(sid)
                self.report.actions["delete"] += 1
            return
        if action == "cancel":  # before the answer: a cancel whose answer an API kill lost may still count
            self.ledger.cancel_sent.add(sid)
        r = self.call("POST", f"/studies/{sid}/{action}")
        if r is not None and r.status_code == 200:
            self.report.actions[action] += 1
            if action == "pause":
                self.ledger.paused[sid] = time.monotonic()

    def resume_all(self) -> None:
        for sid in self._studies("paused"):
            if self.call("POST", f"/studies/{sid}/resume") is not None:
                self.report.actions["resume_at_end"] += 1

    def step(self, creating: bool) -> None:
        """One client action, chosen by the RNG: a new study when one is due, else steering."""
        if creating:
            if self.rng.random() < 0.12:
                self.create_bad_dataset_study()
            elif self.rng.random() < 0.2:
                self.create_warm_start()
            else:
                self.create_study()
            return
        roll = self.rng.random()
        if roll < 0.45:
            self.enqueue()
        elif roll < 0.65:
            self.steer("pause")
        elif roll < 0.85:
            self.steer("resume")
        elif roll < 0.93:
            if self.report.actions["cancel"] < self.cap:
                self.steer("cancel")
        elif self.report.actions["delete"] < self.cap:
            self.steer("delete")


# ---- the fault injector ----------------------------------------------------------------------------------


class Injector(threading.Thread):
    """At random moments (seeded): SIGKILL, SIGSTOP past the lease grace then SIGCONT, SIGTERM, a database
    outage (PostgreSQL), a killed API with its reaper, and new workers. Worker faults go only to a worker that
    holds a running trial with an epoch recorded (read from the database), so each one stops a trial mid-run;
    every trial a fault stopped is noted (`hits`) for the count of lost work."""

    KINDS = ("sigkill", "freeze", "sigterm", "db_outage", "api_kill", "new_worker")
    WEIGHTS = (4, 2, 3, 2, 1, 1)  # mostly faults that stop a running trial
    VICTIM_WAIT_S = 6.0  # how long a worker fault waits for a worker to be mid-trial before it is skipped
    PROBE_WAIT_S = 60.0  # how long the first worker fault waits for the long study's trial with a checkpoint

    def __init__(self, cluster: Cluster, url: str, rng: random.Random, report: Report, every_s: tuple[float, float],
                 engine: Engine, observer: EpochObserver) -> None:
        super().__init__(daemon=True)
        self.cluster, self.url, self.rng, self.report, self.every_s = cluster, url, rng, report, every_s
        self.engine, self.observer = engine, observer
        self.halt = threading.Event()
        self.thaw: list[tuple[float, Supervisor]] = []
        self.draining: list[tuple[Supervisor, list[FaultHit]]] = []  # gracefully stopped, not exited yet
        self.hits: list[FaultHit] = []
        self.probe: str | None = None  # the long study, until a fault stopped its trial after a checkpoint
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            while not self.halt.wait(self.rng.uniform(*self.every_s)):
                self._thaw_due()
                self.note_drained()
                self.inject(self.rng.choices(self.KINDS, weights=self.WEIGHTS)[0])
                self.cluster.top_up()
        except Exception as exc:  # noqa: BLE001 - reported, never silently ends the soak
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            for _, sup in self.thaw:
                self._cont(sup)
            self.thaw.clear()

    def _thaw_due(self) -> None:
        now = time.monotonic()
        for item in [t for t in self.thaw if t[0] <= now]:
            self.thaw.remove(item)
            self._cont(item[1])

    def _cont(self, sup: Supervisor) -> None:
        if sup.proc.poll() is None:
            sup.proc.send_signal(signal.SIGCONT)
        sup.frozen = False

    def note_drained(self) -> None:
        """A gracefully stopped worker that has exited can record nothing more for the trials it held."""
        for item in [d for d in self.draining if d[0].proc.poll() is not None]:
            self.draining.remove(item)
            for hit in item[1]:
                hit.end = utcnow()

    def _running(self) -> dict[int, list[tuple[int, str, int, bool]]]:
        """Supervisor pid -> the (trial id, study, attempt, checkpointed) it holds running with an epoch of
        that attempt recorded."""
        sql = ("SELECT w.pid, t.id, t.study_id, t.attempt, t.checkpoint_epoch FROM hp_trials t JOIN hp_workers w "
               "ON t.worker_id = w.id WHERE t.state = 'running' AND EXISTS (SELECT 1 FROM hp_trial_epochs e "
               "WHERE e.trial_id = t.id AND e.attempt = t.attempt)")
        out: dict[int, list[tuple[int, str, int, bool]]] = defaultdict(list)
        try:
            with self.engine.connect() as conn:
                for pid, tid, sid, attempt, checkpoint in conn.execute(text(sql)):
                    out[int(pid)].append((int(tid), str(sid), int(attempt), checkpoint is not None))
        except Exception:  # noqa: BLE001 - the database may be the thing that is down
            return {}
        return out

    def _still_runs(self, study_id: str) -> bool:
        """Whether the study can still run a trial for a fault to stop (assumed while the database is down)."""
        try:
            with self.engine.connect() as conn:
                status = conn.execute(text("SELECT status FROM hp_studies WHERE id = :i"), {"i": study_id}).scalar()
        except Exception:  # noqa: BLE001 - the database may be the thing that is down
            return True
        return status in ("queued", "running", "paused")

    def _mid_trial_victim(self) -> tuple[Supervisor | None, list[tuple[int, str, int]]]:
        """A worker the injector may signal that holds a trial mid-run, waiting a little for one. One whose
        trial has a checkpoint recorded goes first three times in four. The first such fault waits longer,
        for the long study's trial with a checkpoint (`Driver.create_long_study`): its trial must be seen to
        resume, not restart."""
        end = time.monotonic() + (self.PROBE_WAIT_S if self.probe is not None else self.VICTIM_WAIT_S)
        while not self.halt.is_set():
            running = self._running()
            busy = [v for v in self.cluster.victims() if running.get(v.proc.pid)]
            checkpointed = [v for v in busy if any(c for *_, c in running[v.proc.pid])]
            if self.probe is not None and not self._still_runs(self.probe):
                self.probe = None  # its trials all ended before a fault could stop one (a quick machine)
                end = min(end, time.monotonic() + self.VICTIM_WAIT_S)
            if self.probe is not None:
                pool = [v for v in checkpointed if any(c and sid == self.probe for _, sid, _, c in running[v.proc.pid])]
                if pool:
                    self.probe = None
            else:
                pool = checkpointed if checkpointed and self.rng.random() < 0.75 else busy
            if pool:
                victim = self.rng.choice(pool)
                return victim, [(tid, sid, attempt) for tid, sid, attempt, _ in running[victim.proc.pid]]
            if time.monotonic() > end:
                self.probe = None  # never mid-run with a checkpoint in time: the soak goes on without it
                return None, []
            time.sleep(0.3)
        return None, []

    def inject(self, kind: str) -> None:
        if kind == "db_outage" and not self.url.startswith("postgresql"):
            kind = "api_kill"
        if kind in WORKER_FAULTS:
            victim, held = self._mid_trial_victim()
            if victim is None:
                self.report.faults_skipped[kind] += 1  # no worker mid-trial; the next moment may have one
                return
            self.observer.poll()  # every epoch recorded before the fault, seen before a resume can delete it
            self._signal(kind, victim, held)
        elif kind == "db_outage":
            held = [(tid, sid, attempt) for hs in self._running().values() for tid, sid, attempt, _ in hs]
            self.observer.poll()
            start = utcnow()
            block_database(self.url, self.rng.uniform(2.0, 5.0))
            self.hits += [FaultHit(kind, tid, sid, attempt, start, utcnow()) for tid, sid, attempt in held]
        elif kind == "api_kill":
            self.cluster.kill_api()
        elif kind == "new_worker":
            if len(self.cluster.live()) > self.cluster.target:  # the pool stays modest: one extra at most
                self.report.faults_skipped[kind] += 1
                return
            self.cluster.start_worker()
        self.report.faults[kind] += 1

    def _signal(self, kind: str, victim: Supervisor, held: list[tuple[int, str, int]]) -> None:
        start = utcnow()
        hits = [FaultHit(kind, tid, sid, attempt, start) for tid, sid, attempt in held]
        if kind == "sigkill":
            victim.gone = True
            victim.proc.kill()
            victim.proc.wait()
        elif kind == "sigterm":
            victim.gone = True
            victim.proc.terminate()  # drains in the background; top_up starts its replacement now
            self.draining.append((victim, hits))
            self.observer.hurry(60.0)  # a hand-back deletes what its checkpoint does not hold at once
        else:
            victim.frozen = True
            victim.proc.send_signal(signal.SIGSTOP)
            self.thaw.append((time.monotonic() + GRACE_S + self.rng.uniform(1.0, 4.0), victim))
        if kind != "sigterm":
            for hit in hits:  # killed or frozen: nothing more of it can be recorded
                hit.end = utcnow()
        self.hits += hits


def block_database(url: str, seconds: float) -> None:
    """Refuse every connection to the database for `seconds` and cut the open ones, as a restart would."""
    name = make_url(url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            try:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
                    time.sleep(0.2)
            finally:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()


# ---- the checks: the database and the artifact folder alone -----------------------------------------------


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class Evidence:
    """What the soak saw besides the database: the trials its faults hit, the epochs it saw recorded, the
    processes that ended on their own, and where the logs are."""

    hits: list[FaultHit]
    observer: EpochObserver
    exits: list[str]
    logs: Path


def check(engine: Engine, ledger: Ledger, artifact_dir: Path, report: Report, evidence: Evidence) -> None:
    """Every check of the soak; each violation names the study, the trial and what disagrees."""
    from app.models import Study, Trial, TrialEpoch
    with engine.connect() as conn:
        studies = {r.id: r for r in conn.execute(select(
            Study.id, Study.status, Study.n_trials, Study.stop_reason, Study.error, Study.finished_at,
            Study.optuna_name, Study.spec, Study.test_metrics, Study.idempotency_key))}
        trials = list(conn.execute(select(
            Trial.id, Trial.study_id, Trial.number, Trial.optuna_trial_id, Trial.state, Trial.params, Trial.value,
            Trial.values, Trial.attempt, Trial.artifact, Trial.finished_at, Trial.source, Trial.failure,
            Trial.checkpoint_path, Trial.error).order_by(Trial.study_id, Trial.id)))
        epochs: dict[tuple[int, int], dict[int, tuple[float | None, Any]]] = defaultdict(dict)
        curves: dict[tuple[int, int], list[tuple[int, Any, float | None]]] = defaultdict(list)
        for e in conn.execute(select(TrialEpoch.trial_id, TrialEpoch.attempt, TrialEpoch.epoch,
                                     TrialEpoch.val_metric, TrialEpoch.created_at, TrialEpoch.seconds)
                              .order_by(TrialEpoch.epoch)):
            epochs[(e.trial_id, e.attempt)][e.epoch] = (e.val_metric, e.created_at)
            curves[(e.trial_id, e.attempt)].append((e.epoch, e.created_at, e.seconds))
        ostudies = {r.study_name: r.study_id for r in conn.execute(text("SELECT study_id, study_name FROM studies"))}
        otrials = {r.trial_id: r for r in conn.execute(text("SELECT trial_id, number, study_id, state FROM trials"))}
        ovalues: dict[int, dict[int, float | None]] = defaultdict(dict)
        for v in conn.execute(text("SELECT trial_id, objective, value, value_type FROM trial_values")):
            ovalues[v.trial_id][v.objective] = _optuna_float(v.value, v.value_type)
        ointer: dict[int, dict[int, float | None]] = defaultdict(dict)
        for v in conn.execute(text("SELECT trial_id, step, intermediate_value, intermediate_value_type "
                                   "FROM trial_intermediate_values")):
            ointer[v.trial_id][int(v.step)] = _optuna_float(v.intermediate_value, v.intermediate_value_type)
        history = {r.trial_id for r in conn.execute(text(
            "SELECT trial_id FROM trial_user_attributes WHERE key = 'warm_start_from'"))}

    by_study: dict[str, list[Any]] = defaultdict(list)
    for t in trials:
        by_study[t.study_id].append(t)
        report.trials[t.state] += 1
        report.retried_trials += t.attempt > 1
        if t.failure:
            report.failures[t.failure] += 1

    # 1. every study ended with its reason; deleted ones are gone, here and in Optuna
    deleted = ledger.deleted_or_gone(studies)
    for sid in ledger.created:
        report.checks["studies"] += 1
        if sid in deleted:
            report.studies["deleted"] += 1
            if sid in studies:
                report.violate("deleted", f"study {sid} was deleted but its row remains ({studies[sid].status})")
            if ledger.optuna_names.get(sid) in ostudies:
                report.violate("deleted", f"study {sid} was deleted but Optuna study "
                                          f"{ledger.optuna_names[sid]} remains")
            if sum(1 for t in trials if t.study_id == sid):
                report.violate("deleted", f"study {sid} was deleted but trial rows remain")
            continue
        s = studies.get(sid)
        if s is None:
            report.violate("ended", f"study {sid} vanished without being deleted")
            continue
        report.studies[s.status] += 1
        if s.status not in ENDED:
            report.violate("ended", f"study {sid} ({ledger.created[sid]}) still {s.status} when settling ended "
                                    f"(finished {sum(1 for t in by_study[sid] if t.state in FINISHED)}"
                                    f"/{s.n_trials}, states {dict(Counter(t.state for t in by_study[sid]))}, "
                                    f"error {str(s.error)[:200]!r})")
            continue
        if s.finished_at is None:
            report.violate("ended", f"study {sid} is {s.status} without finished_at")
        reason = s.error if s.status == "failed" else s.stop_reason
        if not reason:
            report.violate("ended", f"study {sid} is {s.status} without its reason")
        if sid in ledger.bad_dataset and s.status != "failed":
            report.violate("bad_dataset", f"study {sid} on a dataset no split can hold ended {s.status}, "
                                          f"not failed (stop_reason {s.stop_reason!r}, error {s.error!r})")
        check_outcome(s, by_study[sid], ledger, report)
    check_creates(studies, ledger, report)

    for sid, rows in by_study.items():
        s = studies[sid]
        ended = s.status in ENDED
        _check_budget_and_attempts(s, rows, epochs, report)
        _check_duplicates(sid, rows, ledger, report)
        _check_optuna(s, rows, ended, epochs, ostudies, otrials, ovalues, ointer, history, report)
        check_optuna_links(s, rows, report)
        if ended:
            for t in rows:
                if t.state in ("running", "waiting"):
                    report.violate("live_in_ended", f"study {sid} is {s.status} but trial {t.number} "
                                                    f"(row {t.id}) is {t.state}")
    _check_weights(trials, studies, artifact_dir, report)
    check_checkpoint_files(artifact_dir, studies, by_study, ledger, report)
    final_curves = {t.id: curves.get((t.id, t.attempt), []) for t in trials}
    report.lost_work = check_lost_work(evidence.observer, evidence.hits, trials,
                                       {sid: _json(s.spec) for sid, s in studies.items()}, final_curves, report)
    for exit_ in evidence.exits:
        report.violate("exit", exit_)
    check_worker_logs(evidence.logs, report)


FINISHED = ("complete", "pruned", "fail")
OPTUNA_STATES = {"complete": "COMPLETE", "pruned": "PRUNED", "fail": "FAIL"}


def _optuna_float(value: float | None, value_type: Any) -> float | None:
    kind = str(getattr(value_type, "name", value_type)).upper()
    if kind.endswith("INF_POS"):
        return math.inf
    if kind.endswith("INF_NEG"):
        return -math.inf
    return None if value is None else float(value)


def _check_budget_and_attempts(s: Any, rows: list[Any], epochs: dict[tuple[int, int], dict[int, Any]],
                               report: Report) -> None:
    finished = [t for t in rows if t.state in FINISHED]
    report.checks["budgets"] += 1
    if len(finished) > s.n_trials:
        report.violate("budget", f"study {s.id} has {len(finished)} finished trials, n_trials is {s.n_trials}")
    numbers = Counter(t.number for t in rows if t.number is not None)
    for number, n in numbers.items():
        if n > 1:
            report.violate("attempts", f"study {s.id} has {n} rows for trial {number}")
    for t in finished:
        report.checks["finished_trials"] += 1
        later = [a for (tid, a) in epochs if tid == t.id and a > t.attempt]
        if later:
            report.violate("attempts", f"study {s.id} trial {t.number} finished in attempt {t.attempt} but "
                                       f"attempt(s) {sorted(later)} also recorded epochs")
        after = [e for e, (_, at) in epochs.get((t.id, t.attempt), {}).items()
                 if t.finished_at is not None and at is not None and at > t.finished_at]
        if after:
            report.violate("attempts", f"study {s.id} trial {t.number} finished at {t.finished_at} but "
                                       f"epoch(s) {sorted(after)} of its attempt {t.attempt} came later")


def _check_duplicates(sid: str, rows: list[Any], ledger: Ledger, report: Report) -> None:
    seen = Counter(canonical(_json(t.params)) for t in rows if t.params is not None and t.number is not None)
    report.checks["configurations"] += len(seen)
    for config, n in seen.items():
        allowed = 1 + ledger.allowed_duplicates.get(sid, Counter())[config]
        if n > allowed:
            numbers = [t.number for t in rows if t.params is not None and canonical(_json(t.params)) == config]
            report.violate("duplicates", f"study {sid} ({ledger.created.get(sid)}) ran one configuration in "
                                         f"trials {numbers} ({n} times, {allowed - 1} enqueued with "
                                         f"allow_duplicate): {config[:160]}")


def _json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


def _check_optuna(s: Any, rows: list[Any], ended: bool, epochs: dict[tuple[int, int], dict[int, Any]],
                  ostudies: dict[str, int], otrials: dict[int, Any], ovalues: dict[int, dict[int, float | None]],
                  ointer: dict[int, dict[int, float | None]], history: set[int], report: Report) -> None:
    oid = ostudies.get(s.optuna_name)
    if oid is None:
        report.violate("optuna", f"study {s.id} has no Optuna study {s.optuna_name}")
        return
    multi = isinstance(_json(s.spec).get("objective"), list)
    linked = {t.optuna_trial_id for t in rows if t.optuna_trial_id is not None}
    for t in rows:
        if t.state not in FINISHED or t.optuna_trial_id is None:
            continue
        report.checks["optuna_trials"] += 1
        o = otrials.get(t.optuna_trial_id)
        if o is None or o.study_id != oid:
            report.violate("optuna", f"study {s.id} trial {t.number}: Optuna trial {t.optuna_trial_id} missing")
            continue
        if str(o.state).split(".")[-1].upper() != OPTUNA_STATES[t.state]:
            report.violate("optuna", f"study {s.id} trial {t.number} is {t.state} here, {o.state} in Optuna")
        ours = [v for v in (_json(t.values) or ([t.value] if t.value is not None else []))]
        theirs = [ovalues[o.trial_id][k] for k in sorted(ovalues.get(o.trial_id, {}))]
        if t.state == "complete" and (len(ours) != len(theirs) or not all(map(_close, ours, theirs))):
            report.violate("optuna", f"study {s.id} trial {t.number} complete with values {ours} here, "
                                     f"{theirs} in Optuna")
        if t.state == "pruned" and theirs and t.value is not None and not _close(t.value, theirs[0]):
            report.violate("optuna", f"study {s.id} trial {t.number} pruned at value {t.value} here, "
                                     f"{theirs[0]} in Optuna")
        if not multi:
            curve = {e: v for e, (v, _) in epochs.get((t.id, t.attempt), {}).items() if v is not None}
            told = ointer.get(o.trial_id, {})
            if t.state == "fail":
                # Re-queued to resume, it lost the epochs after its checkpoint, and its study ended before it
                # ran again: Optuna cannot withdraw an intermediate value, so it may hold those epochs too.
                told = {k: v for k, v in told.items() if k <= max(curve, default=0)}
                # Killed between recording an epoch and reporting it, with no attempt left to report it again:
                # the last epoch alone may be missing there.
                if curve and set(curve) - set(told) == {max(curve)}:
                    curve = {k: v for k, v in curve.items() if k != max(curve)}
            if set(curve) != set(told) or not all(_close(curve[k], told[k]) for k in curve):
                report.violate("intermediate", f"study {s.id} trial {t.number} (attempt {t.attempt}, {t.state}): "
                                               f"Optuna's intermediate values {_short(told)} differ from the "
                                               f"attempt's epochs {_short(curve)}")
    finished_there = [o for o in otrials.values() if o.study_id == oid
                      and str(o.state).split(".")[-1].upper() in ("COMPLETE", "PRUNED") and o.trial_id not in history]
    for o in finished_there:
        if o.trial_id not in linked:
            report.violate("attempts", f"study {s.id}: Optuna trial {o.number} finished {o.state} but no trial "
                                       "row holds it (an attempt finished outside the record)")
    if len(finished_there) > s.n_trials:
        report.violate("budget", f"study {s.id} has {len(finished_there)} finished trials in Optuna, "
                                 f"n_trials is {s.n_trials}")
    if ended:
        live = [o.number for o in otrials.values() if o.study_id == oid
                and str(o.state).split(".")[-1].upper() in ("RUNNING", "WAITING")]
        report.checks["ended_optuna_studies"] += 1
        if live:
            report.violate("optuna_live", f"study {s.id} is {s.status} but Optuna trials {sorted(live)} are "
                                          "RUNNING or WAITING")


def _short(curve: dict[int, float | None]) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" if v is not None else f"{k}: None" for k, v in sorted(curve.items())) + "}"


def _check_weights(trials: list[Any], studies: dict[str, Any], artifact_dir: Path, report: Report) -> None:
    """Every complete trial's weights exist and load into the network they describe."""
    from app.ml.artifacts import ModelSpec, has_model, load_module, read_config, trial_files, trial_stem

    for t in trials:
        if t.state != "complete" or t.number is None:
            continue
        report.checks["weights"] += 1
        stem = Path(t.artifact) if t.artifact else trial_stem(artifact_dir / t.study_id, t.number)
        if not t.artifact or not has_model(stem):
            report.violate("weights", f"study {t.study_id} ({studies[t.study_id].status}) trial {t.number} is "
                                      f"complete but its weights are missing (artifact {t.artifact!r})")
            continue
        try:
            load_module(stem, ModelSpec.from_config(read_config(trial_files(stem)[1])))
        except Exception as exc:  # noqa: BLE001 - any failure to load is the violation
            report.violate("weights", f"study {t.study_id} trial {t.number}: weights do not load: {exc!r:.200}")


# ---- the run ---------------------------------------------------------------------------------------------


def _witness_studies(engine: Engine, pid: int) -> int:
    """How many studies the witness supervisor has finished trials of."""
    return int(read(engine, text(
        "SELECT count(DISTINCT t.study_id) FROM hp_trials t JOIN hp_workers w ON t.worker_id = w.id "
        "WHERE w.pid = :p AND t.state IN ('complete', 'pruned', 'fail')"), {"p": pid})[0][0] or 0)


def _progress(engine: Engine) -> tuple[Any, ...]:
    """What moves while studies make progress: epochs, bound and finished trials, attempts, ended studies.
    (Claims of trials that never bind, as a study whose data cannot load makes over and over, do not count.)"""
    return tuple(read(engine, text(
        "SELECT (SELECT count(*) FROM hp_trial_epochs), "
        "(SELECT count(*) FROM hp_trials WHERE number IS NOT NULL), "
        "(SELECT count(*) FROM hp_trials WHERE state IN ('complete', 'pruned', 'fail')), "
        "(SELECT coalesce(sum(attempt), 0) FROM hp_trials), "
        "(SELECT count(*) FROM hp_studies WHERE status IN ('completed', 'failed', 'cancelled'))"))[0])


def _wait_registered(engine: Engine, workers: int, timeout_s: float = 600.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if int(read(engine, text("SELECT count(*) FROM hp_workers WHERE stopped_at IS NULL"))[0][0]) >= workers:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{workers} workers never registered")


def _all_ended(engine: Engine, ledger: Ledger) -> bool:
    statuses = {i: st for i, st in read(engine, text("SELECT id, status FROM hp_studies"))}
    return all(statuses.get(sid) in ENDED for sid in ledger.created if sid not in ledger.deleted)


def run(config: SoakConfig, log: Callable[[str], None] = print) -> Report:
    """The whole soak: start, stir, break things, settle, check."""
    from app.core.db import Database
    from app.services import keys

    report, ledger = Report(), Ledger()
    rng = random.Random(config.seed)
    started = time.monotonic()
    home = config.home or Path(tempfile.mkdtemp(prefix="hpsearch-soak-"))
    home.mkdir(parents=True, exist_ok=True)
    with fresh_database(config.database, home) as url:
        db = Database(url)
        key = keys.create_key(db, owner="soak")
        db.dispose()
        engine = create_engine(url, pool_pre_ping=True)
        cluster = Cluster(url, home, config.workers)
        observer = EpochObserver(engine)
        injector = Injector(cluster, url, random.Random(config.seed + 1), report, every_s=(2.0, 7.0),
                            engine=engine, observer=observer)
        try:
            cluster.start_api()
            witness = cluster.start_worker(witness=True)
            cluster.top_up()
            driver = Driver(cluster, key, random.Random(config.seed + 2), report, ledger, engine)
            driver.cap = max(1, round(0.15 * config.studies))
            long_study = driver.create_long_study()
            injector.probe = long_study
            driver.spared = lambda: {long_study} if long_study else set()
            driver.unpausable = lambda: {injector.probe} if injector.probe else set()
            log(f"soak home {home}; API on {cluster.base}")
            _wait_registered(engine, config.workers)  # the chaos starts once the pool is up
            observer.start()
            injector.start()
            warm_up = min(WARM_UP_STUDIES, max(1, config.studies // 3))
            begin = time.monotonic()
            active_s, create_s = 60.0 * config.minutes, 60.0 * config.minutes * 0.7
            while time.monotonic() - begin < active_s:
                # Studies are created on a schedule over the first 70% of the run, the rest of the time
                # is steering: each tick is one action.
                due = config.studies * min(1.0, (time.monotonic() - begin) / create_s)
                driver.step(creating=len(ledger.created) < due)
                _sample_warm(engine, witness, report, warm_up)
                time.sleep(rng.uniform(0.3, 1.2))
            while len(ledger.created) < config.studies:  # a slow machine still creates every study asked for
                driver.create_study()
            injector.halt.set()
            injector.join(60)
            if injector.errors:
                report.violate("injector", "; ".join(injector.errors))
            cluster.top_up()
            driver.resume_all()
            log(f"chaos over after {time.monotonic() - started:.0f}s; settling (bound {config.settle_bound_s:.0f}s)")
            settle_end = time.monotonic() + config.settle_bound_s
            last, quiet_since = _progress(engine), time.monotonic()
            while time.monotonic() < settle_end and not _all_ended(engine, ledger):
                _sample_warm(engine, witness, report, warm_up)
                driver.resume_all()  # a pause that raced the end of the chaos
                injector.note_drained()
                cluster.top_up()
                time.sleep(1.0)
                now = _progress(engine)
                if now != last:
                    last, quiet_since = now, time.monotonic()
                elif time.monotonic() - quiet_since > config.quiet_s:
                    report.settled = f"stuck: no progress in the database for {config.quiet_s:.0f}s"
                    break
            else:
                report.settled = "all ended" if _all_ended(engine, ledger) else \
                    f"bound of {config.settle_bound_s:.0f}s reached"
            _sample_end(witness, report)
            injector.note_drained()
            cluster.note_exits()  # before the soak's own stop signals every process
        finally:
            injector.halt.set()
            cluster.stop()
            observer.halt.set()
        observer.join(10)
        observer.poll()
        check(engine, ledger, cluster.home / "artifacts", report,
              Evidence(injector.hits, observer, cluster.exits, cluster.logs))
        ledger.save(cluster.logs / "ledger.json")
        (cluster.logs / "hits.json").write_text(json.dumps([asdict(h) for h in injector.hits], indent=1, default=str))
        engine.dispose()
    report.seconds = time.monotonic() - started
    if config.home is None:
        shutil.rmtree(home, ignore_errors=True)
    return report


def _sample_warm(engine: Engine, witness: Supervisor, report: Report, warm_up: int) -> None:
    """The witness's RSS once it has finished trials of `warm_up` studies (what it holds from then on should
    be bounded by the studies it runs, not grow with those it has seen)."""
    if "warm_kb" in report.memory or witness.proc.poll() is not None:
        return
    studies = _witness_studies(engine, witness.proc.pid)
    if studies >= warm_up:
        report.memory.update(warm_kb=rss_kb(witness.proc.pid), warm_after_studies=studies)


def _sample_end(witness: Supervisor, report: Report) -> None:
    report.checks["memory"] += 1
    if witness.proc.poll() is not None:
        report.violate("memory", f"the witness supervisor exited with {witness.proc.returncode}")
        return
    report.memory["end_kb"] = end = rss_kb(witness.proc.pid)
    warm = report.memory.get("warm_kb")
    if warm is None or end is None:
        report.violate("memory", "no warm-up sample: the witness never finished trials of enough studies")
        return
    report.memory["growth"] = round(end / warm - 1.0, 4)
    if end > warm * (1.0 + MEMORY_GROWTH_MAX):
        report.violate("memory", f"the witness supervisor grew from {warm} kB after warm-up to {end} kB "
                                 f"(+{100 * (end / warm - 1):.1f}%, at most {100 * MEMORY_GROWTH_MAX:.0f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle-s", type=float, default=None, help="bound on ending once the chaos stops")
    parser.add_argument("--quiet-s", type=float, default=120.0, help="settling gives up after this long without "
                        "progress in the database")
    parser.add_argument("--home", type=Path, default=None, help="keep logs, database and artifacts here")
    args = parser.parse_args(argv)
    config = SoakConfig(database=args.database, minutes=args.minutes, workers=args.workers, studies=args.studies,
                        seed=args.seed, settle_s=args.settle_s, quiet_s=args.quiet_s, home=args.home)
    report = run(config)
    print(report.render(config), flush=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
