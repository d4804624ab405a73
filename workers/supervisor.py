"""A worker supervisor: N trial slots over this machine's devices, one forked runner per attempt.

The supervisor owns all database I/O of its trials. It imports torch once, before any slot starts,
so each forked runner begins with torch loaded; CUDA is touched only inside runners, and a supervisor in
which CUDA got initialized (a plugin's import, say) refuses to fork CUDA runners (workers.devices). Each slot loops:
claim a trial (workers.attempt runs it; with `fuse` above 1, up to K trials of its study, trained in fused
groups by workers.group) or, when none is free, a study to close (workers.finalization).
A heartbeat thread renews this worker's leases; a reaper thread judges everyone's (workers.reaper).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
import uuid

from app import plugins
from app.core.config import Settings
from app.core.db import Database, is_transient
from app.core.optuna_store import optuna_storage
from app.services.studies import settle_optuna_trials
from workers import checkpoint_sweep, closing, group, leasing, optuna_sync, registry, retries, warm_runners
from workers.attempt import Slot, release, run_attempt
from workers.devices import CudaBeforeFork, check_fork_safe, pin_device_order, threads_per_slot, watching_cuda
from workers.finalization import finalize
from workers.plugin_runner import worker_plugins
from workers.prepared import PreparedStudies, StudyUnrunnable
from workers.reaper import Reaper
from workers.runner import warm_imports

log = logging.getLogger("hpsearch.worker")
POLL_INTERVAL_S = 0.5
SHUTDOWN_GRACE_S = 30.0


def database_pool_size(slots: int) -> int:
    """Connections a supervisor of `slots` trial slots keeps: one per slot's thread, which writes every epoch,
    plus the heartbeat and the reaper, so no slot waits on another's connection."""
    return slots + 2


