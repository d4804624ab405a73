"""A worker supervisor: N trial slots over this machine's devices, one forked runner per trial.

The supervisor owns all database I/O of its trials. It imports torch once, before any slot starts,
so each forked runner begins with torch loaded; CUDA is touched only inside runners.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import RETRY_MAX_DELAY_S, Database, is_transient, retry_on_disconnect
from app.core.optuna_store import optuna_storage
from app.ml import data as datasets_lib
from app.ml.artifacts import has_model, prune_study_dir, read_config, trial_files, trial_stem
from app.ml.space import resolve_space
from app.models import Study, Trial, TrialState
from app.services.datasets import load_dataset, space_context
from workers import asking, finalize, queue
from workers.devices import threads_per_slot
from workers.plugin_runner import worker_plugins
from workers.runner import ModelSpec, TrialJob, child_main, standardization, warm_imports
from workers.search import make_pruner, make_sampler
from workers.tensorboard import TrialBoard, board_dir

log = logging.getLogger("hpsearch.worker")
POLL_INTERVAL_S = 0.5
PIPE_POLL_S = 0.2
SHUTDOWN_GRACE_S = 30.0
EVAL_TIMEOUT_S = 600.0
STAGING_DIR = ".staging"  # per-attempt weights, under a study's artifact folder


@dataclass
class Prepared:
    """A study's data and space, loaded once per supervisor and shared with runners through fork."""

    spec: dict[str, Any]
    optuna_study: optuna.Study
    resolved: dict[str, Any]
    dataset: datasets_lib.Dataset
    splits: datasets_lib.Splits
    mean: list[float]
    std: list[float]
    lock: threading.Lock

    def model_spec(self, params: dict[str, Any]) -> ModelSpec:
        ds = self.dataset
        groups = list(ds.feature_groups.values()) if ds.feature_groups else None
        return ModelSpec(model=self.spec["model"], params=params, task=ds.task, input_shape=tuple(ds.input_shape),
                         n_outputs=ds.n_outputs, feature_groups=groups, classes=ds.classes, mean=self.mean,
                         std=self.std)


class Outcome:
    """How a runner ended, as the supervisor saw it."""

    def __init__(self, kind: str, payload: Any = None, detail: str | None = None) -> None:
        self.kind, self.payload, self.detail = kind, payload, detail


