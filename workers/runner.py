"""A runner: the child process that trains one trial alone, or several of one study fused into one model.

The child only computes. It holds no database connection; everything it learns goes over its pipe in the
messages of workers.protocol, each naming its trial: an Epoch per trial and epoch, answered by a Decision
while the next epoch already trains; at each trial's end Done, Failed or Stopped. A solo trial is a job of
one trial; the same job, reporter and saving serve a fused group (`workers.fused`) and a model plugin's own
training loop (`workers.plugin_runner`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from app.ml.artifacts import ModelSpec, build_module, save_trial
from app.models import FailureKind
from workers.devices import use_device
from workers.precision import apply_precision
from workers.protocol import Checkpointed, Decision, Done, Epoch, Failed, JobEnded, Resumed, Stopped, Verdict

OUT_OF_MEMORY = "out_of_memory"
NON_FINITE = "non_finite_loss"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
INFERENCE_BATCH = 256  # samples per timed prediction (inference_ms)


@dataclass
class RunnerTrial:
    """One trial of a runner's job."""

    trial: int  # the trial's row id: every message about it names it
    spec: ModelSpec
    seed: int
    artifact_path: str  # without extension: .safetensors and .json are written
    checkpoint_dir: str | None = None  # where this attempt writes its checkpoints (None: it writes none)
    resume_from: str | None = None  # the recorded checkpoint to continue from (None: from scratch)
    resume_epoch: int = 0  # its epoch
    pause_at: int | None = None  # the rung its scheduler pauses it at: checkpointed there, then it stops


@dataclass
class RunnerJob:
    """What a runner trains: its trials (one alone, several fused) and what they share (data, budget, device)."""

    trials: list[RunnerTrial]
    # The study's split; None in a job sent to a runner that already holds it (`workers.warm_runners`).
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    epochs: int
    patience: int | None
    objective: str
    direction: str
    device: str
    threads: int
    precision: str = "fp32"  # workers.precision, resolved for the device
    memory_limit_mb: int = 0  # per trial
    image: bool = False
    checkpoint_every: int = 1  # epochs between checkpoints of a trial with a checkpoint_dir

    @property
    def spec(self) -> ModelSpec:  # task and input shape, shared by every trial of a fused job (`can_fuse`)
        return self.trials[0].spec


