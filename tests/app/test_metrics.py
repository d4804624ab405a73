"""GET /metrics in the Prometheus text format, on SQLite and PostgreSQL: the numbers follow the database."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import event, update

from app.core import metrics
from app.core.config import Settings
from app.core.db import Database
from app.models import FailureKind, Trial, TrialState
from app.models.base import utcnow
from tests.factories import API, client_for, create_study_via_api, running_supervisor, wait_for_status
from workers import leasing, retries


class Scrape:
    """One parsed scrape of /metrics."""

    def __init__(self, client: TestClient) -> None:
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        self.families = {f.name: f for f in text_string_to_metric_families(response.text)}

    def samples(self, family: str, sample: str | None = None, **labels: str) -> list[Sample]:
        return [s for s in self.families[family].samples if s.name == (sample or family)
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, family: str, sample: str | None = None, **labels: str) -> float:
        (found,) = self.samples(family, sample, **labels)
        return found.value


def _fresh_client(settings: Settings, db: Database) -> TestClient:
    """Every scrape reads the database: these tests change rows between scrapes."""
    return client_for(settings.model_copy(update={"metrics_cache_s": 0.0}), db)


def test_counters_move_after_a_small_study(settings: Settings, db: Database) -> None:
    client = _fresh_client(settings, db)
    before = Scrape(client)
    assert before.value("hpsearch_trials_started", "hpsearch_trials_started_total") == 0
    assert before.value("hpsearch_studies", status="completed") == 0
    assert before.samples("hpsearch_trial_duration_seconds") == []
    sid = create_study_via_api(client, budget={"n_trials": 2, "epochs": 1, "max_parallel": 2})
    queued = Scrape(client)
    assert queued.value("hpsearch_studies", status="queued") == 1
    assert queued.value("hpsearch_queue_depth") == 2

    with running_supervisor(settings, db, slots=2):
        study = wait_for_status(client, sid, {"completed", "failed"})
        live = Scrape(client)
        assert live.value("hpsearch_workers") == 1
        assert sum(s.value for s in live.samples("hpsearch_worker_slots")) == 2
        assert all(0 <= s.value < 60 for s in live.samples("hpsearch_worker_heartbeat_age_seconds"))
    assert study["status"] == "completed", study

    after = Scrape(client)
    assert after.value("hpsearch_studies", status="completed") == 1
    assert after.value("hpsearch_studies", status="queued") == 0
    assert after.value("hpsearch_trials_started", "hpsearch_trials_started_total") == 2
    assert after.value("hpsearch_trials_finished", "hpsearch_trials_finished_total", state="complete") == 2
    assert after.value("hpsearch_trials_finished", "hpsearch_trials_finished_total", state="fail") == 0
    assert after.value("hpsearch_queue_depth") == 0
    assert after.samples("hpsearch_running_trials") == []
    assert after.value("hpsearch_workers") == 0  # the supervisor unregistered at stop
    durations = [t["duration_s"] for t in client.get(f"{API}/studies/{sid}/trials").json()["data"]]
    _assert_histogram_matches(after, durations)
    latency = after.samples("hpsearch_http_request_seconds", "hpsearch_http_request_seconds_count",
                            method="GET", status="200")
    routes = {s.labels["route"]: s.value for s in latency}
    assert routes.get(f"{API}/studies/{{study_id}}", 0) >= 1, routes  # the full template, prefix included
    assert not any(sid in r for r in routes)  # labelled by route template, never by id: bounded series
    _assert_gpu_metrics_follow_nvml(after)


def _assert_histogram_matches(scrape: Scrape, durations: list[float]) -> None:
    family = "hpsearch_trial_duration_seconds"
    buckets = scrape.samples(family, f"{family}_bucket", state="complete")
    assert [b.labels["le"] for b in buckets] == [*map(str, metrics.TRIAL_DURATION_BUCKETS_S), "+Inf"]
    for bucket in buckets:
        bound = float(bucket.labels["le"])
        assert bucket.value == sum(1 for d in durations if d <= bound), bucket
    assert scrape.value(family, f"{family}_count", state="complete") == len(durations) == 2
    assert abs(scrape.value(family, f"{family}_sum", state="complete") - sum(durations)) < 1e-6


def _assert_gpu_metrics_follow_nvml(scrape: Scrape) -> None:
    gpu_families = {name for name in scrape.families if name.startswith("hpsearch_gpu_")}
    if not metrics.GPUS.available():
        assert gpu_families == set()  # skipped quietly, the scrape still answers
        return
    totals = scrape.samples("hpsearch_gpu_memory_total_bytes")
    assert totals and all(s.value > 0 for s in totals)
    assert {"hpsearch_gpu_memory_used_bytes", "hpsearch_gpu_utilization_ratio"} <= gpu_families


def test_a_trial_whose_pause_was_asked_waits_paused_wherever_it_stops(settings: Settings, db: Database) -> None:
    """Its worker died before the next epoch boundary: the reaper parks it paused, not back in line."""
    client = _fresh_client(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 2, "max_attempts": 2})
    claimed = leasing.claim_trial(db, worker_id="w-lost", device="cpu", trial_deadline_s=3600)
    assert claimed is not None
    leasing.bind_trial(db, claimed, number=0, optuna_trial_id=claimed.trial_id, params={})
    assert client.post(f"/api/v1/studies/{sid}/trials/0/pause").json()["state"] == "running"
    assert [r.requeued for r in retries.reap(db, grace_s=-1.0)] == [True]
    trial = client.get(f"/api/v1/studies/{sid}/trials/0").json()
    assert (trial["state"], trial["pause_requested_at"], trial["attempt"]) == ("paused", None, 2)
    scrape = Scrape(client)
    assert (scrape.value("hpsearch_trials_paused"), scrape.value("hpsearch_trials_waiting")) == (1, 0)
    following = leasing.claim_trial(db, worker_id="w2", device="cpu", trial_deadline_s=3600)
    assert following is not None and following.trial_id != claimed.trial_id  # a new trial, not the paused one


def test_reaped_leases_and_deadlines_are_counted(settings: Settings, db: Database) -> None:
    """Leases taken back by the reaper, through the real queue functions the supervisors use."""
    client = _fresh_client(settings, db)
    create_study_via_api(client, budget={"n_trials": 3, "max_attempts": 2})

    def lease(deadline_s: float = 3600.0) -> leasing.Lease:
        claimed = leasing.claim_trial(db, worker_id="w-lost", device="cpu", trial_deadline_s=deadline_s)
        assert claimed is not None
        number = claimed.number if claimed.number is not None else claimed.trial_id
        return leasing.bind_trial(db, claimed, number=number, optuna_trial_id=claimed.trial_id, params={})

    first = lease()
    assert [r.requeued for r in retries.reap(db, grace_s=-1.0)] == [True]  # every beat is "too old"
    scrape = Scrape(client)
    assert scrape.value("hpsearch_leases_reaped", "hpsearch_leases_reaped_total", outcome="requeued") == 1
    assert scrape.value("hpsearch_leases_reaped", "hpsearch_leases_reaped_total", outcome="failed") == 0
    assert scrape.value("hpsearch_trials_waiting") == 1

    assert lease().trial_id == first.trial_id  # the second attempt of the same trial
    assert [r.requeued for r in retries.reap(db, grace_s=-1.0)] == [False]  # max_attempts used
    late = lease()
    with db.session() as session:  # the deadline passed: recorded, not waited for
        session.execute(update(Trial).where(Trial.id == late.trial_id)
                        .values(deadline_at=utcnow() - timedelta(seconds=1)))
    assert len(retries.reap(db, grace_s=3600.0)) == 1  # beating, but past its deadline

    scrape = Scrape(client)
    assert scrape.value("hpsearch_leases_reaped", "hpsearch_leases_reaped_total", outcome="requeued") == 1
    assert scrape.value("hpsearch_leases_reaped", "hpsearch_leases_reaped_total", outcome="failed") == 1
    assert scrape.value("hpsearch_trials_deadline_exceeded", "hpsearch_trials_deadline_exceeded_total") == 1
    assert scrape.value("hpsearch_trials_finished", "hpsearch_trials_finished_total", state="fail") == 2
    assert scrape.value("hpsearch_trials_started", "hpsearch_trials_started_total") == 2


def _bound_lease(db: Database) -> leasing.Lease:
    """The study's next trial, claimed and bound as trial 0 (its Optuna id stands in: no Optuna call here)."""
    claimed = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert claimed is not None
    lease = leasing.bind_trial(db, claimed, number=0, optuna_trial_id=claimed.trial_id, params={})
    assert lease is not None
    return lease