class Supervisor:
    def __init__(self, db: Database, settings: Settings, *, devices: list[str], per_device: int = 1,
                 worker_id: str | None = None, shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
        warm_imports()  # once here, so every forked runner starts with torch and the training code loaded

        self.db, self.settings = db, settings
        self.plugins = worker_plugins(settings.plugins)  # imported here, before any runner forks
        self.slots = [d for d in devices for _ in range(per_device)]
        self.devices = devices
        self.cpu_threads = threads_per_slot(sum(1 for d in self.slots if d == "cpu"))
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stop_event = threading.Event()
        self.shutdown_grace_s = shutdown_grace_s
        self._drain_deadline: float | None = None
        self._active: dict[int, queue.Lease] = {}
        self._finalizing: set[str] = set()  # studies whose final evaluation runs here
        self._active_lock = threading.Lock()
        self._prepared: dict[str, Prepared] = {}
        self._prepare_lock = threading.Lock()
        self._ctx = mp.get_context("fork")
        self._log = logging.LoggerAdapter(log, {"worker_id": self.worker_id})

    # ---- lifecycle --------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() (or SIGTERM via the CLI); running trials get a grace period, then go back."""
        queue.register_worker(self.db, worker_id=self.worker_id, hostname=socket.gethostname(), pid=os.getpid(),
                              devices=self.devices, slots=len(self.slots), plugins=self.plugins.advertised())
        self._log.info("worker started with %d slot(s) on %s", len(self.slots), ",".join(self.devices))
        threads = [threading.Thread(target=self._slot_loop, args=(i, d), name=f"slot-{i}", daemon=True)
                   for i, d in enumerate(self.slots)]
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        reaper = threading.Thread(target=self._reaper_loop, name="reaper", daemon=True)
        for t in [*threads, beat, reaper]:
            t.start()
        self.stop_event.wait()
        self._drain_deadline = time.monotonic() + self.shutdown_grace_s
        for t in threads:
            t.join()
        beat.join(self.shutdown_grace_s)  # a beat after unregistering would show this worker alive again
        queue.unregister_worker(self.db, worker_id=self.worker_id)
        self._log.info("worker stopped")

    def stop(self) -> None:
        self.stop_event.set()

    def _heartbeat_loop(self) -> None:
        """Renew this worker's leases and nothing else: slow work here would make live leases look dead.

        After stop() it beats on until the last running trial has ended or been handed back.
        """
        interval = self.settings.heartbeat_interval_s
        while True:
            if self.stop_event.is_set():
                time.sleep(interval)  # stop_event.wait() would return at once: keep the pace while draining
            else:
                self.stop_event.wait(interval)
            if self.stop_event.is_set() and not self._active and not self._finalizing:
                return
            try:
                with self._active_lock:
                    ids, finalizing = list(self._active), list(self._finalizing)
                queue.renew_leases(self.db, worker_id=self.worker_id, trial_ids=ids, finalizing=finalizing)
            except Exception:  # noqa: BLE001 - a database outage must not kill the beat; retry next tick
                self._log.exception("heartbeat failed; retrying")

    def _reaper_loop(self) -> None:
        """Fail or re-queue the leases of dead workers, and of trials past their deadline."""
        reaper = Reaper(self.db, self.settings.lease_grace_s)
        reaper.run(self.stop_event, max(self.settings.heartbeat_interval_s, reaper.interval_s), self._log)

    def _slot_loop(self, slot: int, device: str) -> None:
        backoff = POLL_INTERVAL_S
        while not self.stop_event.is_set():
            try:
                worked = self._step(device)
                backoff = POLL_INTERVAL_S
            except Exception:  # noqa: BLE001 - log, back off, keep serving
                self._log.exception("slot %d failed a step; backing off %.1fs", slot, backoff)
                worked, backoff = False, min(backoff * 2, 30.0)
            if not worked:
                self.stop_event.wait(backoff)

    def _step(self, device: str) -> bool:
        lease = queue.claim_trial(self.db, worker_id=self.worker_id, device=device,
                                  trial_deadline_s=self.settings.trial_deadline_s, can_run=self.plugins.can_run)
        if lease is not None:
            if self.stop_event.is_set():  # stop() came while claiming: hand it straight back
                queue.release_trial(self.db, lease)
                return True
            with self._active_lock:
                self._active[lease.trial_id] = lease
            try:
                self._run_trial(lease, device)
            except Exception as exc:
                if is_transient(exc):  # the database's fault, not the trial's: hand it back as it was
                    queue.release_trial(self.db, lease)
                else:
                    self._fail_attempt(lease, exc)
                raise
            finally:
                with self._active_lock:
                    self._active.pop(lease.trial_id, None)
            return True
        job = queue.claim_finalization(self.db, worker_id=self.worker_id, can_run=self.plugins.can_run)
        if job is not None:
            with self._active_lock:
                self._finalizing.add(job.study_id)
            try:
                self._before_finalize(job.study_id)
                self._finalize(job, device)
            finally:
                with self._active_lock:
                    self._finalizing.discard(job.study_id)
            return True
        return False

    def _fail_attempt(self, lease: queue.Lease, exc: Exception) -> None:
        reason = f"worker error: {type(exc).__name__}: {exc}"[:500]
        reaped = queue.fail_attempt(self.db, lease, reason=reason)
        if reaped is not None and reaped.number is None:
            # Failed before it had a trial (the study's data could not be loaded here, say): no attempt to
            # count, so say it on the study, where its owner looks, instead of only in this worker's log.
            queue.note_study_error(self.db, lease.study_id, f"{self.worker_id} could not start a trial: {reason}")
        elif reaped is not None and not reaped.requeued and reaped.optuna_trial_id is not None:
            _fail_optuna_trial(optuna_storage(self.db.url), reaped.optuna_trial_id)

    def _before_finalize(self, study_id: str) -> None:
        """No trial runs any more: clear what crashed attempts left behind, here and in Optuna."""
        assert self.settings.artifact_dir is not None
        shutil.rmtree(self.settings.artifact_dir / study_id / STAGING_DIR, ignore_errors=True)
        self._repair_optuna(study_id)

    def _repair_optuna(self, study_id: str) -> None:
        """Before a study closes, make Optuna's copy agree with ours where a crash split them.

        A worker killed between Optuna's ask and our bind leaves an Optuna trial we never ran; one killed
        between our finish and its tell leaves a finished trial RUNNING there. Waiting trials are left to
        finalization, which drops them.
        """
        p = self._prepare(study_id)
        storage = optuna_storage(self.db.url)
        oid = retry_on_disconnect(storage.get_study_id_from_name, p.optuna_study.study_name)
        stuck = retry_on_disconnect(storage.get_all_trials, oid, deepcopy=False,
                                    states=(OptunaState.RUNNING,))
        if not stuck:
            return
        with self.db.read_session() as session:
            rows = {t.number: t for t in session.scalars(select(Trial).where(
                Trial.study_id == study_id, Trial.number.in_([t.number for t in stuck])))}
        for frozen in stuck:
            row = rows.get(frozen.number)
            if row is not None and row.state in (TrialState.WAITING.value, TrialState.RUNNING.value):
                continue
            if row is not None and row.state == TrialState.COMPLETE.value:
                _tell(p.optuna_study, frozen.number, OptunaState.COMPLETE, row.values or [row.value])
            elif row is not None and row.state == TrialState.PRUNED.value:
                _tell(p.optuna_study, frozen.number, OptunaState.PRUNED)
            else:
                _tell(p.optuna_study, frozen.number, OptunaState.FAIL)
            self._log.warning("Optuna trial %d was left RUNNING by a crash; now %s", frozen.number,
                              row.state if row is not None else "fail (never ran)")

    # ---- one trial --------------------------------------------------------------------------------------

    def _prepare(self, study_id: str) -> Prepared:
        with self._prepare_lock:
            if study_id in self._prepared:
                return self._prepared[study_id]
            with self.db.read_session() as session:
                study = session.get(Study, study_id)
                assert study is not None
                spec, optuna_name = study.spec, study.optuna_name
            ds = load_dataset(self.db, self.settings, spec["dataset"])
            seed = (spec.get("sampler") or {}).get("seed") or 0
            splits = datasets_lib.split_dataset(ds, validation_split=spec.get("validation_split", 0.2), seed=seed)
            resolved = resolve_space(_space_entries(spec), space_context(datasets_lib.describe(ds), spec["model"]))
            ostudy = optuna.load_study(study_name=optuna_name, storage=optuna_storage(self.db.url),
                                       sampler=make_sampler(spec, resolved), pruner=make_pruner(spec))
            mean, std = standardization(splits.x_train, ds.image_shape is not None)
            prepared = Prepared(spec, ostudy, resolved, ds, splits, mean.tolist(), std.tolist(), threading.Lock())
            self._prepared[study_id] = prepared
            return prepared

    def _bind(self, lease: queue.Lease, p: Prepared) -> queue.Lease | None:
        """Give a fresh lease its Optuna trial: enqueued parameters, or the sampler's next proposal.

        None when the lease was reaped meanwhile (this worker looked dead): that Optuna trial is failed.
        """
        storage = optuna_storage(self.db.url)
        with p.lock:
            number, trial_id, params = retry_on_disconnect(asking.ask_trial, p.optuna_study, storage,
                                                           p.resolved, lease.params)
            bound = None
            try:
                bound = queue.bind_trial(self.db, lease, number=number, optuna_trial_id=trial_id,
                                         params=params)
                return bound
            finally:
                if bound is None:
                    _fail_optuna_trial(storage, trial_id)  # never leave an orphan RUNNING in Optuna

    def _run_trial(self, lease: queue.Lease, device: str) -> None:
        p = self._prepare(lease.study_id)
        if lease.number is None:
            bound = self._bind(lease, p)
            if bound is None:
                self._log.warning("lease of study %s lost before its trial started", lease.study_id)
                return
            lease = bound
        assert lease.number is not None and lease.params is not None
        extra = {"study_id": lease.study_id, "trial": lease.number, "attempt": lease.attempt, "device": device}
        tlog = logging.LoggerAdapter(log, {"worker_id": self.worker_id, **extra})
        tlog.info("trial started")
        job = self._trial_job(lease, p, device)
        try:
            outcome = self._supervise(job, lease, p, tlog)
            self._record_outcome(outcome, lease, p, tlog)
        finally:
            _discard(self._staged_stem(lease))  # published, refused or never finished: nothing to keep

    def _staged_stem(self, lease: queue.Lease) -> Path:
        """Where one attempt's runner writes its weights. They take the trial's name only once the attempt's
        result is recorded, so a runner whose lease was lost can never overwrite the weights of another."""
        assert self.settings.artifact_dir is not None
        name = f"trial-{lease.number}-{lease.attempt}"
        return self.settings.artifact_dir / lease.study_id / STAGING_DIR / name

    def _trial_job(self, lease: queue.Lease, p: Prepared, device: str) -> TrialJob:
        spec, splits = p.spec, p.splits
        objectives = spec["objective"] if isinstance(spec["objective"], list) else [spec["objective"]]
        seed = ((spec.get("sampler") or {}).get("seed") or 0) + (lease.number or 0)
        path = self._staged_stem(lease)
        return TrialJob(spec=p.model_spec(lease.params or {}), x_train=splits.x_train, y_train=splits.y_train,
                        x_val=splits.x_val, y_val=splits.y_val, epochs=spec["budget"]["epochs"],
                        patience=spec["budget"].get("patience"), objective=objectives[0]["metric"],
                        direction=objectives[0]["direction"], seed=seed, device=device,
                        threads=self.cpu_threads if device == "cpu" else 1, artifact_path=str(path),
                        amp=device.startswith("cuda"), memory_limit_mb=self.settings.trial_memory_mb,
                        image=p.dataset.image_shape is not None)

    def _spawn(self, job: TrialJob) -> tuple[Any, Any]:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=child_main, args=(child, job), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def _supervise(self, job: TrialJob, lease: queue.Lease, p: Prepared, tlog: Any) -> Outcome:
        """Relay epochs until the runner ends; stop it when pruned, lost, cancelled, late or shutting down."""
        # optuna.Trial reads the storage: open it before spawning, through the same reconnecting retries.
        trial = retry_on_disconnect(optuna.Trial, p.optuna_study, lease.optuna_trial_id)
        proc, conn = self._spawn(job)
        deadline = time.monotonic() + float(p.spec["budget"].get("trial_timeout_s") or self.settings.trial_deadline_s)
        multi = isinstance(p.spec["objective"], list) and len(p.spec["objective"]) > 1
        stop_kind: str | None = None
        board = None
        if p.spec.get("tensorboard"):
            assert self.settings.artifact_dir is not None and lease.number is not None
            board = TrialBoard(board_dir(self.settings.artifact_dir, lease.study_id, lease.number, lease.attempt))
        try:
            while True:
                if self._drain_over():
                    return Outcome("released")
                if time.monotonic() > deadline:
                    return Outcome("failed", "deadline exceeded")
                if not conn.poll(PIPE_POLL_S):
                    if not proc.is_alive() and not conn.poll(0):
                        return Outcome("failed", f"trial process died (exit code {proc.exitcode})")
                    continue
                try:
                    msg = conn.recv()
                except EOFError:
                    proc.join(1)
                    return Outcome("failed", f"trial process died (exit code {proc.exitcode})")
                if msg[0] == "epoch":
                    if board is not None:
                        board.epoch(msg[1])
                    verdict = self._on_epoch(msg[1], lease, trial, multi)
                    if verdict == "lost":
                        return Outcome("lost")
                    if verdict != "go":
                        stop_kind = verdict
                    conn.send("go" if verdict == "go" else "stop")
                elif msg[0] == "stopped":
                    return Outcome(stop_kind or "cancelled", msg[1])
                elif msg[0] == "done":
                    return Outcome("done", msg[1])
                else:
                    return Outcome("failed", msg[1], msg[2] if len(msg) > 2 else None)
        finally:
            conn.close()
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            if board is not None:
                board.close()

    def _on_epoch(self, report: dict[str, Any], lease: queue.Lease, trial: optuna.Trial, multi: bool) -> str:
        objective = p_objective(self._prepared[lease.study_id].spec)
        metric = report["metrics"].get(objective)
        status = queue.record_epoch(self.db, lease, epoch=report["epoch"], train_loss=report["train_loss"],
                                    val_loss=report["val_loss"], val_metric=metric,
                                    learning_rate=report["learning_rate"], seconds=report["seconds"])
        if status == "lost":
            return "lost"
        if status == "stop":
            return "cancelled"
        if multi or metric is None:
            return "go"
        retry_on_disconnect(trial.report, float(metric), step=report["epoch"])
        return "pruned" if retry_on_disconnect(trial.should_prune) else "go"

    def _record_outcome(self, outcome: Outcome, lease: queue.Lease, p: Prepared, tlog: Any) -> None:
        if outcome.kind == "lost":
            tlog.warning("lease lost (reaped or study deleted); result dropped")
            return
        if outcome.kind == "released":
            queue.release_trial(self.db, lease)
            tlog.info("trial handed back at shutdown")
            return
        number = lease.number
        if outcome.kind == "done":
            result = outcome.payload
            metrics = result["metrics"]
            values = [float(metrics[o["metric"]]) for o in _objectives(p.spec)]
            if not all(map(_finite, values)):
                outcome = Outcome("failed", "non_finite_objective")
            else:
                artifact = str(self.settings.artifact_dir / lease.study_id / f"trial-{number}")  # type: ignore[operator]
                if queue.finish_trial(self.db, lease, state=TrialState.COMPLETE, value=values[0], values=values,
                                      metrics=metrics, epochs_run=result["epochs_run"],
                                      best_epoch=result["best_epoch"], artifact=artifact):
                    try:
                        _publish(self._staged_stem(lease), Path(artifact))
                    except OSError:  # recorded without weights: finalization and downloads skip it
                        tlog.exception("could not publish the trial's weights")
                    _tell(p.optuna_study, number, OptunaState.COMPLETE, values, trial_id=lease.optuna_trial_id)
                    tlog.info("trial complete: %s", values[0])
                    queue.after_trial_finished(self.db, lease.study_id)
                else:
                    tlog.warning("lease lost (reaped or study deleted); late result refused")
                return
        if outcome.kind == "pruned":
            last = outcome.payload or {}
            value = (last.get("metrics") or {}).get(p_objective(p.spec))
            if queue.finish_trial(self.db, lease, state=TrialState.PRUNED, value=value,
                                  epochs_run=last.get("epoch", 0)):  # epochs count from 1
                _tell(p.optuna_study, number, OptunaState.PRUNED)
                tlog.info("trial pruned")
                queue.after_trial_finished(self.db, lease.study_id)
            return
        reason = "stopped: the study was cancelled or ended" if outcome.kind == "cancelled" else str(outcome.payload)
        if queue.finish_trial(self.db, lease, state=TrialState.FAIL, error=reason):
            _tell(p.optuna_study, number, OptunaState.FAIL, trial_id=lease.optuna_trial_id)
            tlog.warning("trial failed: %s", reason)
            queue.after_trial_finished(self.db, lease.study_id)

    # ---- finalization -----------------------------------------------------------------------------------

    def _finalize(self, job: queue.FinalizeJob, device: str) -> None:
        """Pick the top-k ensemble on validation, score it and the best trial ONCE on test; end the study."""
        flog = logging.LoggerAdapter(log, {"worker_id": self.worker_id, "study_id": job.study_id})
        p = self._prepare(job.study_id)
        top_k = (p.spec.get("ensemble") or {}).get("top_k") or finalize.DEFAULT_TOP_K
        with self.db.read_session() as session:
            study = session.get(Study, job.study_id)
            assert study is not None
            top = finalize.top_trials_in_tx(session, study, top_k)
            complete = finalize.complete_numbers_in_tx(session, study.id)
        assert self.settings.artifact_dir is not None
        study_dir = self.settings.artifact_dir / job.study_id
        for path in prune_study_dir(study_dir, keep=complete):  # pruned, failed or half-written trials
            flog.info("removed artifact %s of a trial that did not complete", path.name)
        top = [t for t in top if t.number is not None and has_model(trial_stem(study_dir, t.number))]
        if not top:
            begun = queue.complete_study(self.db, job, worker_id=self.worker_id, test_metrics=None,
                                         error="no trial completed")
        else:
            try:
                result = self._evaluate_on_test(p, top, study_dir, device)
            except finalize.Interrupted:
                queue.release_finalization(self.db, job, worker_id=self.worker_id)
                flog.info("final evaluation stopped by shutdown; handed back")
                return
            except finalize.EvaluationError as exc:
                # Retrying would fail the same way forever; every trial's result stays readable.
                flog.error("final evaluation failed: %s", exc)
                begun = queue.complete_study(self.db, job, worker_id=self.worker_id, test_metrics=None,
                                             error=f"final evaluation failed: {str(exc)[:400]}")
            else:
                begun = queue.complete_study(self.db, job, worker_id=self.worker_id,
                                             test_metrics=result["test_metrics"], ensemble=result["ensemble"])
        storage = optuna_storage(self.db.url)
        for trial_id in begun:
            _fail_optuna_trial(storage, trial_id)
        self._prepared.pop(job.study_id, None)
        flog.info("study finalized (%s)", job.reason)

    def _evaluate_on_test(self, p: Prepared, top: list[Trial], study_dir: Path,
                          device: str) -> dict[str, Any]:
        """The ensemble job in a forked child: {"test_metrics": of the best trial, "ensemble": the record}."""
        members = []
        for t in top:
            assert t.number is not None
            stem = trial_stem(study_dir, t.number)
            spec = ModelSpec.from_config(read_config(trial_files(stem)[1]))
            members.append(finalize.Member(number=t.number, spec=spec, artifact=str(stem)))
        objective, s = _objectives(p.spec)[0], p.splits
        job = finalize.EnsembleJob(
            members=members, x_train=s.x_train, y_train=s.y_train, x_val=s.x_val, y_val=s.y_val,
            x_test=s.x_test, y_test=s.y_test, task=p.dataset.task, objective=objective["metric"],
            direction=objective["direction"], study_dir=str(study_dir),
            trees=bool((p.spec.get("ensemble") or {}).get("trees")), device=device, threads=self.cpu_threads,
            seed=(p.spec.get("sampler") or {}).get("seed") or 0)
        return finalize.run_in_child(self._ctx, job, timeout_s=EVAL_TIMEOUT_S, interrupted=self._drain_over)

    def _drain_over(self) -> bool:
        """Shutting down and past the grace period: what still runs goes back to the queue."""
        return self._drain_deadline is not None and time.monotonic() > self._drain_deadline


def _space_entries(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "type"} if isinstance(v, dict) else v)
            for k, v in (spec.get("search_space") or {}).items()}


