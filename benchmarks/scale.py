"""Scale: many workers on PostgreSQL, sampler asks in large studies, worker memory over many trials.

Three measurements, each on its own fresh storage:

* claims: `--workers` `hpsearch worker` processes (one slot each) against a fresh PostgreSQL database, on a
  study of tiny trials (builtin:iris, 1 epoch, random search, so that neither training nor the sampler
  hides the queue). Claims per second over the study; PostgreSQL's own deadlock counter for the database;
  every trial number exactly once and no trial started twice.
* asks: an Optuna study with N finished trials of the documented MLP space on SQLite; the median time to
  ask the next trial's full configuration with TPE (the service's settings, Optuna's defaults for the rest)
  through the worker's windowed storage (`workers.asking.ask_trial`) and through a plain `study.ask()` plus
  one suggest call per hyperparameter on Optuna's own storage. Each asked trial is told a value before the
  next ask, as a worker does.
* memory: one `hpsearch worker` (one slot) runs the overhead benchmark's tiny trials one after another;
  its resident memory (VmRSS) is sampled every 20 finished trials.

    python -m benchmarks.scale --out /tmp/scale.json
    python -m benchmarks.scale --workers 4 --trials 40 --ask-sizes 200,500 --asks 3 --memory-trials 30
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import SEED, seconds_since, write_json
from benchmarks.harness import running_service
from benchmarks.overhead import tiny_dataset, tiny_spec

POSTGRES_ADMIN_URL = os.environ.get("HPSEARCH_BENCH_POSTGRES_URL",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MEMORY_EVERY = 20  # trials between two memory samples; the first sample is the baseline
FLAT_MEMORY_GROWTH = 0.05  # "flat": at most 5% more resident memory at the last sample than at the first
# Many single-slot workers share few cores: sleeping OpenMP threads keep them from spinning on each other.
SHARED_CORES = {"OMP_WAIT_POLICY": "PASSIVE"}


# ---- claims: many workers on PostgreSQL -----------------------------------------------------------------


@contextmanager
def fresh_postgres(admin_url: str) -> Iterator[tuple[str, str]]:
    """A new, empty database (its URL and name), dropped at the end whatever happens."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"hpsearch_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False), name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def postgres_deadlocks(admin_url: str, name: str) -> int:
    """Deadlocks PostgreSQL detected in database `name` (its cumulative statistics)."""
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url)
    try:
        with admin.connect() as conn:
            value = conn.execute(text("SELECT deadlocks FROM pg_stat_database WHERE datname = :n"),
                                 {"n": name}).scalar()
    finally:
        admin.dispose()
    return int(value or 0)


def claims_spec(n_trials: int, max_parallel: int) -> dict[str, Any]:
    return {"name": "bench-scale-claims", "dataset": "builtin:iris", "model": "mlp",
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "sampler": {"name": "random", "seed": SEED}, "pruner": {"name": "none"},
            "budget": {"n_trials": n_trials, "max_parallel": max_parallel, "epochs": 1, "patience": None,
                       "max_attempts": 1}}


def optuna_trial_count(url: str) -> int:
    """Trials Optuna holds in this database (one study): a trial asked but never bound would show here."""
    from app.core.optuna_store import optuna_storage

    storage = optuna_storage(url)
    try:
        ids = [storage.get_study_id_from_name(s.study_name) for s in storage.get_all_studies()]
        return sum(len(storage.get_all_trials(i, deepcopy=False)) for i in ids)
    finally:
        storage.engine.dispose()


