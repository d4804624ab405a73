"""Gradient-boosted trees (scikit-learn's HistGradientBoosting) as an ensemble member, stored as plain arrays.

A fitted scikit-learn model can only be saved by pickling it, and nothing is ever unpickled from storage here.
So after fitting, the trees are copied out into flat numpy arrays (split feature, threshold, children, leaf
value per node) and saved as an .npz read with allow_pickle=False; `Trees.predict` walks them with numpy and
gives the same probabilities as the fitted model (tests hold it to scikit-learn's own predict_proba).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

LINKS = ("softmax", "sigmoid", "identity")
CELLS_PER_CHUNK = 2_000_000  # rows x trees walked at once while predicting


@dataclass(frozen=True, eq=False)
class Trees:
    """All trees of one model; node arrays are concatenated, children index into them."""

    feature: np.ndarray  # (n_nodes,) int64: the split feature of a node
    threshold: np.ndarray  # (n_nodes,) float64: x <= threshold goes left
    missing_left: np.ndarray  # (n_nodes,) bool: where a NaN goes
    left: np.ndarray  # (n_nodes,) int64
    right: np.ndarray  # (n_nodes,) int64
    leaf: np.ndarray  # (n_nodes,) bool
    value: np.ndarray  # (n_nodes,) float64: a leaf's contribution to its tree's output column
    roots: np.ndarray  # (n_trees,) int64
    output: np.ndarray  # (n_trees,) int64: the raw-score column each tree adds to
    baseline: np.ndarray  # (n_columns,) float64: raw score before any tree
    link: np.ndarray  # 0-d str: softmax (multiclass), sigmoid (binary) or identity (regression)
    depth: np.ndarray  # 0-d int64: the deepest leaf, i.e. how many steps a walk needs

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Baseline plus the leaf values reached by each row in every tree: (N, n_columns)."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        out = np.empty((len(x), len(self.baseline)), dtype=np.float64)
        step = max(1, CELLS_PER_CHUNK // max(1, len(self.roots)))
        for start in range(0, len(x), step):
            out[start:start + step] = self._raw_chunk(x[start:start + step])
        return out

    def _raw_chunk(self, x: np.ndarray) -> np.ndarray:
        rows = np.arange(len(x))[:, None]
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
        for _ in range(int(self.depth)):
            value = x[rows, self.feature[node]]
            go_left = np.where(np.isnan(value), self.missing_left[node], value <= self.threshold[node])
            node = np.where(self.leaf[node], node, np.where(go_left, self.left[node], self.right[node]))
        leaves = self.value[node]
        raw = np.tile(self.baseline, (len(x), 1))
        for column in range(len(self.baseline)):
            raw[:, column] += leaves[:, self.output == column].sum(axis=1)
        return raw

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for a classifier, outputs (N, 1) for a regressor."""
        raw = self.raw(x)
        link = str(self.link)
        if link == "softmax":
            e = np.exp(raw - raw.max(axis=1, keepdims=True))
            return np.asarray(e / e.sum(axis=1, keepdims=True))
        if link == "sigmoid":
            p = 1.0 / (1.0 + np.exp(-raw[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        return raw

    def save(self, path: Path) -> None:
        """Write the arrays to `path` (.npz) atomically."""
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, **{f.name: getattr(self, f.name) for f in fields(self)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Trees:
        with np.load(path, allow_pickle=False) as arrays:
            trees = cls(**{f.name: arrays[f.name] for f in fields(cls)})
        if str(trees.link) not in LINKS:
            raise ValueError(f"{path}: unknown link {trees.link!r}")
        return trees


def fit_trees(x_train: np.ndarray, y_train: np.ndarray, *, task: str, n_classes: int | None = None,
              seed: int = 0, threads: int = 1) -> Trees:
    """Fit HistGradientBoosting on the training split (flattened inputs) and copy its trees out.

    Early stopping holds out part of the training split itself, never the validation or test split.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    x = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    model: Any
    if task == "classification":
        model = HistGradientBoostingClassifier(early_stopping=True, random_state=seed)
    elif task == "regression":
        if np.asarray(y_train).ndim > 1 and np.asarray(y_train).shape[1] > 1:
            raise ValueError("HistGradientBoosting predicts one target; this dataset has several")
        model = HistGradientBoostingRegressor(early_stopping=True, random_state=seed)
    else:
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    with threadpool_limits(threads):
        model.fit(x, np.asarray(y_train).reshape(len(y_train)))
    if task == "classification" and list(model.classes_) != list(range(n_classes or len(model.classes_))):
        raise ValueError("every class must occur in the training split")
    return _copy_out(model, task)


def _copy_out(model: Any, task: str) -> Trees:
    """The fitted trees as flat arrays; scikit-learn keeps them in `_predictors`, `_baseline_prediction`."""
    per_iteration = model.n_trees_per_iteration_
    nodes, roots, outputs, offset = [], [], [], 0
    for iteration in model._predictors:
        for column, predictor in enumerate(iteration):
            tree = predictor.nodes
            if tree["is_categorical"].any():
                raise ValueError("categorical splits are not supported")
            nodes.append(tree)
            roots.append(offset)
            outputs.append(column)
            offset += len(tree)
    all_nodes = np.concatenate(nodes)
    shift = np.repeat(np.asarray(roots, dtype=np.int64), [len(n) for n in nodes])
    if task == "regression":
        link = "identity"
    else:
        link = "softmax" if per_iteration > 1 else "sigmoid"
    return Trees(
        feature=all_nodes["feature_idx"].astype(np.int64),
        threshold=all_nodes["num_threshold"].astype(np.float64),
        missing_left=all_nodes["missing_go_to_left"].astype(bool),
        left=all_nodes["left"].astype(np.int64) + shift,
        right=all_nodes["right"].astype(np.int64) + shift,
        leaf=all_nodes["is_leaf"].astype(bool),
        value=all_nodes["value"].astype(np.float64),
        roots=np.asarray(roots, dtype=np.int64),
        output=np.asarray(outputs, dtype=np.int64),
        baseline=np.asarray(model._baseline_prediction, dtype=np.float64).reshape(-1),
        link=np.asarray(link),
        depth=np.asarray(int(all_nodes["depth"].max()), dtype=np.int64),
    )
