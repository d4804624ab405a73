"""Prometheus metrics: request latency from the API, the rest read from the database at scrape time.

Reading state from SQL keeps the numbers right with many API copies and workers on many machines: every
copy reports the same totals, so a dashboard may scrape any one of them. Counters here are derived from
rows, so deleting a study lowers them; Prometheus treats that as a counter reset.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.core.db import Database
from app.models import FailureKind, Study, StudyStatus, Trial, TrialState, Worker
from app.models.base import utcnow

log = logging.getLogger("hpsearch.metrics")

REQUEST_LATENCY = Histogram("hpsearch_http_request_seconds", "API request latency",
                            ["method", "route", "status"], registry=None)
TRIAL_DURATION_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
ACTIVE_STUDY_STATUSES = (StudyStatus.QUEUED.value, StudyStatus.RUNNING.value)


# ---- database ------------------------------------------------------------------------------------------


class DatabaseCollector:
    """Studies, trials, queue, workers and leases, each family from one grouped query.

    The aggregates read whole tables; with a cache, scrapes within its interval share one reading.
    """

    def __init__(self, db: Database, cache: DatabaseMetricsCache | None = None) -> None:
        self.db = db
        self.cache = cache

    def collect(self) -> Iterable[Metric]:
        yield from (self.cache.families(self.db) if self.cache is not None else read_database_families(self.db))


def read_database_families(db: Database) -> list[Metric]:
    with db.read_session() as session:
        return [
            _studies(session), *_trial_counters(session), _queue_depth(session), _running(session),
            *_leases(session), *_workers(session), _duration_histogram(session),
        ]


class DatabaseMetricsCache:
    """The database families of the last reading, reused for `max_age_s` seconds.

    Several Prometheus servers (or a short scrape interval) would otherwise run every whole-table aggregate
    on each scrape. Concurrent scrapes wait for one reading instead of each starting their own.
    """

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._families: list[Metric] | None = None
        self._read_at = 0.0
        self._db: Database | None = None

    def families(self, db: Database) -> list[Metric]:
        with self._lock:
            now = self._clock()
            if self._families is None or self._db is not db or now - self._read_at >= self.max_age_s:
                self._families, self._read_at, self._db = read_database_families(db), now, db
            return self._families


def _studies(session: Session) -> Metric:
    counts = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
    family = GaugeMetricFamily("hpsearch_studies", "Studies by status", labels=["status"])
    for status in StudyStatus:
        family.add_metric([status.value], counts.get(status.value, 0))
    return family


def _trial_counters(session: Session) -> list[Metric]:
    by_state = dict(session.execute(select(Trial.state, func.count()).group_by(Trial.state)).all())
    started_n = session.scalar(select(func.count()).select_from(Trial).where(Trial.started_at.is_not(None)))
    started = CounterMetricFamily("hpsearch_trials_started", "Trials that started on a worker at least once")
    started.add_metric([], started_n or 0)
    finished = CounterMetricFamily("hpsearch_trials_finished", "Finished trials by final state",
                                   labels=["state"])
    waiting = GaugeMetricFamily("hpsearch_trials_waiting", "Enqueued or re-queued trials awaiting a worker")
    waiting.add_metric([], by_state.get(TrialState.WAITING.value, 0))
    paused = GaugeMetricFamily("hpsearch_trials_paused", "Trials paused by a client, awaiting a resume")
    paused.add_metric([], by_state.get(TrialState.PAUSED.value, 0))
    for state in TrialState:
        if state.is_finished():
            finished.add_metric([state.value], by_state.get(state.value, 0))
    return [started, finished, waiting, paused]


def _queue_depth(session: Session) -> Metric:
    """Trials still to start in studies that accept them: the work waiting for a free slot."""
    begun = func.coalesce(func.sum(case((Trial.state != TrialState.WAITING.value, 1), else_=0)), 0)
    rows = session.execute(
        select(Study.n_trials, begun).outerjoin(Trial, Trial.study_id == Study.id)
        .where(Study.status.in_(ACTIVE_STUDY_STATUSES), Study.stop_requested_at.is_(None))
        .group_by(Study.id, Study.n_trials)).all()
    family = GaugeMetricFamily("hpsearch_queue_depth", "Trials not yet running in queued and running studies")
    family.add_metric([], sum(max(0, n_trials - n_begun) for n_trials, n_begun in rows))
    return family


def _running(session: Session) -> Metric:
    rows = session.execute(select(Trial.worker_id, Trial.device, func.count())
                           .where(Trial.state == TrialState.RUNNING.value)
                           .group_by(Trial.worker_id, Trial.device)).all()
    family = GaugeMetricFamily("hpsearch_running_trials", "Running trials", labels=["worker", "device"])
    for worker, device, n in rows:
        family.add_metric([worker or "", device or ""], n)
    return family


def _leases(session: Session) -> list[Metric]:
    """Attempts handed to another worker (every retry raises `attempt`), and trials failed for good because
    their worker was lost, their deadline passed or a checkpoint would have gone past their owner's quota."""
    requeued = session.scalar(select(func.coalesce(func.sum(Trial.attempt - 1), 0))) or 0
    kinds = [FailureKind.LOST, FailureKind.DEADLINE, FailureKind.CHECKPOINT_QUOTA]
    by_failure = dict(session.execute(select(Trial.failure, func.count()).where(
        Trial.state == TrialState.FAIL.value, Trial.failure.in_(kinds)).group_by(Trial.failure)).all())
    failed, late = by_failure.get(FailureKind.LOST, 0), by_failure.get(FailureKind.DEADLINE, 0)
    reaped = CounterMetricFamily("hpsearch_leases_reaped",
                                 "Leases reaped after their worker stopped beating, by the trial's fate",
                                 labels=["outcome"])
    reaped.add_metric(["requeued"], requeued)
    reaped.add_metric(["failed"], failed)
    deadline = CounterMetricFamily("hpsearch_trials_deadline_exceeded",
                                   "Trials failed because an attempt ran past its wall-clock deadline")
    deadline.add_metric([], late)
    quota = CounterMetricFamily("hpsearch_trials_checkpoint_quota_exceeded",
                                "Trials failed because a checkpoint would have taken their owner past "
                                "HPSEARCH_CHECKPOINT_QUOTA_MB")
    quota.add_metric([], by_failure.get(FailureKind.CHECKPOINT_QUOTA, 0))
    unusable = CounterMetricFamily("hpsearch_checkpoints_unusable",
                                   "Checkpoints a resuming trial could not use (truncated, mismatched, missing) and "
                                   "passed over for an older one or a start from scratch")
    unusable.add_metric([], session.scalar(select(func.coalesce(func.sum(Trial.unusable_checkpoints), 0))) or 0)
    return [reaped, deadline, quota, unusable]