def run_claims(workers: int, n_trials: int, admin_url: str = POSTGRES_ADMIN_URL,
               timeout_s: float = 900.0) -> dict[str, Any]:
    with fresh_postgres(admin_url) as (url, name):
        with running_service(slots=1, separate_workers=workers, database_url=url, **SHARED_CORES) as svc:
            study_id, submitted = svc.submit(claims_spec(n_trials, workers))
            study = svc.wait(study_id, timeout_s=timeout_s, poll_s=0.5)
            trials = svc.trials(study_id)
            log = svc.log.read_text(errors="replace")
        optuna_trials = optuna_trial_count(url)
        deadlocks = postgres_deadlocks(admin_url, name)
    starts = sorted(seconds_since(submitted, t["started_at"]) for t in trials if t["started_at"])
    ends = [seconds_since(submitted, t["finished_at"]) for t in trials if t["finished_at"]]
    numbers = [t["number"] for t in trials if t["number"] is not None]
    span = starts[-1] - starts[0] if len(starts) > 1 else float("nan")
    return {"workers": workers, "n_trials": n_trials, "status": study["status"], "rows": len(trials),
            "distinct_numbers": len(set(numbers)), "optuna_trials": optuna_trials,
            "started_twice": sum(t["attempt"] > 1 for t in trials),
            "states": {s: sum(t["state"] == s for t in trials) for s in sorted({t["state"] for t in trials})},
            "workers_used": len({t["worker_id"] for t in trials}),
            "claims_per_s": round((len(starts) - 1) / span, 2) if span > 0 else None,
            "trials_per_s": round(len(ends) / max(ends), 2) if ends else None,
            "seconds": round(max(ends), 1) if ends else None,
            "postgres_deadlocks": deadlocks, "log_deadlocks": log.lower().count("deadlock detected"),
            "log_tracebacks": log.count("Traceback")}


def claims_ok(r: dict[str, Any]) -> bool:
    return (r["status"] == "completed" and r["rows"] == r["distinct_numbers"] == r["optuna_trials"] == r["n_trials"]
            and r["started_twice"] == 0 and r["postgres_deadlocks"] == 0 and r["log_deadlocks"] == 0)


# ---- asks: sampler latency in large studies -------------------------------------------------------------


def mnist_space() -> dict[str, Any]:
    """The documented MLP space as a study on MNIST resolves it (images: augmentation applies)."""
    from app.ml.space import Context, resolve_space

    return resolve_space({}, Context("mlp", image=True))


def random_configs(n: int, resolved: dict[str, Any], seed: int = SEED) -> list[dict[str, Any]]:
    """n configurations of the space drawn at random (conditional entries as the service samples them)."""
    import optuna

    from app.ml.space import sample_params

    sampler = optuna.samplers.RandomSampler(seed=seed)
    configs: list[dict[str, Any]] = []
    while len(configs) < n:  # a fresh study now and then: each ask scans the study's trials for waiting ones
        study = optuna.create_study(sampler=sampler)
        configs += [sample_params(study.ask(), resolved) for _ in range(min(500, n - len(configs)))]
    return configs


def fill_study(url: str, study_name: str, configs: list[dict[str, Any]], resolved: dict[str, Any],
               seed: int = SEED) -> None:
    """A study holding one COMPLETE trial per configuration, written in one transaction.

    Optuna's `create_new_trial` takes ~10 ms a trial here (100 s for 10k), so the rows go in as one bulk
    insert into Optuna's own tables; `check_filled` then reads them back through Optuna's public API.
    """
    import optuna
    from optuna.distributions import distribution_to_json
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    from sqlalchemy import insert, text

    from app.ml.space import sampled_distributions

    storage = RDBStorage(url)
    try:
        study_id = storage.create_new_study([StudyDirection.MAXIMIZE], study_name)
        rng = np.random.default_rng(seed)
        now = datetime.now(UTC).replace(tzinfo=None)  # Optuna stores naive UTC
        trials, params, values = [], [], []
        for number, config in enumerate(configs):
            trial_id = number + 1  # the table is empty: ids follow numbers
            trials.append({"trial_id": trial_id, "number": number, "study_id": study_id,
                           "state": TrialState.COMPLETE, "datetime_start": now, "datetime_complete": now})
            for name, dist in sampled_distributions(resolved, config).items():
                params.append({"trial_id": trial_id, "param_name": name,
                               "param_value": dist.to_internal_repr(config[name]),
                               "distribution_json": distribution_to_json(dist)})
            values.append({"trial_id": trial_id, "objective": 0, "value": float(rng.uniform(0.1, 0.98)),
                           "value_type": models.TrialValueModel.TrialValueType.FINITE})
        with storage.engine.begin() as conn:
            conn.execute(insert(models.TrialModel.__table__), trials)
            conn.execute(insert(models.TrialParamModel.__table__), params)
            conn.execute(insert(models.TrialValueModel.__table__), values)
            if conn.dialect.name == "postgresql":  # ids were given: move the sequence past them
                conn.execute(text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), "
                                  "(SELECT max(trial_id) FROM trials))"))
        check_filled(optuna.load_study(study_name=study_name, storage=storage), configs)
    finally:
        storage.engine.dispose()


