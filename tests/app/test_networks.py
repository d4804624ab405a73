"""Each hyperparameter reaches the built module: inspect layers, shapes and initial weights."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from app.ml.networks import Branches, Standardize, build_model, parameter_count


def mlp(params: dict[str, Any], n_features: int = 20, n_outputs: int = 3, **kw: Any) -> nn.Sequential:
    torch.manual_seed(0)
    return build_model(params, model="mlp", input_shape=(n_features,), n_outputs=n_outputs,
                       mean=np.zeros(n_features), std=np.ones(n_features), **kw)


def cnn(params: dict[str, Any], shape: tuple[int, int, int] = (1, 8, 8),
        n_outputs: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return build_model(params, model="cnn", input_shape=shape, n_outputs=n_outputs,
                       mean=np.zeros(shape), std=np.ones(shape))


def of_type(module: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def type_names(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


# ---- mlp structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_n_layers_gives_hidden_linears_plus_head(n_layers: int) -> None:
    model = mlp({"n_layers": n_layers, "units": 16})
    linears = of_type(model, nn.Linear)
    assert len(linears) == n_layers + 1
    assert [lin.out_features for lin in linears[:-1]] == [16] * n_layers
    assert linears[0].in_features == 20
    assert linears[-1].out_features == 3


def test_funnel_halves_width_per_layer() -> None:
    linears = of_type(mlp({"n_layers": 4, "units": 256, "layer_shape": "funnel"}), nn.Linear)
    assert [lin.out_features for lin in linears] == [256, 128, 64, 32, 3]
    assert [lin.in_features for lin in linears] == [20, 256, 128, 64, 32]


def test_funnel_never_narrower_than_four() -> None:
    linears = of_type(mlp({"n_layers": 4, "units": 16, "layer_shape": "funnel"}), nn.Linear)
    assert [lin.out_features for lin in linears[:-1]] == [16, 8, 4, 4]


def test_defaults_fill_missing_keys() -> None:
    model = mlp({})
    linears = of_type(model, nn.Linear)
    assert [lin.out_features for lin in linears] == [64, 64, 3]
    assert of_type(model, nn.ReLU) and not of_type(model, nn.BatchNorm1d) and not of_type(model, nn.Dropout)


@pytest.mark.parametrize("placement,expected", [
    ("before_activation", ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]),
    ("after_activation", ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]),
    ("none", ["Linear", "ReLU", "Linear", "ReLU", "Linear"]),
])
def test_batch_norm_position(placement: str, expected: list[str]) -> None:
    model = mlp({"batch_norm": placement, "n_layers": 2, "units": 8})
    assert type_names(model)[2:] == expected
    for bn in of_type(model, nn.BatchNorm1d):
        assert bn.num_features == 8
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_dropout_rate_and_position() -> None:
    model = mlp({"dropout": 0.3, "n_layers": 2, "batch_norm": "before_activation"})
    drops = of_type(model, nn.Dropout)
    assert len(drops) == 2 and all(d.p == pytest.approx(0.3) for d in drops)
    assert type_names(model)[2:6] == ["Linear", "BatchNorm1d", "ReLU", "Dropout"]
    assert not of_type(mlp({"dropout": 0.0}), nn.Dropout)


@pytest.mark.parametrize("name,cls", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid),
                                      ("silu", nn.SiLU)])
def test_activation_class(name: str, cls: type[nn.Module]) -> None:
    model = mlp({"activation": name, "n_layers": 3})
    assert len(of_type(model, cls)) == 3
    others = {nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU} - {cls}
    assert not of_type(model, tuple(others))


def test_unknown_values_are_rejected() -> None:
    for bad in ({"activation": "gelu"}, {"weight_init": "zeros"}, {"batch_norm": "middle"}):
        with pytest.raises(ValueError):
            mlp(bad)
    with pytest.raises(ValueError):
        build_model({}, model="rnn", input_shape=(4,), n_outputs=2, mean=np.zeros(4), std=np.ones(4))


# ---- weight initialization --------------------------------------------------------------------------


def big_weight(scheme: str, fan_in: int = 1000, fan_out: int = 500) -> torch.Tensor:
    model = mlp({"weight_init": scheme, "n_layers": 1, "units": fan_out}, n_features=fan_in)
    return of_type(model, nn.Linear)[0].weight.detach()


@pytest.mark.parametrize("scheme,expected_std", [
    ("normal", 1.0),
    ("he_normal", math.sqrt(2 / 1000)),
    ("he_uniform", math.sqrt(2 / 1000)),
    ("glorot_normal", math.sqrt(2 / 1500)),
    ("glorot_uniform", math.sqrt(2 / 1500)),
])
def test_weight_init_std(scheme: str, expected_std: float) -> None:
    w = big_weight(scheme)
    assert w.mean().item() == pytest.approx(0.0, abs=0.02 * expected_std + 1e-3)
    assert w.std().item() == pytest.approx(expected_std, rel=0.03)


@pytest.mark.parametrize("scheme,bound", [("he_uniform", math.sqrt(6 / 1000)),
                                          ("glorot_uniform", math.sqrt(6 / 1500))])
def test_uniform_inits_are_bounded(scheme: str, bound: float) -> None:
    w = big_weight(scheme)
    assert w.abs().max().item() <= bound + 1e-6
    assert w.abs().max().item() > 0.95 * bound


def test_normal_init_is_gaussian_not_uniform() -> None:
    w = big_weight("he_normal")
    std = w.std().item()
    # A Gaussian has ~0.27% of mass beyond 3 sigma; a uniform has none.
    assert (w.abs() > 3 * std).float().mean().item() > 0.001
    assert (big_weight("he_uniform").abs() > 3 * std).sum().item() == 0


@pytest.mark.parametrize("scheme", ["he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "normal"])
def test_every_layer_initialized_and_biases_zero(scheme: str) -> None:
    model = cnn({"weight_init": scheme, "n_layers": 2, "filters": 8, "batch_norm": "before_activation"})
    for layer in of_type(model, (nn.Linear, nn.Conv2d)):
        if layer.bias is not None:
            assert torch.all(layer.bias == 0)
    if scheme == "normal":
        head = of_type(model, nn.Linear)[0].weight
        assert head.std().item() == pytest.approx(1.0, rel=0.1)
    for bn in of_type(model, nn.BatchNorm2d):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


# ---- cnn --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 5, 7)])
def test_cnn_three_blocks_runs_on_small_and_mnist_images(shape: tuple[int, int, int]) -> None:
    model = cnn({"n_layers": 3, "filters": 4}, shape=shape)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    convs = of_type(model, nn.Conv2d)
    assert [c.out_channels for c in convs] == [4, 8, 16]
    pools = of_type(model, nn.MaxPool2d)
    assert 1 <= len(pools) <= 3


def test_cnn_pooling_stops_at_one_pixel() -> None:
    assert len(of_type(cnn({"n_layers": 3}, shape=(1, 8, 8)), nn.MaxPool2d)) == 3  # 8→4→2→1
    assert len(of_type(cnn({"n_layers": 3}, shape=(1, 2, 2)), nn.MaxPool2d)) == 1  # 2→1, then no more


@pytest.mark.parametrize("k", [3, 5])
def test_kernel_size_reaches_conv(k: int) -> None:
    convs = of_type(cnn({"kernel_size": k, "n_layers": 2}), nn.Conv2d)
    assert all(c.kernel_size == (k, k) and c.padding == (k // 2, k // 2) for c in convs)


def test_separable_conv_is_depthwise_then_pointwise() -> None:
    model = cnn({"separable": True, "n_layers": 2, "filters": 8, "kernel_size": 5}, shape=(3, 8, 8))
    layers = list(model)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for depth_i, (in_ch, out_ch) in zip(convs[::2], [(3, 8), (8, 16)], strict=True):
        depthwise, pointwise = layers[depth_i], layers[depth_i + 1]
        assert isinstance(pointwise, nn.Conv2d)
        assert depthwise.groups == in_ch == depthwise.in_channels == depthwise.out_channels
        assert depthwise.kernel_size == (5, 5)
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
        assert (pointwise.in_channels, pointwise.out_channels) == (in_ch, out_ch)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    plain = cnn({"separable": False, "n_layers": 2, "filters": 8}, shape=(3, 8, 8))
    assert all(c.groups == 1 for c in of_type(plain, nn.Conv2d))
    assert parameter_count(model) < parameter_count(cnn({"n_layers": 2, "filters": 8, "kernel_size": 5},
                                                        shape=(3, 8, 8)))


def test_cnn_block_order_and_dense_head() -> None:
    model = cnn({"n_layers": 1, "filters": 4, "units": 12, "batch_norm": "after_activation", "dropout": 0.1,
                 "activation": "tanh"})
    assert type_names(model) == ["Standardize", "Conv2d", "Tanh", "BatchNorm2d", "MaxPool2d", "Dropout",
                                 "Flatten", "Linear", "Tanh", "BatchNorm1d", "Dropout", "Linear"]
    dense = of_type(model, nn.Linear)
    assert dense[0].in_features == 4 * 4 * 4 and dense[0].out_features == 12


# ---- branches ---------------------------------------------------------------------------------------


def iris_like(merge: str | None, groups: list[list[int]] | None = None) -> nn.Sequential:
    params: dict[str, Any] = {"n_layers": 2, "units": 8}
    if merge is not None:
        params["branch_merge"] = merge
    return mlp(params, n_features=4, feature_groups=groups if groups is not None else [[0, 1], [2, 3]])


def test_branch_concat_and_add_widths() -> None:
    concat, add = iris_like("concat"), iris_like("add")
    for model, head_in in ((concat, 16), (add, 8)):
        branches = of_type(model, Branches)
        assert len(branches) == 1 and len(branches[0].branches) == 2
        assert [of_type(b, nn.Linear)[0].in_features for b in branches[0].branches] == [2, 2]
        assert model[-1].in_features == head_in
        assert model(torch.randn(6, 4)).shape == (6, 3)


def test_branches_see_only_their_columns() -> None:
    model = iris_like("concat").eval()
    x = torch.randn(5, 4)
    changed = x.clone()
    changed[:, 2:] += 10.0  # only group 2's columns
    branch = of_type(model, Branches)[0]
    h1, h2 = branch(x), branch(changed)
    assert torch.equal(h1[:, :8], h2[:, :8])
    assert not torch.equal(h1[:, 8:], h2[:, 8:])


def test_add_merge_sums_branches() -> None:
    model = iris_like("add").eval()
    branch = of_type(model, Branches)[0]
    x = torch.randn(5, 4)
    expected = branch.branches[0](x[:, [0, 1]]) + branch.branches[1](x[:, [2, 3]])
    assert torch.allclose(branch(x), expected)


def test_groups_ignored_without_branch_merge() -> None:
    model = iris_like(None)
    assert not of_type(model, Branches)
    assert of_type(model, nn.Linear)[0].in_features == 4


def test_bad_groups_rejected() -> None:
    with pytest.raises(ValueError):
        iris_like("concat", groups=[[0, 1], [2, 9]])


# ---- standardization --------------------------------------------------------------------------------


def test_standardize_makes_model_scale_invariant() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    scale = np.array([1000, 0.001, 5, 1, 70, 2], np.float32)
    scaled = (x + np.arange(6, dtype=np.float32) - 2) * scale  # shifts in units of each column's scale
    models = []
    for data in (x, scaled):
        torch.manual_seed(0)
        models.append(build_model({"n_layers": 2}, model="mlp", input_shape=(6,), n_outputs=2,
                                  mean=data.mean(0), std=data.std(0)).eval())
    out_raw = models[0](torch.from_numpy(x))
    out_scaled = models[1](torch.from_numpy(scaled))
    assert torch.allclose(out_raw, out_scaled, atol=1e-3)
    state = models[1].state_dict()
    assert torch.allclose(state["0.mean"], torch.from_numpy(scaled.mean(0)))
    assert torch.allclose(state["0.std"], torch.from_numpy(scaled.std(0)))


def test_state_dict_is_self_contained() -> None:
    mean, std = np.full((1, 8, 8), 3.0), np.full((1, 8, 8), 2.0)
    model = build_model({"n_layers": 1}, model="cnn", input_shape=(1, 8, 8), n_outputs=4, mean=mean, std=std)
    other = build_model({"n_layers": 1}, model="cnn", input_shape=(1, 8, 8), n_outputs=4,
                        mean=np.zeros((1, 8, 8)), std=np.ones((1, 8, 8)))
    other.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), other.eval()(x))
    assert other[0].mean.shape == (1, 8, 8)


def test_zero_std_is_clamped() -> None:
    std = np.array([0.0, 2.0, 1e-12])
    layer = Standardize(np.zeros(3), std, (3,))
    assert torch.all(layer.std > 0)
    out = layer(torch.tensor([[5.0, 4.0, 1.0]]))
    assert torch.isfinite(out).all() and out[0, 1].item() == pytest.approx(2.0)


def test_parameter_count_excludes_buffers() -> None:
    model = mlp({"n_layers": 1, "units": 10}, n_features=4, n_outputs=2)
    assert parameter_count(model) == (4 * 10 + 10) + (10 * 2 + 2)
