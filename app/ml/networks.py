"""Build a PyTorch model (mlp, cnn, or a multi-branch mlp) from one trial's hyperparameters.

Every model starts with `Standardize`, which holds the training split's mean and std as buffers: a saved
state_dict is self-contained and the model takes raw inputs. Missing hyperparameters take `DEFAULTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

DEFAULTS: dict[str, Any] = {
    "n_layers": 2,
    "units": 64,
    "layer_shape": "constant",
    "activation": "relu",
    "batch_norm": "none",
    "dropout": 0.0,
    "weight_init": "he_normal",
    "filters": 16,
    "kernel_size": 3,
    "separable": False,
}

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}

INITS: dict[str, Callable[[Tensor], Any]] = {
    "he_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "he_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "glorot_normal": nn.init.xavier_normal_,
    "glorot_uniform": nn.init.xavier_uniform_,
    "normal": lambda w: nn.init.normal_(w, mean=0.0, std=1.0),  # N(0, 1.0) as the course notes define it
}

BATCH_NORM = ("none", "before_activation", "after_activation")
LAYER_SHAPES = ("constant", "funnel")
MERGES = ("concat", "add")
MIN_FUNNEL_WIDTH = 4
STD_EPS = 1e-8


class Standardize(nn.Module):
    """(x - mean) / std with the training split's statistics stored as buffers."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(np.broadcast_to(np.asarray(mean, dtype=np.float32), input_shape).copy())
        std_t = torch.as_tensor(np.broadcast_to(np.asarray(std, dtype=np.float32), input_shape).copy())
        # A constant feature has std 0: divide by 1 instead, so an unseen value cannot explode.
        std_t = torch.where(std_t.abs() > STD_EPS, std_t.abs(), torch.ones_like(std_t))
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Branches(nn.Module):
    """One sub-network per feature group over its own columns of the flattened input, merged."""

    def __init__(self, groups: list[list[int]], stacks: list[nn.Sequential], merge: str) -> None:
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"branch_merge must be one of {MERGES}, got {merge!r}")
        self.merge = merge
        self.branches = nn.ModuleList(stacks)
        for i, group in enumerate(groups):
            self.register_buffer(f"index_{i}", torch.tensor(group, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x.index_select(1, getattr(self, f"index_{i}")))
                for i, branch in enumerate(self.branches)]
        if self.merge == "concat":
            return torch.cat(outs, dim=1)
        return torch.stack(outs, dim=0).sum(dim=0)