def _workers(session: Session) -> list[Metric]:
    rows = session.execute(select(Worker.id, Worker.hostname, Worker.slots, Worker.heartbeat_at)
                           .where(Worker.stopped_at.is_(None))).all()
    now = utcnow()
    alive = GaugeMetricFamily("hpsearch_workers", "Registered, not stopped worker supervisors")
    alive.add_metric([], len(rows))
    labels = ["worker", "host"]
    slots = GaugeMetricFamily("hpsearch_worker_slots", "Trial slots of live workers", labels=labels)
    age = GaugeMetricFamily("hpsearch_worker_heartbeat_age_seconds", "Seconds since a live worker beat",
                            labels=labels)
    for worker_id, host, n_slots, beat in rows:
        slots.add_metric([worker_id, host], n_slots)
        age.add_metric([worker_id, host], max(0.0, (now - beat).total_seconds()))
    return [alive, slots, age]


def _duration_histogram(session: Session) -> Metric:
    """Finished trials' wall-clock durations by state; the buckets are counted in SQL, not in Python."""
    d = Trial.duration_s
    bucket_counts = [func.sum(case((d <= bound, 1), else_=0)) for bound in TRIAL_DURATION_BUCKETS_S]
    rows = session.execute(select(Trial.state, func.count(), func.coalesce(func.sum(d), 0.0), *bucket_counts)
                           .where(d.is_not(None)).group_by(Trial.state)).all()
    family = HistogramMetricFamily("hpsearch_trial_duration_seconds",
                                   "Wall-clock duration of finished trials", labels=["state"])
    for state, count, total, *cumulative in rows:
        buckets = [(_bound_label(b), int(n or 0))
                   for b, n in zip(TRIAL_DURATION_BUCKETS_S, cumulative, strict=True)]
        family.add_metric([state], [*buckets, ("+Inf", int(count))], sum_value=float(total))
    return family


def _bound_label(bound: float) -> str:
    return repr(float(bound))


# ---- GPUs (NVML) ---------------------------------------------------------------------------------------


class GpuCollector:
    """Memory and utilization of this host's GPUs through NVML; yields nothing where NVML is unavailable.

    NVML reads driver counters and never creates a CUDA context, so it is safe in the API process. It sees
    the GPUs of the machine that serves /metrics: `hpsearch serve` on a GPU box, not remote workers.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False
        self._lock = threading.Lock()
        self.host = socket.gethostname()

    def _load(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._nvml = _init_nvml()
            return self._nvml

    def available(self) -> bool:
        return self._load() is not None

    def collect(self) -> Iterator[Metric]:
        nvml = self._load()
        if nvml is None:
            return
        labels = ["host", "index", "uuid", "name"]
        used = GaugeMetricFamily("hpsearch_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        total = GaugeMetricFamily("hpsearch_gpu_memory_total_bytes", "GPU memory installed", labels=labels)
        util = GaugeMetricFamily("hpsearch_gpu_utilization_ratio",
                                 "Share of the last sample period a kernel ran on the GPU (0-1)",
                                 labels=labels)
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError:
            log.warning("NVML stopped answering; GPU metrics skipped this scrape")
            return
        for index in range(count):
            _add_gpu_samples(nvml, index, [self.host, str(index)], used, total, util)
        yield from (used, total, util)


def _init_nvml() -> Any:
    try:
        import pynvml  # provided by the nvidia-ml-py package
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver on this host
        log.info("NVML unavailable (%s); GPU metrics off", exc)
        return None
    return pynvml


def _add_gpu_samples(nvml: Any, index: int, base: list[str], used: GaugeMetricFamily,
                     total: GaugeMetricFamily, util: GaugeMetricFamily) -> None:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        labels = [*base, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle))]
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError:
        return  # e.g. a GPU fell off the bus: report the others
    used.add_metric(labels, float(memory.used))
    total.add_metric(labels, float(memory.total))
    try:
        util.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
    except nvml.NVMLError:
        pass  # not supported on some devices (e.g. MIG instances)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


GPUS = GpuCollector()


# ---- exposition ----------------------------------------------------------------------------------------


def registry_for(db: Database, cache: DatabaseMetricsCache | None = None) -> CollectorRegistry:
    """A registry per scrape: registering collectors is cheap; only the cache outlives the request."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db, cache))
    registry.register(REQUEST_LATENCY)
    registry.register(GPUS)
    return registry


def render(db: Database, cache: DatabaseMetricsCache | None = None) -> tuple[bytes, str]:
    return generate_latest(registry_for(db, cache)), CONTENT_TYPE_LATEST