def check_filled(study: Any, configs: list[dict[str, Any]]) -> None:
    trials = study.get_trials(deepcopy=False)
    if len(trials) != len(configs) or any(t.state.name != "COMPLETE" for t in trials):
        raise RuntimeError(f"the bulk insert gave {len(trials)} trials, expected {len(configs)} complete ones")
    for t in (trials[0], trials[-1]):
        if t.params != {k: configs[t.number][k] for k in t.params}:
            raise RuntimeError(f"trial {t.number} reads back {t.params}, inserted {configs[t.number]}")


def time_asks(url: str, study_name: str, resolved: dict[str, Any], asks: int, path: str,
              sampler: str = "tpe") -> dict[str, Any]:
    """Seconds per ask of the next trial's configuration; the first (cold) ask, a joining worker's, apart.

    Paths: `window` the worker's study over a bounded window (the service now), `full` the same study with
    a window holding the whole history (the service before the window: it read and scored every trial),
    `direct` Optuna's ask + suggests on its own storage.
    """
    import optuna

    from app.core.optuna_store import optuna_storage
    from app.ml.space import sample_params
    from app.schemas.study import StudySpec
    from workers import asking
    from workers.search import make_sampler

    storage = optuna_storage(url)
    spec = StudySpec(name="asks", dataset="builtin:digits", sampler={"name": sampler, "seed": SEED})
    sizes = (asking.BEST_TRIALS, asking.RECENT_TRIALS)
    if path == "full":
        asking.BEST_TRIALS = asking.RECENT_TRIALS = 10**9
    if path == "direct":
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(spec, resolved),
                                  pruner=optuna.pruners.NopPruner())
    else:
        study = asking.open_study(storage, study_name, make_sampler(spec, resolved), optuna.pruners.NopPruner())
    rng = np.random.default_rng(SEED + 1)
    seconds: list[float] = []
    try:
        for _ in range(asks + 1):
            start = time.perf_counter()
            if path == "direct":
                trial = study.ask()
                number, params = trial.number, sample_params(trial, resolved)
            else:
                number, _, params = asking.ask_trial(study, resolved)
            seconds.append(time.perf_counter() - start)
            if set(params) - set(resolved):
                raise RuntimeError(f"an ask returned parameters outside the space: {sorted(params)}")
            study.tell(number, float(rng.uniform(0.1, 0.98)))  # a worker finishes its trial before the next ask
        held = None
        if path != "direct":
            windowed = asking.storage_of(study)
            held = len(windowed.window(windowed.get_study_id_from_name(study_name)).trials())
    finally:
        asking.BEST_TRIALS, asking.RECENT_TRIALS = sizes
        storage.engine.dispose()
    warm = seconds[1:]
    return {"cold_ms": round(1000 * seconds[0], 1), "median_ms": round(1000 * statistics.median(warm), 1),
            "max_ms": round(1000 * max(warm), 1), "asks": len(warm), "trials_held": held}


def time_prunes(url: str, study_name: str, reports: int, path: str) -> dict[str, Any]:
    """Seconds per pruning decision on a running trial's epoch report; the first (a joining worker's) apart.

    Paths: `window` the worker's trial, whose pruner reads `workers.pruning`'s window (the service now),
    `full` Optuna's `trial.should_prune()` on its own storage, which reads every trial of the study (the
    service before). The median pruner; the bulk-written trials have no curves, so this times the reads.
    """
    import optuna

    from app.core.optuna_store import optuna_storage
    from workers import asking, pruning

    storage = optuna_storage(url)
    pruner = optuna.pruners.MedianPruner()
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    study_id = storage.get_study_id_from_name(study_name)
    # Created as the service creates it, past the study's cached storage: study.ask() would read every trial.
    trial_id = storage.create_new_trial(study_id)
    if path == "window":
        trial = pruning.trial(asking.open_study(storage, study_name, optuna.samplers.RandomSampler(), pruner),
                              trial_id)
    else:
        trial = optuna.Trial(study, trial_id)
    seconds: list[float] = []
    for step in range(reports + 1):
        trial.report(0.5, step)
        start = time.perf_counter()
        trial.should_prune()
        seconds.append(time.perf_counter() - start)
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    held = len(trial.study.get_trials(deepcopy=False))
    warm = seconds[1:]
    return {"cold_ms": round(1000 * seconds[0], 1), "median_ms": round(1000 * statistics.median(warm), 1),
            "reports": len(warm), "trials_held": held}


