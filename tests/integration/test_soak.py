"""The chaos soak's short mode: real supervisors and the API on one database, studies of every sampler
steered by a client while workers holding a running trial are killed, frozen past their lease grace and
stopped, and the database is cut off; afterwards the database, the artifact folder and the logs must show
every study ended sound and the work each fault cost within its bound (benchmarks/soak.py names the checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import Report, SoakConfig, run
from tests.conftest import _postgres_template

SEED = 20240


def assert_sound(report: Report, studies: int) -> None:
    """What the long run reports, asserted: the chaos hit trials mid-run, at least one resumed from its
    checkpoint, every check looked at something, and none found a violation."""
    assert report.faults["sigkill"] + report.faults["freeze"] + report.faults["sigterm"] >= 1, report.faults
    assert sum(report.lost_work.hits.values()) >= 1, report.lost_work.render()  # a fault stopped a running trial
    assert report.lost_work.resumed_trials >= 1, report.lost_work.render()
    assert report.checks["studies"] == studies and report.checks["finished_trials"] > 0, report.checks
    for looked_at in ("curves", "epoch_recordings", "outcomes", "creates", "optuna_links", "checkpoint_studies",
                      "worker_logs"):
        assert report.checks[looked_at] > 0, (looked_at, report.checks)
    assert report.violations == [], "\n".join(report.violations)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # real processes on shared cores; the soak bounds its own phases
@pytest.mark.postgres
def test_short_soak_on_postgresql_finds_no_violation(tmp_path: Path) -> None:
    _postgres_template()  # skips (outside CI) when the server is not there
    config = SoakConfig(database="postgresql", minutes=1.0, workers=3, studies=8, seed=SEED, home=tmp_path)
    report = run(config, log=lambda _: None)
    print(report.render(config))
    assert sum(report.faults.values()) >= 4, report.faults  # the chaos really happened
    assert_sound(report, 8)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # real processes on shared cores; the soak bounds its own phases
def test_short_soak_on_sqlite_finds_no_violation(tmp_path: Path) -> None:
    # Three supervisors, as on PostgreSQL: the witness is never signalled, and one victim alone is often
    # still starting after its predecessor's kill, which leaves too few trials hit mid-run to resume.
    config = SoakConfig(database="sqlite", minutes=1.0, workers=3, studies=5, seed=SEED, home=tmp_path)
    report = run(config, log=lambda _: None)
    print(report.render(config))
    assert sum(report.faults.values()) >= 3, report.faults
    assert_sound(report, 5)


def test_lost_work_is_charged_to_the_fault_that_stopped_the_attempt() -> None:
    """The count of lost work can fail: a resume that retrains more than checkpoint_every epochs after a kill,
    or anything after a graceful stop, is a violation; a resume within the bound is not."""
    from collections import Counter
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from benchmarks.soak_lost_work import FaultHit, LostWork, Recording, charge, interruptions

    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def rec(epoch: int, s: float, lease: tuple[str, int]) -> Recording:
        return Recording(1, "s", epoch, lease[1], t0 + timedelta(seconds=s), s, lease)

    a, b = ("w1", 1), ("w2", 2)
    # epochs 1..3 on w1, killed at 3.5 s; resumed from epoch 2 on w2: epoch 3 trained again, then 4
    curve = [rec(1, 1, a), rec(2, 2, a), rec(3, 3, a), rec(3, 10, b), rec(4, 11, b)]
    kill = FaultHit("sigkill", 1, "s", 1, t0 + timedelta(seconds=3.5), t0 + timedelta(seconds=3.5))
    runs = interruptions(curve, [kill])
    assert [(r.epochs, r.cause) for r in runs] == [([3], "sigkill")]
    assert [(r.epochs, r.cause) for r in interruptions(curve, [])] == [([3], "unprovoked")]

    report = SimpleNamespace(checks=Counter(), violations=[])
    report.violate = lambda check, evidence: report.violations.append(f"{check}: {evidence}")
    trial = SimpleNamespace(id=1, study_id="s", number=0, state="complete", attempt=2)
    charge(runs[0], 1, trial, LostWork(), report)
    assert report.violations == []
    restart = interruptions([rec(1, 1, a), rec(2, 2, a), rec(1, 10, b), rec(2, 11, b), rec(3, 12, b)], [kill])
    charge(restart[0], 1, trial, LostWork(), report)  # started over: two epochs again, one allowed
    graceful = FaultHit("sigterm", 1, "s", 1, t0 + timedelta(seconds=2.5), t0 + timedelta(seconds=4))
    charge(interruptions(curve, [graceful])[0], 1, trial, LostWork(), report)
    assert [v.split(":")[0] for v in report.violations] == ["lost_work", "lost_work"], report.violations
    # A graceful stop of the attempt that retrains, before its first epoch: the kill of the one before it
    # cost that epoch, not the stop.
    late_stop = FaultHit("sigterm", 1, "s", 2, t0 + timedelta(seconds=9), t0 + timedelta(seconds=20))
    assert [r.cause for r in interruptions(curve, [kill, late_stop])] == ["sigkill"]


def test_the_driver_never_pauses_the_study_the_injector_waits_on() -> None:
    """A pause of the long study while the injector waits for its trial mid-run held it off the workers for
    the whole wait, and a short soak then injected no fault at all: the driver leaves it running until then."""
    import random
    from types import SimpleNamespace

    from benchmarks.soak import Driver, Ledger

    driver = Driver(SimpleNamespace(home=Path("."), base="http://unused"), "key", random.Random(0), Report(),
                    Ledger(), engine=None)  # type: ignore[arg-type]
    probe: list[str] = ["long"]
    driver.unpausable = lambda: set(probe)
    driver._studies = lambda *states: ["long", "other"]  # type: ignore[method-assign]
    paused: list[str] = []
    driver.call = lambda method, path, **kw: paused.append(path.split("/")[2])  # type: ignore[method-assign]
    for _ in range(20):
        driver.steer("pause")
    assert paused == ["other"] * 20
    probe.clear()  # the injector has hit its trial: the long study is fair game again
    for _ in range(20):
        driver.steer("pause")
    assert "long" in paused[20:]
