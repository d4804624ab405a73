"""Fixtures: a fresh migrated database per test on SQLite and on the real PostgreSQL, settings, API clients."""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.core import migrate
from app.core.config import Settings
from app.core.db import Database

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
POSTGRES_ADMIN_URL = os.environ.get("HPSEARCH_TEST_POSTGRES_URL",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_pg_state: dict[str, str | None] = {}
_pg_pool: dict[str, _PostgresDatabases] = {}
# Tests train in this process and fork runners from it, as a supervisor does: one torch thread here, or a
# multi-threaded op would leave an OpenMP team that hangs the next forked runner (see runner.warm_imports).
torch.set_num_threads(1)


def _postgres_template() -> str:
    """A migrated template database, made once per test session; skip (never in CI) without a server."""
    if "template" in _pg_state:
        if _pg_state["template"] is None:
            pytest.skip(_pg_state["why"] or "PostgreSQL unavailable")
        return str(_pg_state["template"])
    name = f"hpsearch_tmpl_{os.getpid()}"
    try:
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:  # noqa: BLE001
        why = f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {type(exc).__name__}"
        if os.environ.get("CI"):
            raise RuntimeError(f"{why}; CI must run the PostgreSQL tests") from exc
        _pg_state.update(template=None, why=why)
        pytest.skip(why)
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    from app.core.optuna_store import optuna_storage

    optuna_storage(url).engine.dispose()
    _pg_state["template"] = name
    return name


class _PostgresDatabases:
    """Fresh copies of the template, made ahead and dropped after use by two background threads, so that a
    test neither waits for CREATE DATABASE nor for DROP DATABASE (together a third of a second or more per
    PostgreSQL test). Every database a test gets is still a new copy of the migrated template that no other
    test has used; the session ends with all of them dropped."""

    AHEAD = 2

    def __init__(self, template: str) -> None:
        self.template = template
        self.admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self.ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=self.AHEAD)
        self.used: queue.Queue[str | None] = queue.Queue()
        self.stopping = threading.Event()
        # One lock per thread, held around each of its statements and both taken before every os.fork() (the
        # runners that tests fork from this process): a child never starts with a connection of theirs mid-use.
        self.making, self.dropping = threading.Lock(), threading.Lock()
        os.register_at_fork(before=self._hold, after_in_parent=self._let_go, after_in_child=self._let_go)
        self.maker = threading.Thread(target=self._make, name="pg-create", daemon=True)
        self.maker.start()
        self.dropper = threading.Thread(target=self._drop, name="pg-drop", daemon=True)
        self.dropper.start()
        atexit.register(self.close)

    def _hold(self) -> None:
        self.making.acquire()
        self.dropping.acquire()

    def _let_go(self) -> None:
        self.dropping.release()
        self.making.release()

    def _make(self) -> None:
        while not self.stopping.is_set():
            name = f"hpsearch_t_{uuid.uuid4().hex[:12]}"
            try:
                with self.making, self.admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
            except BaseException as exc:  # noqa: BLE001 - handed to the test that asks next
                self.ready.put(exc)
                return
            self.ready.put(name)
            if self.stopping.is_set():
                break

    def _drop(self) -> None:
        while (name := self.used.get()) is not None:
            try:
                with self.dropping, self.admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception:  # noqa: BLE001, S110 - a database left behind must not fail the session
                pass
            finally:
                self.used.task_done()
        self.used.task_done()

    def take(self) -> str:
        got = self.ready.get(timeout=120)
        if isinstance(got, BaseException):
            raise got
        return got

    def give_back(self, name: str) -> None:
        self.used.put(name)

    def close(self) -> None:
        """At exit: drop what was made ahead and wait for every drop."""
        self.stopping.set()
        deadline = time.monotonic() + 60
        while (self.maker.is_alive() or not self.ready.empty()) and time.monotonic() < deadline:
            try:
                got = self.ready.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(got, str):
                self.used.put(got)
        self.used.put(None)
        self.dropper.join(120)


def _fresh_postgres() -> Iterator[str]:
    template = _postgres_template()
    if "pool" not in _pg_pool:
        _pg_pool["pool"] = _PostgresDatabases(template)
    pool = _pg_pool["pool"]
    name = pool.take()
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        pool.give_back(name)


def fresh_database(kind: str, home: Path, sqlite_template: Path) -> Iterator[str]:
    """A migrated database ("sqlite" or "postgresql") for fixtures wider than one test; PostgreSQL's is
    dropped when the generator finishes."""
    if kind == "sqlite":
        shutil.copy(sqlite_template, home / "hpsearch.db")
        yield f"sqlite:///{home / 'hpsearch.db'}"
    else:
        yield from _fresh_postgres()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    from app.core.optuna_store import optuna_storage

    optuna_storage(url).engine.dispose()
    # Fold the write-ahead log into the file so that a plain copy holds every table.
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    """A fresh, migrated database: the same tests run on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "hpsearch.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
    else:
        yield from _fresh_postgres()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "hpsearch.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _fresh_postgres()


def make_settings(url: str, home: Path, **overrides: object) -> Settings:
    return Settings(home=home, database_url=url, mnist_dir=MNIST_DIR, heartbeat_interval_s=0.5, lease_grace_s=5.0,
                    rate_limit_burst=10_000, rate_limit_per_s=10_000, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path / "home")


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()
