"""Closing a study whose budget is spent: repair Optuna's copy, choose the top-k ensemble on validation,
score it and the best trial once on the test split (in a forked child), and record the study's end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.core.optuna_store import optuna_storage
from app.ml.artifacts import ModelSpec, has_model, prune_study_dir, read_config, trial_files, trial_stem
from workers import checkpoint_sweep, closing, final_evaluation, optuna_sync
from workers.attempt import Slot
from workers.precision import resolve_precision
from workers.prepared import PreparedStudy
from workers.publishing import clear_staging

log = logging.getLogger("hpsearch.worker")
EVAL_TIMEOUT_S = 600.0


def finalize(slot: Slot, job: closing.FinalizeJob, device: str) -> None:
    """Pick the top-k ensemble on validation, score it and the best trial ONCE on test; end the study."""
    with slot.studies.using(job.study_id) as p:
        _finalize(slot, job, p, device)
    slot.studies.forget(job.study_id)


def _finalize(slot: Slot, job: closing.FinalizeJob, p: PreparedStudy, device: str) -> None:
    flog = logging.LoggerAdapter(log, {"worker_id": slot.worker_id, "study_id": job.study_id})
    assert slot.settings.artifact_dir is not None
    # No trial runs any more: clear what crashed attempts left behind, here and in Optuna.
    clear_staging(slot.settings.artifact_dir, job.study_id)
    optuna_sync.repair(slot.db, job.study_id, p.optuna_study)
    top, complete = closing.closing_candidates(slot.db, job.study_id, p.spec.ensemble_top_k)
    study_dir = slot.settings.artifact_dir / job.study_id
    for path in prune_study_dir(study_dir, keep=complete):  # pruned, failed or half-written trials
        flog.info("removed artifact %s of a trial that did not complete", path.name)
    top = [n for n in top if has_model(trial_stem(study_dir, n))]
    if not top:
        tells = closing.complete_study(slot.db, job, worker_id=slot.worker_id, test_metrics=None,
                                       error="no trial completed")
    else:
        try:
            result = _evaluate_on_test(slot, p, top, study_dir, device)
        except final_evaluation.Interrupted:
            closing.release_finalization(slot.db, job, worker_id=slot.worker_id)
            flog.info("final evaluation stopped by shutdown; handed back")
            return
        except final_evaluation.EvaluationError as exc:
            # Retrying would fail the same way forever; every trial's result stays readable.
            flog.error("final evaluation failed: %s", exc)
            tells = closing.complete_study(slot.db, job, worker_id=slot.worker_id, test_metrics=None,
                                           error=f"final evaluation failed: {str(exc)[:400]}")
        else:
            tells = closing.complete_study(slot.db, job, worker_id=slot.worker_id,
                                           test_metrics=result["test_metrics"], ensemble=result["ensemble"])
    optuna_sync.tell(optuna_storage(slot.db.url), tells)
    # Every trial has ended: checkpoints that crashed or reaped attempts left behind go, the kept ones stay.
    checkpoint_sweep.sweep(slot.db, slot.settings.artifact_dir, job.study_id)
    flog.info("study finalized (%s)", job.reason)


def _evaluate_on_test(slot: Slot, p: PreparedStudy, top: list[int], study_dir: Path,
                      device: str) -> dict[str, Any]:
    """The ensemble job in a forked child: {"test_metrics": of the best trial, "ensemble": the record}."""
    members = []
    for number in top:
        stem = trial_stem(study_dir, number)
        spec = ModelSpec.from_config(read_config(trial_files(stem)[1]))
        members.append(final_evaluation.Member(number=number, spec=spec, artifact=str(stem)))
    s = p.splits
    job = final_evaluation.EnsembleJob(
        members=members, x_train=s.x_train, y_train=s.y_train, x_val=s.x_val, y_val=s.y_val,
        x_test=s.x_test, y_test=s.y_test, task=p.dataset.task, objective=p.spec.primary.metric,
        direction=str(p.spec.primary.direction), study_dir=str(study_dir),
        trees=bool(p.spec.ensemble and p.spec.ensemble.trees), device=device, threads=slot.cpu_threads,
        seed=p.spec.seed, precision=resolve_precision(p.spec.precision, p.spec.task, device))
    return final_evaluation.run_in_child(slot.mp_context, job, timeout_s=EVAL_TIMEOUT_S,
                                         interrupted=slot.drain_over)