def test_trials_failed_by_the_checkpoint_quota_are_counted(settings: Settings, db: Database) -> None:
    """As a supervisor fails a trial whose checkpoint the quota refused (workers.attempt._on_checkpoint)."""
    client = _fresh_client(settings, db)
    create_study_via_api(client)
    family, total = "hpsearch_trials_checkpoint_quota_exceeded", "hpsearch_trials_checkpoint_quota_exceeded_total"
    assert Scrape(client).value(family, total) == 0
    lease = _bound_lease(db)
    record = leasing.record_checkpoint(db, lease, path="s/checkpoints/trial-0-1/epoch-000001.safetensors",
                                       epoch=1, size=2_000_000, quota_bytes=1_000_000)
    assert record.refused is not None
    assert leasing.finish_trial(db, lease, state=TrialState.FAIL, error=record.refused,
                                failure=FailureKind.CHECKPOINT_QUOTA)
    scrape = Scrape(client)
    assert scrape.value(family, total) == 1
    assert scrape.value("hpsearch_leases_reaped", "hpsearch_leases_reaped_total", outcome="failed") == 0


def test_checkpoints_a_resuming_trial_passed_over_are_counted(settings: Settings, db: Database) -> None:
    """As a supervisor hears from a resuming runner which checkpoints it could not use (workers.attempt)."""
    client = _fresh_client(settings, db)
    create_study_via_api(client)
    family, total = "hpsearch_checkpoints_unusable", "hpsearch_checkpoints_unusable_total"
    assert Scrape(client).value(family, total) == 0
    lease = _bound_lease(db)
    skipped = ["checkpoint of epoch 6 unusable (corrupt: truncated)", "checkpoint of epoch 3 unusable (missing)"]
    assert leasing.note_trial(db, lease, "started over: " + "; ".join(skipped), unusable_checkpoints=2)
    assert Scrape(client).value(family, total) == 2


