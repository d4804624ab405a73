"""The reaper through a database outage: one warning line per failed tick, a traceback only for the
unexpected (an outage is expected; hundreds of tracebacks in a worker's log would hide a real one)."""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy.exc import OperationalError

from workers.reaper import Reaper


def _tick_once(monkeypatch: pytest.MonkeyPatch, error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()

    def failing(self: Reaper) -> list[object]:
        stop.set()
        raise error

    monkeypatch.setattr(Reaper, "tick", failing)
    with caplog.at_level(logging.WARNING, logger="hpsearch.worker"):
        Reaper(db=None, grace_s=1.0).run(stop, 0.001)  # type: ignore[arg-type]


def test_an_outage_is_one_line_and_an_unexpected_error_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    refused = OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
    _tick_once(monkeypatch, refused, caplog)
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("WARNING", None)]
    assert "the database is unreachable (OperationalError)" in caplog.records[0].getMessage()
    caplog.clear()
    _tick_once(monkeypatch, ValueError("a bug"), caplog)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
