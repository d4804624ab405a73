"""Sampled configurations reach what a runner trains, along the supervisor's path: resolve the documented
space, sample through an Optuna trial, build the ModelSpec, build the module, make the optimizer and schedule.
Every assertion inspects the built module or the optimizer's param groups, never the configuration alone."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
import torch
from torch import nn

from app.ml import data
from app.ml.artifacts import ModelSpec, build_module
from app.ml.networks import ACTIVATIONS, INITS, Branches
from app.ml.space import Context, resolve_space, sample_params
from workers.runner import standardization
from workers.trainer import TrainData, make_optimizer, make_scheduler, train

OPTIMIZERS = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "nesterov": torch.optim.SGD,
              "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
              "adamw": torch.optim.AdamW}
SCHEDULES = {"constant": type(None), "step": torch.optim.lr_scheduler.StepLR,
             "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
             "cosine": torch.optim.lr_scheduler.CosineAnnealingLR}


def configurations(ds: data.Dataset, model: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n configurations of the documented default space for ds, drawn as the supervisor draws them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    resolved = resolve_space({}, Context.of(data.describe(ds), model))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(sample_params(trial, resolved))
        study.tell(trial, 0.0)
    return out


def model_spec(ds: data.Dataset, model: str, params: dict[str, Any]) -> ModelSpec:
    """The spec a supervisor hands its runner (workers.prepared.PreparedStudy.model_spec)."""
    mean, std = standardization(ds.x, ds.image_shape is not None)
    groups = list(ds.feature_groups.values()) if ds.feature_groups else None
    return ModelSpec(model=model, params=params, task=ds.task, input_shape=ds.input_shape,
                     n_outputs=ds.n_outputs, feature_groups=groups, classes=ds.classes, mean=mean.tolist(),
                     std=std.tolist())


def of_type(module: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def check_blocks(seq: nn.Sequential, params: dict[str, Any], n_blocks: int) -> None:
    """Activation class, batch-norm placement and dropout rate of every block in seq."""
    layers = list(seq)
    act = ACTIVATIONS[params["activation"]]
    acts = [i for i, m in enumerate(layers) if type(m) is act]
    others = [m for m in layers if type(m) in ACTIVATIONS.values() and type(m) is not act]
    assert len(acts) == n_blocks and not others
    bns = [i for i, m in enumerate(layers) if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    if params["batch_norm"] == "none":
        assert not bns
    elif params["batch_norm"] == "before_activation":
        assert [i + 1 for i in bns] == acts
    else:
        assert [i - 1 for i in bns] == acts
    drops = [m for m in layers if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == ([params["dropout"]] * n_blocks if params["dropout"] > 0 else [])


def check_optimizer_and_schedule(params: dict[str, Any], module: nn.Module) -> None:
    optimizer = make_optimizer(params, module)
    assert type(optimizer) is OPTIMIZERS[params["optimizer"]]
    (group,) = optimizer.param_groups
    assert group["lr"] == params["learning_rate"] and group["weight_decay"] == params["weight_decay"]
    assert len(group["params"]) == len(list(module.parameters()))
    if isinstance(optimizer, torch.optim.SGD):
        assert group["momentum"] == params.get("momentum", 0)
        assert group["nesterov"] is (params["optimizer"] == "nesterov")
    scheduler = make_scheduler(params, optimizer, epochs=10)
    assert type(scheduler) is SCHEDULES[params["lr_schedule"]]


def expected_widths(params: dict[str, Any]) -> list[int]:
    units, n = params["units"], params["n_layers"]
    if params["layer_shape"] == "constant":
        return [units] * n
    return [max(units // 2**i, min(units, 4)) for i in range(n)]


def test_sampled_mlp_configurations_on_iris_reach_the_branches_and_the_optimizer() -> None:
    ds = data.load_builtin("builtin:iris")
    configs = configurations(ds, "mlp", 30)
    assert {c["optimizer"] for c in configs} == set(OPTIMIZERS) and {c["branch_merge"] for c in configs} == \
        {"concat", "add"}
    for params in configs:
        module = build_module(model_spec(ds, "mlp", params))
        (branches,) = of_type(module, Branches)
        assert branches.merge == params["branch_merge"] and len(branches.branches) == 2  # sepal, petal
        widths = expected_widths(params)
        for branch in branches.branches:
            assert [lin.out_features for lin in of_type(branch, nn.Linear)] == widths
            check_blocks(branch, params, params["n_layers"])
        head = list(module)[-1]
        assert head.in_features == widths[-1] * (2 if params["branch_merge"] == "concat" else 1)
        check_optimizer_and_schedule(params, module)


def weight_std(params: dict[str, Any], fan_in: int, fan_out: int) -> float:
    he, glorot = math.sqrt(2 / fan_in), math.sqrt(2 / (fan_in + fan_out))
    return {"he_normal": he, "he_uniform": he, "glorot_normal": glorot, "glorot_uniform": glorot,
            "normal": 1.0}[params["weight_init"]]


def test_sampled_mlp_configurations_on_digits_reach_layers_and_initial_weights() -> None:
    ds = data.load_builtin("builtin:digits")
    configs = configurations(ds, "mlp", 20, seed=1)
    assert {c["weight_init"] for c in configs} == set(INITS)  # every scheme is drawn
    for params in configs:
        module = build_module(model_spec(ds, "mlp", params))
        assert not of_type(module, Branches) and "branch_merge" not in params  # digits declare no groups
        linears = of_type(module, nn.Linear)
        assert [lin.out_features for lin in linears[:-1]] == expected_widths(params)
        check_blocks(module, params, params["n_layers"])
        first = linears[0]  # 64 inputs by >= 32 units: enough weights to measure their spread
        expected = weight_std(params, first.in_features, first.out_features)
        assert first.weight.std().item() == pytest.approx(expected, rel=0.15), params["weight_init"]
        assert torch.all(first.bias == 0)
        check_optimizer_and_schedule(params, module)


def test_sampled_cnn_configurations_reach_the_convolutions() -> None:
    ds = data.load_builtin("builtin:digits")
    configs = configurations(ds, "cnn", 20, seed=2)
    assert {c["separable"] for c in configs} == {True, False}
    assert {c["kernel_size"] for c in configs} == {3, 5}
    for params in configs:
        assert "layer_shape" not in params and "branch_merge" not in params
        module = build_module(model_spec(ds, "cnn", params))
        convs = of_type(module, nn.Conv2d)
        if params["separable"]:
            depthwise, pointwise = convs[0::2], convs[1::2]
            assert all(c.groups == c.in_channels == c.out_channels for c in depthwise)
            assert all(c.kernel_size == (params["kernel_size"],) * 2 for c in depthwise)
            assert all(c.kernel_size == (1, 1) for c in pointwise)
            blocks = pointwise
        else:
            assert all(c.groups == 1 and c.kernel_size == (params["kernel_size"],) * 2 for c in convs)
            blocks = convs
        widths = [params["filters"] * 2**i for i in range(params["n_layers"])]
        assert [c.out_channels for c in blocks] == widths
        check_blocks(module, params, params["n_layers"] + 1)  # conv blocks and the dense head
        assert of_type(module, nn.Linear)[0].out_features == params["units"]
        check_optimizer_and_schedule(params, module)


class BatchRecorder(nn.Module):
    """Records the size of every training batch the loop feeds the wrapped module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.sizes.append(int(x.shape[0]))
        return self.inner(x)


def test_sampled_batch_size_and_learning_rate_reach_the_training_loop() -> None:
    ds = data.load_builtin("builtin:synthetic")
    splits = data.split_dataset(ds, seed=0)
    tensors = TrainData(torch.as_tensor(splits.x_train), torch.as_tensor(splits.y_train),
                        torch.as_tensor(splits.x_val), torch.as_tensor(splits.y_val), task="classification")
    n_train = len(splits.y_train)
    for params in configurations(ds, "mlp", 4, seed=3):
        params = {**params, "lr_schedule": "constant"}
        recorder = BatchRecorder(build_module(model_spec(ds, "mlp", params)))
        result = train(recorder, tensors, params, epochs=1, objective="val_loss", direction="minimize")
        assert recorder.sizes[0] == params["batch_size"]
        assert sum(recorder.sizes) == n_train - (1 if n_train % params["batch_size"] == 1 else 0)
        assert result.history[0].learning_rate == params["learning_rate"]
