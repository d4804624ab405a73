"""Trained models as artifacts: safetensors weights plus a JSON config, for workers, the API and exports.

A completed trial leaves `trial-<n>.safetensors` and `trial-<n>.json` in its study's folder; no other trial
leaves anything. The config holds the `ModelSpec` (architecture, hyperparameters, input shape,
standardization, class labels), the trial's metrics and `layers`: the network as a list of plain torch.nn
layers, read from the trained module, so an exported model loads in PyTorch without this package
(the README).

torch is imported inside the functions that need it: the API imports this module without loading torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.ml.ensemble import weighted_average
from app.ml.space import MODELS
from app.ml.trees import Trees

WEIGHTS_FILE = "model.safetensors"  # names inside downloads and exports
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"  # per-attempt checkpoint folders (trial-<number>-<attempt>), under a study's folder
ENSEMBLE_FILE = "ensemble.json"
TREES_FILE = "trees.npz"
TREES_NAME = "trees"  # the trees member: its name in an ensemble and its file stem in a study's folder
PREDICT_BATCH = 4096
_TRIAL_FILE = re.compile(r"^trial-(\d+)\.")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained network: also the JSON config saved beside its weights."""

    model: str
    params: dict[str, Any]
    task: str
    input_shape: tuple[int, ...]
    n_outputs: int
    feature_groups: list[list[int]] | None
    classes: list[str] | None
    mean: list[float] | None = None  # per-channel (images) or per-feature statistics of the training split
    std: list[float] | None = None
    plugin: dict[str, str] | None = None  # {"name", "version", "distribution"} of a model plugin (app.plugins)
    # A PBT member's: the hyperparameter schedule that produced these weights (`params` are its last step's).
    schedule: list[dict[str, Any]] | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """The spec part of a saved config (which also holds metrics and layers)."""
        return cls(model=config["model"], params=dict(config["params"]), task=config["task"],
                   input_shape=tuple(int(d) for d in config["input_shape"]),
                   n_outputs=int(config["n_outputs"]),
                   feature_groups=config.get("feature_groups"), classes=config.get("classes"),
                   mean=config.get("mean"), std=config.get("std"), plugin=config.get("plugin"),
                   schedule=config.get("schedule"))


# ---- files of a study ------------------------------------------------------------------------------------


def checkpoint_folders_of(study_dir: Path, number: int) -> list[Path]:
    """Every attempt's checkpoint folder of one trial on disk."""
    return sorted((study_dir / CHECKPOINTS_DIR).glob(f"trial-{number}-*"))


def trial_stem(study_dir: Path, number: int) -> Path:
    return study_dir / f"trial-{number}"


def trial_files(stem: Path) -> tuple[Path, Path]:
    """(weights, config) of a trial's artifact, given the path without suffix."""
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def has_model(stem: Path) -> bool:
    return all(p.is_file() for p in trial_files(stem))


