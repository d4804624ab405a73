"""The chaos soak's short mode: real supervisors and the API on one database, studies of every sampler
steered by a client while workers are killed, frozen past their lease grace, stopped, and the database is cut
off; afterwards the database alone must show every study ended sound (benchmarks/soak.py names the checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import SoakConfig, run
from tests.conftest import _postgres_template

SEED = 20240


@pytest.mark.slow
@pytest.mark.timeout(2400)  # real processes on shared cores; the soak bounds its own phases
@pytest.mark.postgres
def test_short_soak_on_postgresql_finds_no_violation(tmp_path: Path) -> None:
    _postgres_template()  # skips (outside CI) when the server is not there
    config = SoakConfig(database="postgresql", minutes=1.0, workers=3, studies=8, seed=SEED, home=tmp_path)
    report = run(config, log=lambda _: None)
    print(report.render(config))
    assert sum(report.faults.values()) >= 5, report.faults  # the chaos really happened
    assert report.faults["sigkill"] + report.faults["freeze"] + report.faults["sigterm"] >= 1, report.faults
    assert report.checks["studies"] == 8 and report.checks["finished_trials"] > 0, report.checks
    assert report.violations == [], "\n".join(report.violations)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # real processes on shared cores; the soak bounds its own phases
def test_short_soak_on_sqlite_finds_no_violation(tmp_path: Path) -> None:
    config = SoakConfig(database="sqlite", minutes=1.0, workers=2, studies=5, seed=SEED, home=tmp_path)
    report = run(config, log=lambda _: None)
    print(report.render(config))
    assert sum(report.faults.values()) >= 3, report.faults
    assert report.checks["studies"] == 5 and report.checks["finished_trials"] > 0, report.checks
    assert report.violations == [], "\n".join(report.violations)
