"""One trial in a child process: build, train, stream epochs to the supervisor, save the best weights.

The child only computes. It holds no database connection; everything it learns goes over its pipe in the
messages of workers.protocol: an Epoch per epoch, answered by a Decision while the next epoch already
trains; at the end Done, Failed or Stopped.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from app.ml.artifacts import ModelSpec, build_module, save_trial
from app.models import FailureKind
from workers.devices import use_device
from workers.precision import apply_precision
from workers.protocol import Decision, Done, Epoch, Failed, Stopped, Verdict

OUT_OF_MEMORY = "out_of_memory"
NON_FINITE = "non_finite_loss"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class TrialJob:
    trial: int  # the trial's row id: every message about it names it
    spec: ModelSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    epochs: int
    patience: int | None
    objective: str
    direction: str
    seed: int
    device: str
    threads: int
    artifact_path: str  # without extension: .safetensors and .json are written
    precision: str = "fp32"  # workers.precision, resolved for the device
    memory_limit_mb: int = 0
    image: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def standardization(x_train: np.ndarray, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training split only: per channel for images, per feature otherwise."""
    axes = (0, 2, 3) if image else (0,)
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    return mean.astype(np.float32), std.astype(np.float32)


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


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


def _limit_memory(megabytes: int, device: str) -> None:
    """Let this trial map at most `megabytes` more than the process it was forked from (RLIMIT_AS).

    Relative, because the fork inherits the supervisor's torch and worker threads (~1 GB of address
    space that the trial does not control). CPU trials only: CUDA reserves far more address space than it
    uses and fails to start under RLIMIT_AS; a GPU trial's OOM is CUDA's own and ends the same way.
    """
    if megabytes <= 0 or not device.startswith("cpu"):
        return
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


def child_main(conn: Connection, job: TrialJob) -> None:
    """Entry of the forked child; never returns into the parent's code."""
    code = 0
    try:
        _die_with_parent()
        _limit_memory(job.memory_limit_mb, job.device)
        _train(conn, job)
    except BaseException as exc:  # noqa: BLE001 - the child reports every failure and exits
        code = _report_failure(conn, job.trial, exc)
    finally:
        conn.close()
        os._exit(code)


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


class PipeReporter:
    """Trainer callback: send each epoch; the supervisor's verdict arrives while the next epoch trains.

    At most one verdict is outstanding: a report first takes the previous verdict (long arrived, as a rule).
    `stop_requested` looks for it between batches without blocking, so a pruned trial stops within a batch
    of the verdict, and no trial idles after each epoch while the supervisor writes and asks the pruner.
    """

    def __init__(self, conn: Connection, trial: int) -> None:
        self.conn, self.trial = conn, trial
        self.last: dict[str, Any] | None = None  # the last report sent
        self._pending = False
        self._stop = False

    def on_epoch_end(self, report: Any) -> bool:
        if self.settle():
            return True
        self.last = asdict(report)
        self.conn.send(Epoch(self.trial, self.last))
        self._pending = True
        return False

    def stop_requested(self) -> bool:
        if self._pending and self.conn.poll():
            self._take_verdict()
        return self._stop

    def settle(self) -> bool:
        """Wait for the outstanding verdict, if any; True once the supervisor said stop."""
        if self._pending:
            self._take_verdict()
        return self._stop

    def _take_verdict(self) -> None:
        self._pending = False
        decision: Decision = self.conn.recv()
        self._stop = self._stop or decision.verdict is Verdict.STOP


def _tensors(job: TrialJob) -> Any:
    import torch

    from workers.trainer import TrainData

    device = torch.device(job.device)
    y_dtype = torch.long if job.spec.task == "classification" else torch.float32

    def put(a: np.ndarray, dtype: Any) -> Any:
        return torch.as_tensor(a, dtype=dtype).to(device, non_blocking=True)

    return TrainData(put(job.x_train, torch.float32), put(job.y_train, y_dtype), put(job.x_val, torch.float32),
                     put(job.y_val, y_dtype), task=job.spec.task, image=job.image)


def _train(conn: Connection, job: TrialJob) -> None:
    import torch

    from app.ml.networks import parameter_count
    from workers import plugin_runner
    from workers.trainer import train

    use_device(job.device)
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)  # initial weights follow the trial's seed, not the RNG state of the parent
    data = _tensors(job)
    reporter = PipeReporter(conn, job.trial)
    plugin = plugin_runner.own_loop(job.spec)
    if plugin is not None:  # a model plugin with its own training loop
        module, result = plugin_runner.run_own_loop(plugin, job, data, reporter)
    else:
        module = build_module(job.spec).to(job.device)
        amp = apply_precision(job.precision, job.device)
        result = train(module, data, job.spec.params, epochs=job.epochs, objective=job.objective,
                       direction=job.direction, patience=job.patience, seed=job.seed, callbacks=[reporter],
                       amp_dtype=amp, stop_signal=reporter.stop_requested)
    if reporter.settle() or result.stop_reason == "stopped":  # a stop verdict outranks how training ended
        conn.send(Stopped(job.trial, reporter.last))
        return
    if result.stop_reason == NON_FINITE:
        conn.send(Failed(job.trial, FailureKind.NON_FINITE, NON_FINITE,
                         f"non-finite training loss after epoch {result.epochs_run}"))
        return
    metrics = dict(result.best_metrics)
    metrics["param_count"] = float(parameter_count(module))
    metrics["inference_ms"] = _inference_ms(module, data.x_val)
    # Only a completed trial writes, and only here: pruned, stopped and failed trials leave no files.
    save_trial(Path(job.artifact_path), result.best_state, plugin_runner.stamped(job.spec), metrics=metrics,
               layers=plugin_runner.layers(job.spec, module))
    conn.send(Done(job.trial, {"metrics": metrics, "epochs_run": result.epochs_run,
                               "best_epoch": result.best_epoch, "stop_reason": result.stop_reason}))


