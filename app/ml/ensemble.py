"""Greedy forward ensemble selection with replacement (Caruana et al., 2004), as auto-sklearn does it.

Pure numpy. A member is given by its predictions on one split: class probabilities (N, C) for classification,
outputs (N, k) for regression. The ensemble's prediction is the weighted average of its members' predictions.
Selection starts from the best single member and returns the best ensemble seen along the way, so on the split
it was chosen on it is never worse than the best single member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_ROUNDS = 50  # auto-sklearn's default ensemble size
PROBABILITY_FLOOR = 1e-15  # log loss of a probability of 0 would be infinite


def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and mean log loss of class probabilities (N, C) against class ids (N,)."""
    _check_rows(probs, y)
    picked = probs[np.arange(len(y)), y.astype(np.int64)]
    loss = -np.log(np.clip(picked, PROBABILITY_FLOOR, None))
    return {"accuracy": float(np.mean(probs.argmax(axis=1) == y)), "loss": float(np.mean(loss))}


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean squared and absolute error over every target value; loss is the mse, as in training."""
    _check_rows(pred, y)
    err = pred.reshape(len(y), -1) - y.reshape(len(y), -1).astype(np.float64)
    mse = float(np.mean(err**2))
    return {"mse": mse, "mae": float(np.mean(np.abs(err))), "loss": mse}


def metrics(pred: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    if task == "classification":
        return classification_metrics(pred, y)
    if task == "regression":
        return regression_metrics(pred, y)
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")


def _check_rows(pred: np.ndarray, y: np.ndarray) -> None:
    if len(pred) != len(y) or len(y) == 0:
        raise ValueError(f"predictions for {len(pred)} samples against {len(y)} targets")


def metric_name(objective: str) -> str:
    """'val_accuracy' -> 'accuracy': the objective of a study names a validation metric."""
    return objective.removeprefix("val_")


def score_key(scores: dict[str, float], objective: str, direction: str) -> tuple[float, float]:
    """Lower is better: the objective first, then the loss, which separates ensembles of equal accuracy."""
    value = scores[metric_name(objective)]
    return (-value if direction == "maximize" else value, scores["loss"])


def weighted_average(preds: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The ensemble's prediction: sum of w_i * pred_i with the weights normalized to sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    if len(preds) != len(w) or not len(w) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("need one non-negative weight per member, not all zero")
    w = w / w.sum()
    out = np.zeros_like(np.asarray(preds[0], dtype=np.float64))
    for p, wi in zip(preds, w, strict=True):
        if wi > 0:
            out += wi * np.asarray(p, dtype=np.float64)
    return out


@dataclass(frozen=True)
class Selection:
    """The chosen weights and how selection went."""

    weights: list[float]  # one per member, summing to one; zero for members never picked
    counts: list[int]  # how often each member was picked in the chosen ensemble
    start: int  # the best single member, where selection began
    rounds: int  # rounds run (including the first pick)
    best_round: int  # the round whose ensemble was kept (1 = the best single member alone)
    metrics: dict[str, float]  # of the chosen ensemble on the selection split
    member_metrics: list[dict[str, float]]  # of each member alone on the selection split


def greedy_selection(preds: Sequence[np.ndarray], y: np.ndarray, *, task: str, objective: str,
                     direction: str, rounds: int = DEFAULT_ROUNDS) -> Selection:
    """Forward selection with replacement: each round adds the member that most improves the average.

    Ties go to the earlier member, so pass members best first. Returns the best ensemble of all rounds.
    """
    if not preds:
        raise ValueError("no members to select from")
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    arrays = [np.asarray(p, dtype=np.float64) for p in preds]
    singles = [metrics(p, y, task) for p in arrays]
    keys = [score_key(m, objective, direction) for m in singles]
    start = min(range(len(arrays)), key=keys.__getitem__)
    counts = np.zeros(len(arrays), dtype=np.int64)
    counts[start] = 1
    total = arrays[start].copy()
    best = (keys[start], counts.copy(), 1, singles[start])
    last_round = max(1, rounds) if len(arrays) > 1 else 1  # one member: nothing to add
    for size in range(2, last_round + 1):
        trial = [metrics((total + p) / size, y, task) for p in arrays]
        trial_keys = [score_key(m, objective, direction) for m in trial]
        pick = min(range(len(arrays)), key=trial_keys.__getitem__)
        counts[pick] += 1
        total += arrays[pick]
        if trial_keys[pick] < best[0]:  # strictly better: the smaller ensemble wins ties
            best = (trial_keys[pick], counts.copy(), size, trial[pick])
    _, chosen, best_round, chosen_metrics = best
    weights = (chosen / chosen.sum()).tolist()
    return Selection(weights=weights, counts=chosen.tolist(), start=start, rounds=last_round,
                     best_round=best_round, metrics=chosen_metrics, member_metrics=singles)
