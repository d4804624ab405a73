"""Structured logs: JSON lines when stderr is not a terminal, with study/trial/worker ids as fields.

Callers attach ids with `logging.LoggerAdapter(log, {"worker_id": ..., "study_id": ...})` or
`log.info(..., extra={...})`; log shippers (Loki, CloudWatch, Elasticsearch) can then filter on them.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import IO, Any

CONTEXT_FIELDS = ("study_id", "trial", "worker_id", "device", "attempt", "runner")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: UTC time, level, logger, message, the context ids present, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
            "pid": record.process,
        }
        out.update(_context(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Short lines for a person at a terminal, the context ids in brackets."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={v}" for k, v in _context(record).items())
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        text = f"{base}  [{ctx}]" if ctx else base
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k in CONTEXT_FIELDS if (v := getattr(record, k, None)) is not None}


LEVELS = ("debug", "info", "warning", "error")


def setup_logging(json_logs: bool | None = None, level: int | str | None = None,
                  stream: IO[str] | None = None) -> None:
    """Route every log line (ours and Optuna's) through one handler on the root logger.

    The default level is WARNING on a terminal, where a line per trial would break `hpsearch follow`'s
    progress bar (`--log-level info` shows them), and INFO elsewhere (a file, a log shipper).
    """
    stream = sys.stderr if stream is None else stream
    if json_logs is None:
        json_logs = not stream.isatty()
    if level is None:
        level = logging.WARNING if stream.isatty() else logging.INFO
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # warnings.warn (Optuna's ExperimentalWarning, torch's UserWarnings) would print raw text to stderr,
    # breaking JSON lines; as records of the "py.warnings" logger they go through the handler above.
    logging.captureWarnings(True)
    _route_optuna_logs()


def _route_optuna_logs() -> None:
    """Optuna prints through its own handler; send it to ours instead and keep only its warnings.

    Its per-trial INFO lines repeat what the worker logs with the study and trial ids.
    """
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The service chose TPE's `group` on purpose (workers/search.py): that it is experimental is no news to
    # the user, at every study. Forked runners inherit the filter.
    warnings.filterwarnings("ignore", message=r"Argument ``group`` is an experimental feature",
                            category=optuna.exceptions.ExperimentalWarning)