def standardization(x_train: np.ndarray, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training split only: per channel for images, per feature otherwise."""
    axes = (0, 2, 3) if image else (0,)
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    return mean.astype(np.float32), std.astype(np.float32)


def _statm_bytes(field: int) -> int:
    """A size from /proc/self/statm in bytes: field 0 the address space, 1 the resident set."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * resource.getpagesize()


def _address_space_bytes() -> int:
    return _statm_bytes(0)


def warm_imports() -> None:
    """Import what every trial uses, in the supervisor before any fork: no runner pays these imports again.

    And keep the supervisor's own torch on one thread. A torch op run here on several threads (a plugin's
    import, say) would start an OpenMP team, which GNU libgomp does not rebuild in a forked child: the
    runner's first multi-threaded op would then wait forever for the parent's threads. Runners set their
    own thread count.
    """
    import safetensors.torch  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401 - a runner's first optimizer would import it (~1.5 s per trial)

    import app.ml.networks  # noqa: F401
    import workers.trainer  # noqa: F401

    torch.set_num_threads(1)


def _settle_inherited_stacks() -> None:
    """Let glibc free the stacks of the parent's threads now, before the base is measured.

    A forked child keeps every other thread's stack in its stack cache and unmaps all but 40 MB of them at
    its second thread's exit: measured before that, a parent with many threads (a busy supervisor, a test
    process) would hand the trial that much more room than its limit says. Two short threads settle it.
    """
    for _ in range(2):
        t = threading.Thread(target=lambda: None, name="settle-stacks")
        t.start()
        t.join()


def _limit_memory(megabytes: int, device: str) -> None:
    """Let this trial map at most `megabytes` more than the process it was forked from (RLIMIT_AS).

    Relative, because the fork inherits the supervisor's torch and worker threads (~1 GB of address
    space that the trial does not control). CPU trials only: CUDA reserves far more address space than it
    uses and fails to start under RLIMIT_AS; a GPU trial's OOM is CUDA's own and ends the same way.
    """
    if megabytes <= 0 or not device.startswith("cpu"):
        return
    gc.collect()  # the parent's garbage not yet collected: freed here, its memory would be the trial's too
    _settle_inherited_stacks()
    try:
        base = _address_space_bytes()
    except OSError:  # no /proc: an absolute limit is the best available
        base = 0
    limit = base + megabytes * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    """Linux: have the kernel kill this runner when its supervisor dies, even by SIGKILL."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # elsewhere the runner notices the closed pipe at its next epoch
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os._exit(1)


def _is_oom(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def runner_main(conn: Connection, job: RunnerJob) -> None:
    """Entry of the forked runner; never returns into the parent's code. It trains job after job of one study
    on the split it was forked with; an error fails every trial of its job not ended, and the runner exits."""
    code = 0
    data = None
    try:
        _die_with_parent()
        _limit_memory(job.memory_limit_mb * len(job.trials), job.device)
        next_job: RunnerJob | None = job
        while next_job is not None:
            reporter = Reporter(conn, next_job)
            try:
                data = _train(next_job, reporter, data)
            except BaseException as exc:  # noqa: BLE001 - the child reports every failure and exits
                for t in next_job.trials:
                    if t.trial not in reporter.ended:
                        code = max(code, _report_failure(conn, t.trial, exc))
                return
            conn.send(JobEnded(_rss_mb()))
            next_job = _next_job(conn)
    except (EOFError, OSError):  # the supervisor closed the pipe: nothing more to do
        pass
    finally:
        conn.close()
        os._exit(code)


def _next_job(conn: Connection) -> RunnerJob | None:
    """Wait for the next job; None (or a closed pipe) ends the runner. Late verdicts of the last job go."""
    while True:
        msg = conn.recv()
        if msg is None or isinstance(msg, RunnerJob):
            return msg


def _rss_mb() -> float:
    return _statm_bytes(1) / 2**20


def _report_failure(conn: Connection, trial: int, exc: BaseException) -> int:
    """Tell the supervisor why the trial ended; the exit code is 1 when it could not be told."""
    oom = _is_oom(exc)
    reason = OUT_OF_MEMORY if oom else f"{type(exc).__name__}: {exc}"[:2000]
    try:
        detail = traceback.format_exc(limit=5)[-2000:]
    except MemoryError:  # still at the memory limit: the reason alone must get through
        detail = ""
    try:
        conn.send(Failed(trial, FailureKind.OUT_OF_MEMORY if oom else FailureKind.ERROR, reason, detail))
    except Exception:  # noqa: BLE001 - the parent is gone; nothing left to tell
        return 1
    return 0


class Reporter:
    """The runner's side of the pipe, trial by trial: each epoch out, each verdict in, each trial's end out.

    A trial has at most one verdict outstanding: a report first takes the trial's previous verdict (long
    arrived, as a rule). Verdicts arrive on the one pipe in any order and are taken whenever the runner looks:
    between batches without blocking (`stopping`), so a pruned trial stops within a batch of its verdict, and
    at each epoch's end; no trial idles after an epoch while the supervisor writes and asks the pruner.
    A `workers.fused.GroupCallback`; `alone(trial)` is the solo loop's callback and stop signal.
    """

    def __init__(self, conn: Connection, job: RunnerJob) -> None:
        self.conn, self.job = conn, job
        self.data: Any = None  # the job's split on its device (a workers.trainer.TrainData), once loaded
        self.by_trial = {t.trial: t for t in job.trials}
        self.last: dict[int, dict[str, Any]] = {}  # each trial's last report sent
        self.pending: dict[int, int] = {t.trial: 0 for t in job.trials}
        self.stop: set[int] = set()
        self.pausing: set[int] = set()  # told to pause at their next epoch boundary
        self.pause_at: dict[int, int] = {}  # the boundary each pausing trial was checkpointed at
        self.ended: set[int] = set()  # trials whose end was told
        # The supervisor handles a runner's messages in order, so its answer to an epoch means every checkpoint
        # sent before that epoch is recorded: each epoch sent waits with the newest checkpoint sent so far.
        self.checkpoint_sent: dict[int, int] = {}
        self.acks: dict[int, deque[int | None]] = {t.trial: deque() for t in job.trials}
        self.recorded: dict[int, int] = {}  # the newest checkpoint of each trial known recorded
        for t in job.trials:  # a rung: paused there as if told so, without waiting to be
            if t.pause_at is not None and t.checkpoint_dir is not None:
                self.pausing.add(t.trial)
                self.pause_at[t.trial] = t.pause_at

    def _take(self) -> None:
        decision: Decision = self.conn.recv()
        if decision.verdict is Verdict.PAUSE:
            self.pausing.add(decision.trial)
        elif decision.verdict is Verdict.STOP:
            self.stop.add(decision.trial)
        if decision.answers_epoch:
            self.pending[decision.trial] = max(0, self.pending[decision.trial] - 1)
            acked = self.acks[decision.trial].popleft() if self.acks[decision.trial] else None
            if acked is not None:
                self.recorded[decision.trial] = max(acked, self.recorded.get(decision.trial, 0))

    def _drain(self) -> None:
        while self.conn.poll():
            self._take()

    def settle(self, trial: int) -> bool:
        """Wait for the trial's outstanding verdict, if any; True once the supervisor said stop."""
        while self.pending[trial] > 0:
            self._take()
        return trial in self.stop

    def stopping(self) -> set[int]:
        """The trials to stop now (polled between batches: never blocks)."""
        self._drain()
        return self.stop - self.ended

    def on_epoch_end(self, trial: int, report: Any) -> bool:
        """Send the epoch; True when the supervisor had already said stop (the epoch is then not sent), or the
        trial pauses at this boundary (sent, checkpointed: `pauses_at`)."""
        self._drain()
        if self.settle(trial):
            return True
        self.last[trial] = asdict(report)
        self.conn.send(Epoch(trial, self.last[trial]))
        self.pending[trial] += 1
        self.acks[trial].append(self.checkpoint_sent.get(trial))
        return self.pause_at.get(trial) == report.epoch

    def pauses_at(self, trial: int, epoch: int) -> bool:
        """Whether the trial pauses at this epoch boundary (asked by its checkpoint hook, which then writes
        it): once told to pause, at the first boundary that is not its last epoch anyway."""
        self._drain()
        if trial not in self.pausing or epoch >= self.job.epochs:
            return False
        self.pause_at.setdefault(trial, epoch)
        return self.pause_at[trial] == epoch

    def on_member_end(self, trial: int, result: Any, module: Any = None) -> None:
        """Tell how the trial ended; a completed trial's best weights are saved first. A stop verdict outranks
        how training ended. `module` is the trained network when the loop has one (solo, plugin)."""
        if self.settle(trial) or result.stop_reason == "stopped":
            message: Any = Stopped(trial, self.last.get(trial))
        elif result.stop_reason == NON_FINITE:
            message = Failed(trial, FailureKind.NON_FINITE, NON_FINITE,
                             f"non-finite training loss after epoch {result.epochs_run}")
        else:
            # Only a completed trial writes, and only here: pruned, stopped and failed trials leave no files.
            message = Done(trial, _save(self.by_trial[trial], result, module, self.job, self.data))
        self.conn.send(message)
        self.ended.add(trial)

    def checkpointed(self, trial: int, written: Any) -> None:
        """A checkpoint (a workers.checkpoints.CheckpointFile) is on disk: the supervisor records it."""
        self.conn.send(Checkpointed(trial, str(written.path), written.epoch, written.bytes))
        self.checkpoint_sent[trial] = written.epoch

    def recorded_checkpoint(self, trial: int) -> int | None:
        """The newest checkpoint of the trial the supervisor has recorded, as far as its answers tell."""
        self._drain()
        return self.recorded.get(trial)

    def resumed(self, trial: int, epoch: int, skipped: list[str]) -> None:
        self.conn.send(Resumed(trial, epoch, skipped))

    def alone(self, trial: int) -> _Alone:
        return _Alone(self, trial)


