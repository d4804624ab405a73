"""Runners that live across trials: each slot thread keeps its last runner, idle on its pipe, for its next job.

Forking a runner per attempt makes every trial pay for a new process, and on a GPU for a new CUDA context,
its cuBLAS and cuDNN handles and a fresh copy of the split on the device. A runner whose job ended cleanly
(each trial told its end, no out-of-memory, not shutting down) stays with its slot instead, torch imported,
its context and the study's tensors resident; the next job of the same study and shape goes to it over the
pipe, without the split. It is replaced when it dies, when its study or job shape changes, after
`runner_trials` jobs, or once its resident memory has grown `GROWTH_MB` past what it held after its first
job (a leak). A CPU runner under HPSEARCH_TRIAL_MEMORY_MB serves one job (`may_serve_again`). Isolation
stays per runner and results per trial: a runner serves one slot, one job at a time, and a job that fails
ends its runner.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from workers.protocol import JobEnded
from workers.runner import RunnerJob

GROWTH_MB = 1024.0  # resident memory a runner may gain after its first job before it is replaced
JOB_END_S = 30.0  # how long a runner whose trials all ended may take to say so (it saves nothing then)


@dataclass
class WarmRunner:
    proc: Any
    conn: Connection
    key: tuple[Any, ...]  # what a job must share with its last one to reuse it (`key_of`)
    jobs: int = 0  # jobs it has ended
    first_rss_mb: float | None = None  # its resident memory after its first job


_held = threading.local()  # each slot thread's idle runner, if any


def key_of(study_id: str, job: RunnerJob) -> tuple[Any, ...]:
    """A runner holds one study's split on one device, under a memory limit set for its number of trials."""
    return (study_id, job.device, job.threads, job.precision, job.memory_limit_mb, len(job.trials), job.image)


def may_serve_again(job: RunnerJob) -> bool:
    """A CPU runner under a memory limit serves one job: a second would find less of its limit free (what the
    first left allocated) and could run out of memory where a fresh runner would not."""
    return not (job.memory_limit_mb and job.device.startswith("cpu"))


def take(key: tuple[Any, ...], job: RunnerJob) -> WarmRunner | None:
    """This thread's idle runner with the job sent to it, when it fits the job and took it; else None (and any
    idle runner that does not fit is gone)."""
    runner = _pop()
    if runner is None:
        return None
    if runner.key != key or not runner.proc.is_alive():
        stop(runner)
        return None
    try:
        runner.conn.send(dataclasses.replace(job, x_train=None, y_train=None, x_val=None, y_val=None))
    except OSError:  # it died just now
        stop(runner)
        return None
    return runner


def keep_or_stop(runner: WarmRunner, *, reusable: bool, max_jobs: int) -> None:
    """After a job: keep the runner for this thread's next job if it ended cleanly and within its bounds."""
    ended = _job_ended(runner) if reusable else None
    if ended is None:
        stop(runner)
        return
    runner.jobs += 1
    runner.first_rss_mb = runner.first_rss_mb if runner.first_rss_mb is not None else ended.rss_mb
    if runner.jobs >= max_jobs or ended.rss_mb > runner.first_rss_mb + GROWTH_MB:
        stop(runner)
        return
    _held.runner = runner


def release() -> None:
    """Stop this thread's idle runner (the slot found no work, or stops)."""
    runner = _pop()
    if runner is not None:
        stop(runner)


def _pop() -> WarmRunner | None:
    """This thread's idle runner, no longer held."""
    runner: WarmRunner | None = getattr(_held, "runner", None)
    _held.runner = None
    return runner


def stop(runner: WarmRunner) -> None:
    try:
        runner.conn.send(None)
    except OSError:
        pass
    runner.conn.close()
    runner.proc.join(1)
    if runner.proc.is_alive():
        runner.proc.kill()
        runner.proc.join(5)


def _job_ended(runner: WarmRunner) -> JobEnded | None:
    """The runner's word that its job ended; None if it said anything else first, or nothing in time."""
    try:
        if not runner.conn.poll(JOB_END_S):
            return None
        msg = runner.conn.recv()
    except (EOFError, OSError):
        return None
    return msg if isinstance(msg, JobEnded) else None