class Supervisor:
    def __init__(self, db: Database, settings: Settings, *, devices: list[str], per_device: int = 1,
                 worker_id: str | None = None, shutdown_grace_s: float = SHUTDOWN_GRACE_S,
                 fuse: int | str = 1) -> None:
        pin_device_order()
        with watching_cuda("the worker's own imports"):
            warm_imports()  # once here, so every forked runner starts with torch and the training code loaded

        self.db, self.settings = db, settings
        self.plugins = _import_plugins(settings.plugins)  # imported here, before any runner forks
        for device in dict.fromkeys(devices):  # refuse now, before claiming a trial no runner could train
            check_fork_safe(device)
        self.slots = [d for d in devices for _ in range(per_device)]
        self.devices = devices
        self.cpu_threads = threads_per_slot(sum(1 for d in self.slots if d == "cpu"))
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stop_event = threading.Event()
        self.shutdown_grace_s = shutdown_grace_s
        self.fuse = fuse  # trials per fused runner: 1 (off), K, or "auto" (workers.fusing)
        self._drain_deadline: float | None = None
        # Keyed by attempt too: a slot whose lease was reaped must not drop the lease another slot took since.
        self._active: dict[tuple[int, int], leasing.Lease] = {}
        self._finalizing: set[str] = set()  # studies whose final evaluation runs here
        self._active_lock = threading.Lock()
        self._log = logging.LoggerAdapter(log, {"worker_id": self.worker_id})
        prepared = PreparedStudies(db, settings, idle_limit=len(self.slots))
        self.slot = Slot(db, settings, self.worker_id, prepared, mp.get_context("fork"), self.cpu_threads,
                         self._drain_over, self.stop_event.is_set)

    # ---- lifecycle --------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() (or SIGTERM via the CLI); running trials get a grace period, then go back."""
        registry.register_worker(self.db, worker_id=self.worker_id, hostname=socket.gethostname(),
                                 pid=os.getpid(), devices=self.devices, slots=len(self.slots),
                                 plugins=self.plugins.advertised())
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
        registry.unregister_worker(self.db, worker_id=self.worker_id)
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
                    ids, finalizing = sorted({tid for tid, _ in self._active}), list(self._finalizing)
                leasing.renew_leases(self.db, worker_id=self.worker_id, trial_ids=ids, finalizing=finalizing)
            except Exception:  # noqa: BLE001 - a database outage must not kill the beat; retry next tick
                self._log.exception("heartbeat failed; retrying")

    def _reaper_loop(self) -> None:
        """Fail or re-queue the leases of dead workers, and of trials past their deadline."""
        reaper = Reaper(self.db, self.settings.lease_grace_s, self.settings.artifact_dir)
        reaper.run(self.stop_event, max(self.settings.heartbeat_interval_s, reaper.interval_s), self._log)

    def _slot_loop(self, slot: int, device: str) -> None:
        try:
            self._serve(slot, device)
        finally:
            warm_runners.release()

    def _serve(self, slot: int, device: str) -> None:
        backoff = POLL_INTERVAL_S
        while not self.stop_event.is_set():
            try:
                worked = self._step(device)
                backoff = POLL_INTERVAL_S
            except CudaBeforeFork as exc:  # no runner of this process could use CUDA again: stop serving
                self._log.critical("%s", exc)
                self.stop()
                return
            except Exception as exc:  # noqa: BLE001 - log, back off, keep serving
                if is_transient(exc):  # the database dropped or refused us; a lease went back as it was
                    self._log.warning("slot %d: the database failed a step (%s); backing off %.1fs", slot,
                                      str(exc).splitlines()[0], backoff)
                else:
                    self._log.exception("slot %d failed a step; backing off %.1fs", slot, backoff)
                worked, backoff = False, min(backoff * 2, 30.0)
            if not worked:
                warm_runners.release()  # nothing to run: an idle runner would only hold memory
                self.stop_event.wait(backoff)

    def _step(self, device: str) -> bool:
        lease = leasing.claim_trial(self.db, worker_id=self.worker_id, device=device,
                                    trial_deadline_s=self.settings.trial_deadline_s, can_run=self.plugins.can_run,
                                    artifact_dir=self.settings.artifact_dir)
        if lease is not None:
            if self.stop_event.is_set():  # stop() came while claiming: hand it straight back
                release(self.slot, lease)
                return True
            if self.fuse != 1:
                self._run_fused(lease, device)
                return True
            with self._active_lock:
                self._active[(lease.trial_id, lease.attempt)] = lease
            try:
                run_attempt(self.slot, lease, device)
            except StudyUnrunnable as exc:
                self._fail_study(lease.study_id, str(exc))
            except Exception as exc:
                if is_transient(exc):  # the database's fault, not the trial's: hand it back as it was
                    release(self.slot, lease)
                else:
                    self._fail_attempt(lease, exc)
                raise
            finally:
                with self._active_lock:
                    self._active.pop((lease.trial_id, lease.attempt), None)
            return True
        job = closing.claim_finalization(self.db, worker_id=self.worker_id, can_run=self.plugins.can_run)
        if job is not None:
            with self._active_lock:
                self._finalizing.add(job.study_id)
            try:
                finalize(self.slot, job, device)
            finally:
                with self._active_lock:
                    self._finalizing.discard(job.study_id)
            return True
        return False

    def _run_fused(self, first: leasing.Lease, device: str) -> None:
        """Claim up to K leases of first's study, then run each planned group (one runner each) and each solo
        lease at once, one thread apiece; every lease is heartbeaten until its run ends."""
        held = [first]

        def track(leases: list[leasing.Lease]) -> None:
            with self._active_lock:
                for lease in leases:
                    self._active[(lease.trial_id, lease.attempt)] = lease

        def claim_more(n: int) -> list[leasing.Lease]:
            more = leasing.claim_trials(self.db, worker_id=self.worker_id, device=device,
                                        study_id=first.study_id, trial_deadline_s=self.settings.trial_deadline_s,
                                        limit=n, artifact_dir=self.settings.artifact_dir)
            track(more)
            held.extend(more)
            return more

        track(held)
        try:
            runs = group.plan_claim(self.slot, first, device, self.fuse, claim_more)
            errors: list[Exception] = []

            def run(leases: list[leasing.Lease]) -> None:
                try:
                    if len(leases) == 1:
                        run_attempt(self.slot, leases[0], device)
                    else:
                        group.run_group(self.slot, leases, device)
                except Exception as exc:  # noqa: BLE001 - raised again below, once every run has ended
                    errors.append(exc)
                finally:
                    warm_runners.release()  # this thread ends: its runner goes with it

            threads = [threading.Thread(target=run, args=(r,), name="fused-run", daemon=True) for r in runs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        except Exception as exc:
            for lease in held:  # those already recorded are no longer held: both calls pass them by
                if is_transient(exc):
                    release(self.slot, lease)
                else:
                    self._fail_attempt(lease, exc)
            raise
        finally:
            with self._active_lock:
                for lease in held:
                    self._active.pop((lease.trial_id, lease.attempt), None)

    def _fail_attempt(self, lease: leasing.Lease, exc: Exception) -> None:
        reason = f"worker error: {type(exc).__name__}: {exc}"[:500]
        reaped = retries.fail_attempt(self.db, lease, reason=reason)
        if reaped is not None and reaped.number is None:
            # Failed before it had a trial (the study's data could not be loaded here, say): no attempt to
            # count, so say it on the study, where its owner looks, instead of only in this worker's log.
            closing.note_study_error(self.db, lease.study_id, f"{self.worker_id} could not start a trial: {reason}")
        if reaped is not None:  # a retry gets a fresh Optuna trial
            optuna_sync.tell(optuna_storage(self.db.url), reaped.tells)

    def _fail_study(self, study_id: str, reason: str) -> None:
        """No retry can mend it: end the study failed at once instead of claiming and failing forever."""
        self._log.error("study %s cannot run: %s", study_id, reason)
        optuna_sync.tell(optuna_storage(self.db.url), closing.fail_study(self.db, study_id, reason))
        assert self.settings.artifact_dir is not None
        checkpoint_sweep.sweep(self.db, self.settings.artifact_dir, study_id)  # its paused trials' too
        settle_optuna_trials(self.db, study_id)  # and any an ask in flight or a crash left running there
        self.slot.studies.forget(study_id)

    def _drain_over(self) -> bool:
        """Shutting down and past the grace period: what still runs goes back to the queue."""
        return self._drain_deadline is not None and time.monotonic() > self._drain_deadline


def _import_plugins(enabled: list[str]) -> plugins.Plugins:
    """The worker's plugins (workers.plugin_runner), each model plugin imported on its own under watch, so that
    one which initializes CUDA at import is named when the supervisor refuses to fork."""
    found = plugins.configure(enabled)
    for name in found.names(plugins.PluginKind.MODEL):
        with watching_cuda(f"model plugin {name!r} at import"):
            try:
                found.model(name)  # imported once and cached: worker_plugins below finds it loaded
            except plugins.PluginError:
                pass  # reported by worker_plugins
    return worker_plugins(enabled)