def _inference_ms(module: Any, x: Any, batch: int = 256) -> float:
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


# ---- a fused group: several trials of one study trained as one stacked model ------------------------------


@dataclass
class GroupMemberJob:
    trial: int  # the trial's row id: every message about it names it
    spec: ModelSpec
    seed: int
    artifact_path: str


@dataclass
class GroupJob:
    """What a fused runner trains: its members and what they share (data, budget, device)."""

    members: list[GroupMemberJob]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    epochs: int
    patience: int | None
    objective: str
    direction: str
    device: str
    threads: int
    precision: str = "fp32"  # workers.precision, resolved for the device
    memory_limit_mb: int = 0
    image: bool = False

    @property
    def spec(self) -> ModelSpec:  # task and input shape, shared by every member (`can_fuse`)
        return self.members[0].spec


class GroupReporter:
    """GroupCallback over the pipe: PipeReporter's protocol per member, then each member's outcome.

    Each member has at most one verdict outstanding; verdicts of all members arrive on the one pipe in any
    order and are taken whenever the runner looks (between batches and at each epoch's end).
    """

    def __init__(self, conn: Connection, job: GroupJob) -> None:
        self.conn, self.job = conn, job
        self.by_trial = {m.trial: m for m in job.members}
        self.last: dict[int, dict[str, Any]] = {}
        self.pending: dict[int, int] = {m.trial: 0 for m in job.members}
        self.stop: set[int] = set()
        self.ended: set[int] = set()

    def _take(self) -> None:
        decision: Decision = self.conn.recv()
        self.pending[decision.trial] = max(0, self.pending[decision.trial] - 1)
        if decision.verdict is Verdict.STOP:
            self.stop.add(decision.trial)

    def _drain(self) -> None:
        while self.conn.poll():
            self._take()

    def settle(self, trial: int) -> bool:
        """Wait for the member's outstanding verdict, if any; True once the supervisor said stop."""
        while self.pending[trial] > 0:
            self._take()
        return trial in self.stop

    def stop_signal(self) -> set[int]:
        self._drain()
        return self.stop - self.ended

    def on_epoch_end(self, key: Any, report: Any) -> bool:
        self._drain()
        if self.settle(key):
            return True
        self.last[key] = asdict(report)
        self.conn.send(Epoch(key, self.last[key]))
        self.pending[key] += 1
        return False

    def on_member_end(self, key: Any, result: Any) -> None:
        self.ended.add(key)
        if self.settle(key) or result.stop_reason == "stopped":
            self.conn.send(Stopped(key, self.last.get(key)))
        elif result.stop_reason == NON_FINITE:
            self.conn.send(Failed(key, FailureKind.NON_FINITE, NON_FINITE,
                                  f"non-finite training loss after epoch {result.epochs_run}"))
        else:
            self.conn.send(Done(key, _save_member(self.by_trial[key], result, self.job)))


def _save_member(member: GroupMemberJob, result: Any, job: GroupJob) -> dict[str, Any]:
    """Save a member's best weights as its solo network's (the ordinary trial files); Done's result."""
    import torch

    from app.ml.networks import parameter_count
    from workers import plugin_runner

    module = build_module(member.spec).to(job.device)
    module.load_state_dict(result.best_state)
    metrics = dict(result.best_metrics)
    metrics["param_count"] = float(parameter_count(module))
    sample = torch.as_tensor(job.x_val[:256], dtype=torch.float32).to(job.device)
    metrics["inference_ms"] = _inference_ms(module, sample)
    save_trial(Path(member.artifact_path), result.best_state, plugin_runner.stamped(member.spec), metrics=metrics,
               layers=plugin_runner.layers(member.spec, module))
    return {"metrics": metrics, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stop_reason": result.stop_reason}


def group_main(conn: Connection, job: GroupJob) -> None:
    """Entry of a fused runner; never returns into the parent's code. An error fails every member not ended."""
    code = 0
    reporter = GroupReporter(conn, job)
    try:
        _die_with_parent()
        _limit_memory(job.memory_limit_mb * len(job.members), job.device)
        _train_group(job, reporter)
    except BaseException as exc:  # noqa: BLE001 - the child reports every failure and exits
        for m in job.members:
            if m.trial not in reporter.ended:
                code = max(code, _report_failure(conn, m.trial, exc))
    finally:
        conn.close()
        os._exit(code)


def _train_group(job: GroupJob, reporter: GroupReporter) -> None:
    import torch

    from workers.fused import Member, train_group

    use_device(job.device)
    torch.set_num_threads(job.threads)
    data = _tensors(job)  # type: ignore[arg-type] - a GroupJob has what _tensors reads
    amp = apply_precision(job.precision, job.device)
    train_group([Member(m.trial, m.spec, m.seed) for m in job.members], data, epochs=job.epochs,
                objective=job.objective, direction=job.direction, patience=job.patience, callbacks=[reporter],
                amp_dtype=amp, stop_signal=reporter.stop_signal)