def run_asks(sizes: list[int], asks: int, paths: list[str], database: str = "sqlite",
             admin_url: str = POSTGRES_ADMIN_URL, sampler: str = "tpe") -> list[dict[str, Any]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True
    resolved = mnist_space()
    out = []
    for n in sizes:
        configs = random_configs(n, resolved)
        row: dict[str, Any] = {"trials_in_study": n, "database": database, "sampler": sampler}
        for path in paths:
            with _ask_database(database, admin_url) as url:
                started = time.perf_counter()
                fill_study(url, f"asks-{n}", configs, resolved)
                if database == "postgresql":
                    _analyze(url)
                row["fill_s"] = round(time.perf_counter() - started, 1)
                row[path] = time_asks(url, f"asks-{n}", resolved, asks, path, sampler)
                print(f"{sampler} asks at {n} trials ({database}), {path}: {row[path]}", flush=True)
                if path != "direct" and sampler == "tpe":  # the pruner's reads do not depend on the sampler
                    row[f"prune_{path}"] = time_prunes(url, f"asks-{n}", asks, path)
                    print(f"pruning at {n} trials ({database}), {path}: {row[f'prune_{path}']}", flush=True)
        out.append(row)
    return out


@contextmanager
def _ask_database(database: str, admin_url: str) -> Iterator[str]:
    if database == "postgresql":
        with fresh_postgres(admin_url) as (url, _):
            yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-asks-"))
    try:
        yield f"sqlite:///{tmp / 'optuna.db'}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- reads: the API's reads of a 100,000-trial study -----------------------------------------------------

READ_STATES = (None, "complete", "pruned", "fail", "running")
READ_REPEATS = 7
def _median_ms(fn: Any, repeats: int = READ_REPEATS) -> float:
    fn()  # warm the connection pool and the page cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


@contextmanager
def _captured(engine: Any) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements an engine runs meanwhile (statement, parameters)."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _plans(engine: Any, statements: list[tuple[str, Any]]) -> list[str]:
    """EXPLAIN of each statement on its own database: what index (if any) each query reads."""
    out = []
    sqlite = engine.dialect.name == "sqlite"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith("SELECT") or "hp_trials" not in statement:
                continue
            cursor.execute(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement, parameters)
            rows = cursor.fetchall()
            out.append(" | ".join(str(r[-1] if sqlite else r[0]).strip() for r in rows))
    finally:
        raw.close()
    return out


def time_reads(url: str, built: Any, services: dict[str, Any]) -> dict[str, Any]:
    """Median milliseconds of each read through the given service modules."""
    from app.core.config import Settings
    from app.core.db import Database

    db, settings = Database(url), Settings(database_url=url)
    owner, sid, n = "bench", built.study_id, built.n_trials
    trials, studies, exports, importance = (services[k] for k in ("trials", "studies", "exports", "importance"))
    out: dict[str, Any] = {"summary_ms": _median_ms(lambda: studies.get_study(db, owner=owner, study_id=sid))}
    pages: dict[str, float] = {}
    for sort in ("number", "value", "duration", "newest"):
        for state in READ_STATES:
            def page(sort: str = sort, state: str | None = state) -> Any:
                first = trials.list_trials(db, owner=owner, study_id=sid, limit=100, sort=sort, state=state)
                if first.next_cursor:  # and the page after it, through the cursor
                    trials.list_trials(db, owner=owner, study_id=sid, limit=100, sort=sort, state=state,
                                       cursor=first.next_cursor)
            pages[f"{sort}/{state or 'all'}"] = round(_median_ms(page) / 2, 1)
    out["page_ms"] = pages
    out["page_max_ms"] = max(pages.values())
    out["poll_ms"] = _median_ms(lambda: trials.list_trials(db, owner=owner, study_id=sid, limit=100,
                                                           after=n - 20))
    def first_chunk() -> None:
        next(iter(exports.trials_csv(db, settings, owner=owner, study_id=sid)))
    out["csv_first_chunk_ms"] = _median_ms(first_chunk)
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    size = sum(len(c) for c in exports.trials_csv(db, settings, owner=owner, study_id=sid))
    out["csv_total_s"] = round(time.perf_counter() - start, 2)
    out["csv_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    out["csv_mib"] = round(size / 2**20, 1)
    importance._cache.clear()
    start = time.perf_counter()
    result = importance.param_importance(db, settings, owner=owner, study_id=sid)
    out["importance_cold_ms"] = round(1000 * (time.perf_counter() - start), 1)
    out["importance_warm_ms"] = _median_ms(lambda: importance.param_importance(db, settings, owner=owner,
                                                                              study_id=sid))
    out["importance"] = {"evaluator": result.evaluator, "n_trials": result.n_trials,
                         "sampled_from": getattr(result, "sampled_from", None),
                         "top": [i.name for i in result.importances[:3]]}
    with _captured(db.engine) as statements:
        for sort in ("number", "value", "duration", "newest"):
            for state in READ_STATES:
                trials.list_trials(db, owner=owner, study_id=sid, limit=100, sort=sort, state=state)
        studies.get_study(db, owner=owner, study_id=sid)
    out["plans"] = _plans(db.engine, statements)
    db.dispose()
    return out


def run_reads(sizes: list[int], database: str, admin_url: str = POSTGRES_ADMIN_URL) -> list[dict[str, Any]]:
    """Each size on a fresh database, every read through the services as they are.

    (The "before" column of docs/benchmarks/scale.md was measured by this function at the time, on the
    services and schema of commit c37796a; those modules no longer import against today's code.)
    """
    from app.core import migrate
    from app.services import exports, importance, studies, trials
    from benchmarks.dashboard_data import build_study

    out = []
    for n in sizes:
        with _ask_database(database, admin_url) as url:
            migrate.upgrade(url)
            started = time.perf_counter()
            built = build_study(url, n_trials=n)
            if database == "postgresql":
                _analyze(url)
            row: dict[str, Any] = {"trials_in_study": n, "database": database,
                                   "fill_s": round(time.perf_counter() - started, 1)}
            row["now"] = time_reads(url, built, {"trials": trials, "studies": studies, "exports": exports,
                                                 "importance": importance})
        out.append(row)
    return out


def _analyze(url: str) -> None:
    """What autovacuum does after a bulk load: planner statistics for the new rows."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()


# ---- memory: one worker over many trials ---------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def run_memory(n_trials: int, timeout_s: float = 1800.0, prefill: int = 0) -> dict[str, Any]:
    """Sample the worker's VmRSS after every MEMORY_EVERY finished trials up to n_trials.

    The study holds a few more trials than that, so the last sample is taken while trials still run,
    before the study's finalization (test evaluation, ensemble) could start in the same worker. With
    `prefill`, the worker goes on with a study that already holds that many finished trials, written in
    bulk (builtin digits, TPE, median pruning, 1 epoch a trial), on SQLite.
    """
    marks = sorted({min(MEMORY_EVERY, n_trials), *range(MEMORY_EVERY, n_trials + 1, MEMORY_EVERY), n_trials})
    samples: list[dict[str, Any]] = []
    with ExitStack() as stack:
        url = None
        if prefill:
            from app.core import migrate
            from benchmarks.dashboard_data import build_study

            home = Path(tempfile.mkdtemp(prefix="hpsearch-memory-"))
            stack.callback(shutil.rmtree, home, ignore_errors=True)
            url = f"sqlite:///{home / 'hpsearch.db'}"
            migrate.upgrade(url)
            built = build_study(url, n_trials=prefill, epochs=1, open_trials=n_trials + 5)
        svc = stack.enter_context(running_service(slots=1, separate_workers=1, database_url=url))
        worker_pid = svc.procs[1].pid
        if prefill:
            study_id = built.study_id
        else:
            x, y = tiny_dataset()
            ref = svc.upload_npz("digits-781", x, y)
            study_id, _ = svc.submit({**tiny_spec(ref, n_trials + 5, 1), "name": "bench-scale-memory"})
        deadline = time.monotonic() + timeout_s
        while marks and time.monotonic() < deadline:
            study = svc.study(study_id)
            finished = study["progress"]["finished"] - prefill
            if finished >= marks[0]:
                samples.append({"after_trials": finished, "rss_mib": round(rss_mib(worker_pid), 1)})
                marks = [m for m in marks if m > finished]
            elif study["status"] in ("completed", "cancelled", "failed"):
                break
            else:
                time.sleep(0.1)
    if not samples:
        raise RuntimeError("the worker finished no trial in time")
    first, last = samples[0], samples[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    return {"n_trials": n_trials, "prefill": prefill, "samples": samples, "first": first, "last": last,
            "growth_mib": round(growth, 1), "growth_fraction": round(growth / first["rss_mib"], 4),
            "complete_run": last["after_trials"] >= n_trials}


def memory_ok(r: dict[str, Any]) -> bool:
    return bool(r["complete_run"]) and r["growth_fraction"] <= FLAT_MEMORY_GROWTH


# ---- driver --------------------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    if c := result.get("claims"):
        rows.append((f"{c['workers']} workers on PostgreSQL, {c['n_trials']} tiny trials",
                     f"{c['claims_per_s']} claims/s, {c['trials_per_s']} trials/s, status {c['status']}, "
                     f"{c['distinct_numbers']} distinct numbers, {c['started_twice']} started twice, "
                     f"{c['postgres_deadlocks']} deadlocks"))
    for a in result.get("asks", []):
        rows.append((f"{a['sampler']} ask at {a['trials_in_study']} trials ({a['database']})",
                     ", ".join(f"{p} {a[p]['median_ms']} ms (cold {a[p]['cold_ms']}, {a[p]['trials_held']} held)"
                               for p in ("window", "full", "direct") if p in a)))
        if any(f"prune_{p}" in a for p in ("window", "full")):
            rows.append((f"pruning decision at {a['trials_in_study']} trials ({a['database']})",
                         ", ".join(f"{p} {a[k]['median_ms']} ms (cold {a[k]['cold_ms']}, {a[k]['trials_held']} held)"
                                   for p in ("window", "full") if (k := f"prune_{p}") in a)))
    for r in result.get("reads", []):
        x = r["now"]
        rows.append((f"reads at {r['trials_in_study']} trials ({r['database']})",
                     f"summary {x['summary_ms']} ms, page max {x['page_max_ms']} ms, poll {x['poll_ms']} ms, "
                     f"csv first chunk {x['csv_first_chunk_ms']} ms (all {x['csv_total_s']} s, "
                     f"peak {x['csv_peak_mib']} MiB), importance cold {x['importance_cold_ms']} ms "
                     f"warm {x['importance_warm_ms']} ms"))
    if m := result.get("memory"):
        rows.append((f"worker RSS over {m['n_trials']} trials after {m['prefill']}",
                     f"{m['first']['rss_mib']} MiB after {m['first']['after_trials']}, "
                     f"{m['last']['rss_mib']} MiB after {m['last']['after_trials']}: "
                     f"{m['growth_mib']:+} MiB ({100 * m['growth_fraction']:+.1f}%)"))
    width = max((len(r[0]) for r in rows), default=0)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="claims,asks,memory",
                        help="comma list of claims, asks, reads, memory")
    parser.add_argument("--read-sizes", default="10000,100000", help="trials of the read studies, comma list")
    parser.add_argument("--workers", type=int, default=16, help="worker processes for the claims run")
    parser.add_argument("--trials", type=int, default=320, help="tiny trials of the claims run")
    parser.add_argument("--postgres-url", default=POSTGRES_ADMIN_URL, help="a server's admin database URL")
    parser.add_argument("--ask-sizes", default="1000,10000", help="finished trials in the study, comma list")
    parser.add_argument("--asks", type=int, default=10, help="timed asks per size and path (after a cold one)")
    parser.add_argument("--ask-paths", default="window,full", help="comma list of window, full, direct")
    parser.add_argument("--ask-sampler", default="tpe", choices=["tpe", "random"])
    parser.add_argument("--ask-database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--memory-trials", type=int, default=200, help="trials of the memory run")
    parser.add_argument("--memory-prefill", type=int, default=0,
                        help="finished trials the memory run's study holds before the worker goes on with it")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"claims", "asks", "reads", "memory"}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    result: dict[str, Any] = {}
    if "claims" in parts:
        result["claims"] = run_claims(args.workers, args.trials, args.postgres_url)
        result["claims"]["ok"] = claims_ok(result["claims"])
    if "asks" in parts:
        result["asks"] = run_asks([int(s) for s in args.ask_sizes.split(",") if s.strip()], args.asks,
                                  [p for p in args.ask_paths.split(",") if p], args.ask_database, args.postgres_url,
                                  args.ask_sampler)
    if "reads" in parts:
        result["reads"] = run_reads([int(s) for s in args.read_sizes.split(",") if s.strip()], args.ask_database,
                                    args.postgres_url)
    if "memory" in parts:
        result["memory"] = run_memory(args.memory_trials, prefill=args.memory_prefill)
        result["memory"]["ok"] = memory_ok(result["memory"])
    print_table(result)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