def read_config(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_trial(stem: Path, state: dict[str, Any], spec: ModelSpec, *, metrics: dict[str, float],
               layers: list[dict[str, Any]]) -> None:
    """Write weights, then config, each atomically: a config on disk means its weights are complete."""
    from safetensors.torch import save

    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, config = trial_files(stem)
    _write_atomically(weights, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    body = {**asdict(spec), "metrics": metrics, "layers": layers}
    if spec.schedule is None:  # only a PBT member's weights come with a schedule
        del body["schedule"]
    _write_atomically(config, json.dumps(body, indent=1).encode())


def prune_study_dir(study_dir: Path, *, keep: set[int]) -> list[Path]:
    """Delete trial files of trials not kept (pruned, failed, half-written) and leftovers of earlier runs."""
    removed: list[Path] = []
    if not study_dir.is_dir():
        return removed
    for path in study_dir.iterdir():
        match = _TRIAL_FILE.match(path.name)
        stale = path.name.endswith(".tmp") or path.name.startswith(TREES_NAME + ".") \
            or (match is not None and int(match.group(1)) not in keep)
        if stale and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---- building and describing modules ---------------------------------------------------------------------


def _broadcast_stats(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    shape = tuple(spec.input_shape)
    mean = np.asarray(spec.mean if spec.mean is not None else 0.0, dtype=np.float32)
    std = np.asarray(spec.std if spec.std is not None else 1.0, dtype=np.float32)
    if len(shape) == 3 and mean.ndim == 1:  # per channel -> (C, H, W)
        mean, std = mean[:, None, None], std[:, None, None]
    return np.broadcast_to(mean, shape).copy(), np.broadcast_to(std, shape).copy()


def build_module(spec: ModelSpec) -> Any:
    """The untrained network a spec describes (app.ml.networks.build_model, or its enabled model plugin)."""
    mean, std = _broadcast_stats(spec)
    if spec.model not in MODELS:
        from app.plugins import build_plugin_module

        return build_plugin_module(spec, mean, std)
    from app.ml.networks import build_model

    return build_model(spec.params, model=spec.model, input_shape=tuple(spec.input_shape),
                       n_outputs=spec.n_outputs, mean=mean, std=std, feature_groups=spec.feature_groups)


def load_module(stem: Path, spec: ModelSpec, device: str = "cpu") -> Any:
    """A trained network in eval mode from its safetensors weights."""
    from safetensors.torch import load_file

    module = build_module(spec)
    module.load_state_dict(load_file(str(trial_files(stem)[0]), device="cpu"))
    return module.to(device).eval()


def describe_layers(module: Any) -> list[dict[str, Any]]:
    """The children of a built network as {"type": torch.nn class name, "args": constructor arguments}.

    Rebuilding `nn.Sequential` from this list (the README) gives a module whose state_dict keys match
    the saved weights. Standardize and Branches are this package's own two layers; the README defines
    them in a few lines of torch.
    """
    return [_describe(layer) for layer in module.children()]


def _describe(layer: Any) -> dict[str, Any]:
    from torch import nn

    from app.ml.networks import Branches, Standardize

    kind = type(layer).__name__
    args: dict[str, Any]
    if isinstance(layer, Standardize):
        args = {"shape": list(layer.mean.shape)}
    elif isinstance(layer, Branches):
        groups = [getattr(layer, f"index_{i}").tolist() for i in range(len(layer.branches))]
        args = {"groups": groups, "merge": layer.merge,
                "branches": [describe_layers(b) for b in layer.branches]}
    elif isinstance(layer, nn.Linear):
        args = {"in_features": layer.in_features, "out_features": layer.out_features,
                "bias": layer.bias is not None}
    elif isinstance(layer, nn.Conv2d):
        args = {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                "padding": list(layer.padding), "groups": layer.groups, "bias": layer.bias is not None}
    elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
        args = {"num_features": layer.num_features, "eps": layer.eps, "momentum": layer.momentum}
    elif isinstance(layer, nn.MaxPool2d):
        args = {"kernel_size": layer.kernel_size, "stride": layer.stride}
    elif isinstance(layer, nn.Dropout):
        args = {"p": layer.p}
    elif isinstance(layer, nn.Flatten):
        args = {"start_dim": layer.start_dim, "end_dim": layer.end_dim}
    elif isinstance(layer, nn.ReLU | nn.Tanh | nn.Sigmoid | nn.SiLU):
        args = {}
    else:
        raise ValueError(f"cannot describe layer {kind}")
    return {"type": kind, "args": args}


# ---- predicting ------------------------------------------------------------------------------------------


class Predictor(Protocol):
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) or regression outputs (N, k) as float64, for raw inputs (N, *shape)."""
        ...


class NetPredictor:
    """A trained network: softmax probabilities for classification, its outputs for regression."""

    def __init__(self, module: Any, task: str, device: str = "cpu") -> None:
        self.module, self.task, self.device = module.eval(), task, device

    @classmethod
    def load(cls, stem: Path, spec: ModelSpec, device: str = "cpu") -> NetPredictor:
        return cls(load_module(stem, spec, device), spec.task, device)

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        outs = []
        with torch.no_grad():
            for start in range(0, len(x), PREDICT_BATCH):
                xb = torch.as_tensor(np.asarray(x[start:start + PREDICT_BATCH], dtype=np.float32))
                out = self.module(xb.to(self.device)).double()
                outs.append((out.softmax(dim=1) if self.task == "classification" else out).cpu().numpy())
        return np.concatenate(outs)


class TreesPredictor:
    def __init__(self, trees: Trees) -> None:
        self.trees = trees

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.trees.predict(x)


class WeightedPredictor:
    """The ensemble: the weighted average of its members' predictions."""

    def __init__(self, members: Sequence[tuple[Predictor, float]]) -> None:
        self.members = [(p, w) for p, w in members if w > 0]
        if not self.members:
            raise ValueError("an ensemble needs a member with positive weight")

    def predict(self, x: np.ndarray) -> np.ndarray:
        return weighted_average([p.predict(x) for p, _ in self.members], [w for _, w in self.members])


# ---- exported folders (hpsearch export, downloads) -------------------------------------------------------


def load_model_dir(directory: str | Path, device: str = "cpu") -> NetPredictor:
    """A model folder as downloaded or exported: model.safetensors + config.json."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec = ModelSpec.from_config(read_config(directory / CONFIG_FILE))
    module = build_module(spec)
    module.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device="cpu"))
    return NetPredictor(module.to(device), spec.task, device)


def load_ensemble_dir(directory: str | Path, device: str = "cpu") -> WeightedPredictor:
    """An exported ensemble: ensemble.json naming members, one folder per network, trees/trees.npz."""
    directory = Path(directory)
    record = read_config(directory / ENSEMBLE_FILE)
    members: list[tuple[Predictor, float]] = []
    for member in record["members"]:
        if member["weight"] <= 0:
            continue
        predictor: Predictor
        if member["kind"] == TREES_NAME:
            predictor = TreesPredictor(Trees.load(directory / TREES_NAME / TREES_FILE))
        else:
            predictor = load_model_dir(directory / member["name"], device)
        members.append((predictor, member["weight"]))
    return WeightedPredictor(members)
