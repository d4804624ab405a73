"""Structured logs: one JSON object per line, carrying the study, trial and worker ids of a real run."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from app.core.db import Database
from app.core.logging import setup_logging
from tests.conftest import make_settings
from tests.factories import client_for, create_study_via_api, running_supervisor, wait_for_status


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state (root handler, Optuna's handler): put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    verbosity = optuna.logging.get_verbosity()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)  # else the next setup_logging keeps the stale capture and changes nothing
    optuna.logging.disable_propagation()
    optuna.logging.enable_default_handler()
    optuna.logging.set_verbosity(verbosity)


@pytest.fixture
def log_stream(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    setup_logging(stream=stream)  # a StringIO is no terminal: JSON by default
    return stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is JSON


def test_worker_logs_carry_study_trial_and_worker_ids(log_stream: io.StringIO, sqlite_url: str,
                                                      tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    sid = create_study_via_api(client, budget={"n_trials": 1, "epochs": 1})
    with running_supervisor(settings, db, slots=1) as supervisor:
        wait_for_status(client, sid, {"completed", "failed"})
    db.dispose()
    lines = _lines(log_stream)
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    started = [line for line in lines if line["msg"] == "trial started"]
    assert len(started) == 1
    assert started[0]["study_id"] == sid and started[0]["trial"] == 0 and started[0]["attempt"] == 1
    assert started[0]["worker_id"] == supervisor.worker_id and started[0]["device"] == "cpu"
    finished = [line for line in lines if line["msg"].startswith("trial complete")]
    assert finished and finished[0]["study_id"] == sid and finished[0]["worker_id"] == supervisor.worker_id
    assert any(line["msg"].startswith("worker started") and line["worker_id"] == supervisor.worker_id
               for line in lines)


def test_json_lines_hold_context_and_tracebacks(log_stream: io.StringIO) -> None:
    log = logging.LoggerAdapter(logging.getLogger("hpsearch.test"), {"study_id": "s1", "trial": 4,
                                                                     "worker_id": "w1"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("trial failed")
    (line,) = _lines(log_stream)
    assert (line["study_id"], line["trial"], line["worker_id"]) == ("s1", 4, "w1")
    assert line["level"] == "ERROR" and line["logger"] == "hpsearch.test" and line["ts"].endswith("+00:00")
    assert "ValueError: boom" in line["exc"] and "device" not in line  # absent ids are left out


def test_optuna_warnings_come_out_as_json(log_stream: io.StringIO) -> None:
    optuna.logging.get_logger("optuna.test").warning("from optuna")
    optuna.logging.get_logger("optuna.test").info("per-trial chatter")
    assert [(line["logger"], line["msg"]) for line in _lines(log_stream)] == [("optuna.test", "from optuna")]


def test_text_lines_for_a_terminal(restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging(json_logs=False, stream=stream)
    logging.getLogger("hpsearch.test").info("hello", extra={"worker_id": "w1"})
    assert stream.getvalue().rstrip().endswith("hello  [worker_id=w1]")


def test_warnings_become_log_records_not_raw_text(restore_logging: None) -> None:
    """Optuna's ExperimentalWarning (and any warnings.warn) is a JSON line like every other log line."""
    import warnings

    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        setup_logging(stream=stream)
        warnings.warn("Argument ``constant_liar`` is an experimental feature.",
                      optuna.exceptions.ExperimentalWarning, stacklevel=1)
        logging.captureWarnings(False)
    lines = stream.getvalue().splitlines()
    assert lines, "the warning reached the log"
    records = [json.loads(line) for line in lines]  # every line is JSON: no raw warning text
    [record] = [r for r in records if "experimental feature" in r["msg"]]
    assert record["logger"] == "py.warnings" and record["level"] == "WARNING"
    assert "ExperimentalWarning" in record["msg"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_warnings_only_and_no_warning_about_the_services_own_choice(
        restore_logging: None) -> None:
    """Per-trial INFO lines would break `follow`'s progress bar in the terminal `serve` runs in; Optuna's
    warning that TPE's `group` (chosen by the service) is experimental said nothing the user could act on."""
    import warnings

    stream = _Terminal()
    with warnings.catch_warnings():
        setup_logging(stream=stream)  # a terminal: text lines, WARNING and up
        logging.getLogger("workers.attempt").info("trial started")
        warnings.warn("Argument ``group`` is an experimental feature.", optuna.exceptions.ExperimentalWarning,
                      stacklevel=1)
        logging.getLogger("workers.attempt").warning("a lease lost")
        logging.captureWarnings(False)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING a lease lost"), lines

    shown = _Terminal()
    setup_logging(level="info", stream=shown)  # --log-level info
    logging.getLogger("workers.attempt").info("trial started")
    assert shown.getvalue().rstrip().endswith("INFO    trial started")