def _objectives(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec["objective"] if isinstance(spec["objective"], list) else [spec["objective"]]


def p_objective(spec: dict[str, Any]) -> str:
    return str(_objectives(spec)[0]["metric"])


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


def _publish(staged: Path, final: Path) -> None:
    """Move an attempt's files to the trial's name: weights first, config last (a config means complete)."""
    for source, target in zip(trial_files(staged), trial_files(final), strict=True):
        os.replace(source, target)


def _discard(staged: Path) -> None:
    for path in staged.parent.glob(staged.name + ".*"):
        path.unlink(missing_ok=True)


def _tell(study: optuna.Study, number: int | None, state: OptunaState, values: list[float] | None = None,
          *, trial_id: int | None = None) -> None:
    try:
        if trial_id is not None and state != OptunaState.PRUNED and asking.finishes_directly(study):
            retry_on_disconnect(asking.finish_trial, study, trial_id, state, values)
        else:
            retry_on_disconnect(study.tell, number, values, state=state, skip_if_finished=True)
    except Exception:  # noqa: BLE001 - our row is the record; Optuna's copy is repaired before finalization
        log.exception("could not tell Optuna about trial %s", number)


def _fail_optuna_trial(storage: Any, trial_id: int) -> None:
    try:
        retry_on_disconnect(storage.set_trial_state_values, trial_id, OptunaState.FAIL)
    except Exception:  # noqa: BLE001 - already finished there
        pass


def reap_and_tell(db: Database, grace_s: float) -> list[queue.Reaped]:
    """Reap stale leases and fail in Optuna the trials that will not be retried."""
    reaped = queue.reap(db, grace_s=grace_s)
    storage = optuna_storage(db.url) if reaped else None
    for r in reaped:
        log.warning("reaped trial %s of study %s: %s%s", r.number, r.study_id, r.reason,
                    " (re-queued)" if r.requeued else "")
        if not r.requeued and r.optuna_trial_id is not None:
            _fail_optuna_trial(storage, r.optuna_trial_id)
    return reaped


class Reaper:
    """Calls reap_and_tell each tick, but never right after its own database outage.

    An outage stops every heartbeat, so when the database comes back every lease looks stale. A reaper
    that could not reach the database waits one grace period after reaching it again before judging
    anyone, which gives the live workers, cut off by the same outage, time to beat again.
    """

    def __init__(self, db: Database, grace_s: float) -> None:
        self.db, self.grace_s = db, grace_s
        self._resume_at = 0.0
        self._cut_off = False

    @property
    def interval_s(self) -> float:
        return max(1.0, self.grace_s / 4)

    def tick(self) -> list[queue.Reaped]:
        try:
            if self._cut_off or time.monotonic() < self._resume_at:
                queue.ping(self.db)
                if self._cut_off:  # back: give workers a grace period, plus their longest retry pause
                    self._cut_off = False
                    self._resume_at = time.monotonic() + self.grace_s + RETRY_MAX_DELAY_S
                return []
            return reap_and_tell(self.db, self.grace_s)
        except Exception:
            self._cut_off = True
            raise

    def run(self, stop: threading.Event, interval_s: float, logger: Any = log) -> None:
        """Tick every interval_s until stop is set, through any database outage."""
        while not stop.wait(interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep reaping through database outages
                logger.exception("reaping failed; retrying")