def test_queue_depth_counts_trials_that_may_still_start(settings: Settings, db: Database) -> None:
    client = _fresh_client(settings, db)
    create_study_via_api(client, budget={"n_trials": 4})
    paused = create_study_via_api(client, budget={"n_trials": 5})
    assert Scrape(client).value("hpsearch_queue_depth") == 9
    assert client.post(f"{API}/studies/{paused}/pause").status_code == 200
    scrape = Scrape(client)
    assert scrape.value("hpsearch_queue_depth") == 4  # a paused study starts nothing
    assert scrape.value("hpsearch_studies", status="paused") == 1
    assert leasing.claim_trial(db, worker_id="w", device="cpu", trial_deadline_s=60) is not None
    scrape = Scrape(client)
    assert scrape.value("hpsearch_queue_depth") == 3
    assert scrape.value("hpsearch_running_trials", worker="w", device="cpu") == 1


def _count_statements(db: Database) -> list[str]:
    """Every SQL statement the database's engine runs from now on."""
    seen: list[str] = []
    event.listen(db.engine, "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_args: seen.append(statement))
    return seen


def test_scrapes_within_the_cache_interval_read_the_database_once(settings: Settings, db: Database) -> None:
    client = client_for(settings.model_copy(update={"metrics_cache_s": 3600.0}), db)
    create_study_via_api(client)
    statements = _count_statements(db)
    first = Scrape(client)
    read_once = len(statements)
    assert read_once > 0 and any("count" in s.lower() for s in statements)
    for _ in range(4):
        assert Scrape(client).value("hpsearch_studies", status="queued") == 1
    assert len(statements) == read_once  # four more scrapes, no more aggregates
    assert first.value("hpsearch_studies", status="queued") == 1

    uncached = _fresh_client(settings, db)
    statements.clear()
    Scrape(uncached)
    per_scrape = len(statements)
    Scrape(uncached)
    assert per_scrape == read_once and len(statements) == 2 * per_scrape