def build_model(params: dict[str, Any], *, model: str, input_shape: tuple[int, ...], n_outputs: int,
                mean: np.ndarray, std: np.ndarray,
                feature_groups: list[list[int]] | None = None) -> nn.Module:
    """The module a trial trains: raw inputs of shape (N, *input_shape) in, n_outputs logits/values out."""
    p = {**DEFAULTS, **params}
    _check_common(p)
    input_shape = tuple(int(d) for d in input_shape)
    standardize = Standardize(mean, std, input_shape)
    if model == "mlp":
        net = _build_mlp(p, input_shape, n_outputs, feature_groups)
    elif model == "cnn":
        net = _build_cnn(p, input_shape, n_outputs)
    else:
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    net.insert(0, standardize)
    _init_weights(net, p["weight_init"])
    return net


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters (buffers such as the standardization statistics are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- mlp ---------------------------------------------------------------------------------------------


def _build_mlp(p: dict[str, Any], input_shape: tuple[int, ...], n_outputs: int,
               feature_groups: list[list[int]] | None) -> nn.Sequential:
    n_features = int(np.prod(input_shape))
    layers: list[nn.Module] = [nn.Flatten()]
    merge = p.get("branch_merge")
    if feature_groups and merge is not None:
        groups = _check_groups(feature_groups, n_features)
        stacks = [nn.Sequential(*_dense_stack(p, len(g))[0]) for g in groups]
        width = _widths(p)[-1]  # every branch has the same stack, so the same output width
        layers.append(Branches(groups, stacks, merge))
        out_width = width * len(groups) if merge == "concat" else width
    else:
        hidden, out_width = _dense_stack(p, n_features)
        layers.extend(hidden)
    layers.append(nn.Linear(out_width, n_outputs))
    return nn.Sequential(*layers)


def _widths(p: dict[str, Any]) -> list[int]:
    """Hidden widths: `units` every layer, or halving per layer (never below 4) for a funnel."""
    units, n_layers = int(p["units"]), int(p["n_layers"])
    if p["layer_shape"] == "constant":
        return [units] * n_layers
    floor = min(units, MIN_FUNNEL_WIDTH)
    return [max(units >> i, floor) for i in range(n_layers)]


def _dense_stack(p: dict[str, Any], in_features: int) -> tuple[list[nn.Module], int]:
    """The hidden blocks over in_features inputs, and the width they end with."""
    layers: list[nn.Module] = []
    width = in_features
    for out in _widths(p):
        layers.append(nn.Linear(width, out))
        layers.extend(_after_weights(p, out, nn.BatchNorm1d))
        width = out
    return layers, width


def _after_weights(p: dict[str, Any], channels: int, bn: type[nn.Module]) -> list[nn.Module]:
    """BatchNorm (before or after the activation), the activation, then dropout when > 0."""
    act = ACTIVATIONS[p["activation"]]()
    layers: list[nn.Module] = []
    if p["batch_norm"] == "before_activation":
        layers += [bn(channels), act]
    elif p["batch_norm"] == "after_activation":
        layers += [act, bn(channels)]
    else:
        layers.append(act)
    if float(p["dropout"]) > 0:
        layers.append(nn.Dropout(float(p["dropout"])))
    return layers


# ---- cnn ---------------------------------------------------------------------------------------------


def _build_cnn(p: dict[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs inputs shaped (C, H, W), got {input_shape}")
    channels, h, w = input_shape
    k = int(p["kernel_size"])
    layers: list[nn.Module] = []
    for i in range(int(p["n_layers"])):
        out = int(p["filters"]) * 2**i
        layers.extend(_conv(channels, out, k, bool(p["separable"])))
        h, w = h + 2 * (k // 2) - k + 1, w + 2 * (k // 2) - k + 1
        conv_block = _after_weights(p, out, nn.BatchNorm2d)
        if min(h, w) >= 2:  # pool only while the feature map still has room to halve
            idx = len(conv_block) - (1 if float(p["dropout"]) > 0 else 0)
            conv_block.insert(idx, nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        layers.extend(conv_block)
        channels = out
    layers.append(nn.Flatten())
    units = int(p["units"])
    layers.append(nn.Linear(channels * h * w, units))
    layers.extend(_after_weights(p, units, nn.BatchNorm1d))
    layers.append(nn.Linear(units, n_outputs))
    return nn.Sequential(*layers)


def _conv(in_ch: int, out_ch: int, k: int, separable: bool) -> list[nn.Module]:
    """A plain conv, or a depthwise conv (one filter per channel) followed by a 1x1 pointwise conv."""
    if not separable:
        return [nn.Conv2d(in_ch, out_ch, k, padding=k // 2)]
    return [nn.Conv2d(in_ch, in_ch, k, padding=k // 2, groups=in_ch, bias=False), nn.Conv2d(in_ch, out_ch, 1)]


# ---- checks and initialization -----------------------------------------------------------------------


def _check_common(p: dict[str, Any]) -> None:
    checks = (("activation", ACTIVATIONS), ("weight_init", INITS), ("batch_norm", BATCH_NORM),
              ("layer_shape", LAYER_SHAPES))
    for name, allowed in checks:
        if p[name] not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {p[name]!r}")
    if int(p["n_layers"]) < 1 or int(p["units"]) < 1:
        raise ValueError("n_layers and units must be at least 1")
    if not 0.0 <= float(p["dropout"]) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p['dropout']!r}")


def _check_groups(groups: list[list[int]], n_features: int) -> list[list[int]]:
    out = [[int(i) for i in g] for g in groups]
    for g in out:
        if not g or any(i < 0 or i >= n_features for i in g):
            raise ValueError(f"feature group {g} is empty or indexes outside 0..{n_features - 1}")
    return out


def _init_weights(module: nn.Module, scheme: str) -> None:
    """The chosen scheme for every Linear/Conv weight; zero biases; BatchNorm weight 1, bias 0."""
    init = INITS[scheme]
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
