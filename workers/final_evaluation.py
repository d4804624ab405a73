"""A study's final evaluation, in a forked child: the top-k ensemble, then ONE test evaluation of each result.

Order matters and is kept by the code's shape: every member predicts the validation split; greedy selection
fixes the weights from those predictions alone; only then is the test split read, once for the best single
model and once for the ensemble. The test split never influences any choice.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from app.ml import ensemble
from app.ml.artifacts import TREES_FILE, TREES_NAME, ModelSpec, NetPredictor, Predictor, TreesPredictor
from app.ml.trees import fit_trees
from workers.devices import check_fork_safe, use_device
from workers.precision import apply_precision

METHOD = "greedy forward selection with replacement on the validation split (Caruana et al., 2004)"

# Called with ("best_single" | "ensemble", metrics) each time a model is scored on the test split. A hook
# registered before the supervisor forks the child runs inside the child: tests count evaluations with it.
TestHook = Callable[[str, dict[str, float]], None]
test_evaluation_hooks: list[TestHook] = []
POLL_S = 0.5  # how often a waiting parent checks whether it must stop


@dataclass
class Member:
    number: int
    spec: ModelSpec
    artifact: str  # path without suffix


@dataclass
class EnsembleJob:
    members: list[Member]  # the top-k complete trials, best first
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    objective: str  # the study's first objective, e.g. "val_accuracy"
    direction: str
    study_dir: str
    trees: bool = False
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    rounds: int = ensemble.DEFAULT_ROUNDS
    precision: str = "fp32"  # the trials' (workers.precision): its TF32 setting holds here too


def _candidates(job: EnsembleJob) -> tuple[dict[str, Predictor], str | None]:
    """The trials' networks, best first, then the trees fitted on the training split when asked for."""
    predictors: dict[str, Predictor] = {
        f"trial-{m.number}": NetPredictor.load(Path(m.artifact), m.spec, job.device) for m in job.members}
    if not job.trees:
        return predictors, None
    try:
        fitted = fit_trees(job.x_train, job.y_train, task=job.task, seed=job.seed, threads=job.threads,
                           n_classes=job.members[0].spec.n_outputs)
    except ValueError as exc:  # e.g. several regression targets: the networks still make an ensemble
        return predictors, f"trees left out: {exc}"
    predictors[TREES_NAME] = TreesPredictor(fitted)
    return predictors, None


def run(job: EnsembleJob) -> dict[str, Any]:
    """Choose the ensemble on validation, then score the best single model and the ensemble on test once."""
    import torch

    torch.set_num_threads(job.threads)
    predictors, trees_note = _candidates(job)
    names = list(predictors)
    val_preds = [predictors[n].predict(job.x_val) for n in names]
    selection = ensemble.greedy_selection(val_preds, job.y_val, task=job.task, objective=job.objective,
                                          direction=job.direction, rounds=job.rounds)
    weights = dict(zip(names, selection.weights, strict=True))
    # The weights are fixed. From here on the test split is read, and nothing below chooses anything.
    best = names[0]
    test_preds = {n: predictors[n].predict(job.x_test) for n in names if n == best or weights[n] > 0}
    best_test = _evaluate_on_test("best_single", test_preds[best], job)
    chosen = [n for n in names if weights[n] > 0]
    combined = ensemble.weighted_average([test_preds[n] for n in chosen], [weights[n] for n in chosen])
    ensemble_test = _evaluate_on_test("ensemble", combined, job)
    if weights.get(TREES_NAME, 0.0) > 0:
        tree_member = predictors[TREES_NAME]
        assert isinstance(tree_member, TreesPredictor)
        tree_member.trees.save(Path(job.study_dir) / TREES_FILE)
    numbers = {f"trial-{m.number}": m.number for m in job.members}
    members = [{"name": n, "kind": "trial" if n in numbers else TREES_NAME, "trial_number": numbers.get(n),
                "weight": weights[n], "val": m} for n, m in zip(names, selection.member_metrics, strict=True)]
    record = {
        "task": job.task, "classes": job.members[0].spec.classes,
        "input_shape": list(job.members[0].spec.input_shape),
        "objective": job.objective, "direction": job.direction, "method": METHOD,
        "top_k": len(job.members), "rounds": selection.rounds, "best_round": selection.best_round,
        "trees": job.trees, "note": trees_note, "members": members,
        "best_single": {"trial_number": job.members[0].number, "val": selection.member_metrics[0],
                        "test": best_test},
        "ensemble": {"val": selection.metrics, "test": ensemble_test},
    }
    test_metrics = {"trial_number": job.members[0].number, **{f"test_{k}": v for k, v in best_test.items()}}
    return {"ensemble": record, "test_metrics": test_metrics}


def _evaluate_on_test(name: str, pred: np.ndarray, job: EnsembleJob) -> dict[str, float]:
    scores = ensemble.metrics(pred, job.y_test, job.task)
    for hook in test_evaluation_hooks:
        hook(name, scores)
    return scores


class EvaluationError(RuntimeError):
    """The final evaluation failed or timed out in its child process."""


class Interrupted(Exception):
    """The worker is shutting down: the evaluation was stopped, to be done again by another worker."""


def run_in_child(ctx: Any, job: EnsembleJob, *, timeout_s: float,
                 interrupted: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run `run(job)` in a forked child (memory isolation, like a trial); raise when it fails or times out,
    or Interrupted as soon as `interrupted()` says so."""
    check_fork_safe(job.device)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(child, job), daemon=True)
    proc.start()
    child.close()
    deadline = time.monotonic() + timeout_s
    try:
        while not parent.poll(min(POLL_S, max(0.0, deadline - time.monotonic()))):
            if interrupted():
                raise Interrupted
            if time.monotonic() >= deadline:
                raise EvaluationError(f"timed out after {timeout_s:.0f} s")
        msg = parent.recv()
    except EOFError:
        raise EvaluationError(f"its process died (exit code {proc.exitcode})") from None
    finally:
        parent.close()
        if proc.is_alive():
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if msg[0] != "done":
        raise EvaluationError(f"{msg[1]}\n{msg[2]}")
    result: dict[str, Any] = msg[1]
    return result


def _child_main(conn: Connection, job: EnsembleJob) -> None:
    """Entry of the forked child; never returns into the parent's code."""
    code = 0
    try:
        use_device(job.device)
        apply_precision(job.precision, job.device)  # no autocast: evaluated in float32, as validation was
        conn.send(("done", run(job)))
    except BaseException as exc:  # noqa: BLE001 - the child reports every failure and exits
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5)[-2000:]))
        except Exception:  # noqa: BLE001 - the parent is gone; nothing left to tell
            code = 1
    finally:
        conn.close()
        os._exit(code)