class _Alone:
    """One trial of a Reporter as the solo loop and a plugin's loop see it: a Callback and a stop signal."""

    def __init__(self, reporter: Reporter, trial: int) -> None:
        self.reporter, self.trial = reporter, trial

    def on_epoch_end(self, report: Any) -> bool:
        return self.reporter.on_epoch_end(self.trial, report)

    def stop_requested(self) -> bool:
        return self.trial in self.reporter.stopping()


def _save(t: RunnerTrial, result: Any, module: Any, job: RunnerJob, data: Any) -> dict[str, Any]:
    """Save a completed trial's best weights as the ordinary trial files; Done's result."""
    import torch

    from app.ml.networks import parameter_count
    from workers import plugin_runner

    if module is None:  # a fused member: its solo network, holding its best weights
        module = build_module(t.spec).to(job.device)
        module.load_state_dict(result.best_state)
    metrics = dict(result.best_metrics)
    metrics["param_count"] = float(parameter_count(module))
    sample = data.x_val[:INFERENCE_BATCH].to(torch.float32)
    metrics["inference_ms"] = _inference_ms(module, sample)
    save_trial(Path(t.artifact_path), result.best_state, plugin_runner.stamped(t.spec), metrics=metrics,
               layers=plugin_runner.layers(t.spec, module))
    return {"metrics": metrics, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stop_reason": result.stop_reason}


def _tensors(job: RunnerJob) -> Any:
    import torch

    from workers.trainer import TrainData

    device = torch.device(job.device)
    y_dtype = torch.long if job.spec.task == "classification" else torch.float32

    def put(a: np.ndarray, dtype: Any) -> Any:
        return torch.as_tensor(a, dtype=dtype).to(device, non_blocking=True)

    return TrainData(put(job.x_train, torch.float32), put(job.y_train, y_dtype), put(job.x_val, torch.float32),
                     put(job.y_val, y_dtype), task=job.spec.task, image=job.image)


def _train(job: RunnerJob, reporter: Reporter, resident: Any = None) -> Any:
    """Train the job on its split: the one it carries, else the one this runner holds; returns the split."""
    import torch

    use_device(job.device)
    torch.set_num_threads(job.threads)
    data = _tensors(job) if job.x_train is not None else resident
    assert data is not None, "a job without its split reached a runner that holds none"
    reporter.data = data
    amp = apply_precision(job.precision, job.device)
    if len(job.trials) == 1:
        _train_alone(job, job.trials[0], data, amp, reporter)
    else:
        _train_fused(job, data, amp, reporter)
    return data


def _train_alone(job: RunnerJob, t: RunnerTrial, data: Any, amp: Any, reporter: Reporter) -> None:
    """One trial: the service's trainer, or a model plugin's own training loop."""
    import torch

    from workers import plugin_runner
    from workers.trainer import train

    torch.manual_seed(t.seed)  # initial weights follow the trial's seed, not the RNG state of the parent
    alone = reporter.alone(t.trial)
    plugin = plugin_runner.own_loop(t.spec)
    if plugin is not None:
        hook, resume = _checkpointing(job, t, None, reporter)  # None unless the loop is resumable
        module, result = plugin_runner.run_own_loop(plugin, job, data, alone, checkpoint=hook, resume_from=resume)
    else:
        module = build_module(t.spec).to(job.device)
        hook, resume = _checkpointing(job, t, module, reporter)
        result = train(module, data, t.spec.params, epochs=job.epochs, objective=job.objective,
                       direction=job.direction, patience=job.patience, seed=t.seed, callbacks=[alone],
                       amp_dtype=amp, stop_signal=alone.stop_requested, checkpoint=hook, resume_from=resume)
    if hook is not None:
        hook.wait()  # the last write in flight, recorded before the trial's end
    reporter.on_member_end(t.trial, result, module)


def _checkpointing(job: RunnerJob, t: RunnerTrial, module: Any, reporter: Reporter) -> tuple[Any, Any]:
    """The trial's checkpoint hook, and the state to resume from: the recorded checkpoint, else the newest
    older one that reads, was written by the same model plugin version and fits this model (`module`; None
    for a plugin's own loop), else none (from scratch); the supervisor hears which, and why any newer one was
    passed over."""
    from workers import plugin_runner
    from workers.checkpoints import EpochCheckpointer
    from workers.checkpoints.files import latest_usable

    if t.checkpoint_dir is None:
        return None, None
    state, identity = None, plugin_runner.identity(t.spec)
    if t.resume_from is not None:
        recorded = Path(t.resume_from)
        state, skipped = latest_usable(recorded.parent, module=module, identity=identity, newest=t.resume_epoch)
        reasons = [f"checkpoint of epoch {c.epoch} unusable ({e})" for c, e in skipped]
        if not recorded.is_file():
            reasons.insert(0, f"checkpoint of epoch {t.resume_epoch} unusable (missing: {recorded} does not exist)")
        reporter.resumed(t.trial, state.epoch if state is not None else 0, reasons)
    hook = EpochCheckpointer(Path(t.checkpoint_dir), every=job.checkpoint_every, identity=identity,
                             on_written=lambda written: reporter.checkpointed(t.trial, written),
                             also_at=lambda epoch: reporter.pauses_at(t.trial, epoch),
                             recorded=lambda: reporter.recorded_checkpoint(t.trial))
    return hook, state


def _train_fused(job: RunnerJob, data: Any, amp: Any, reporter: Reporter) -> None:
    """Several trials of one study as one stacked model; each ends, and is told, on its own, and each writes
    its own checkpoints, which its solo loop continues (a fused group never resumes: `group.plan_claim`)."""
    from workers.fused import Member, train_group

    hooks = {t.trial: hook for t in job.trials if (hook := _checkpointing(job, t, None, reporter)[0]) is not None}
    train_group([Member(t.trial, t.spec, t.seed) for t in job.trials], data, epochs=job.epochs,
                objective=job.objective, direction=job.direction, patience=job.patience, callbacks=[reporter],
                amp_dtype=amp, stop_signal=reporter.stopping, checkpoints=hooks)


def _inference_ms(module: Any, x: Any, batch: int = INFERENCE_BATCH) -> float:
    """Milliseconds to predict one batch of `batch` samples, best of three."""
    import torch

    module.eval()
    sample = x[:batch]
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            module(sample)
            if sample.is_cuda:
                torch.cuda.synchronize(sample.device)
            best = min(best, time.perf_counter() - start)
    return best * 1000.0
