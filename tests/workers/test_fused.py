"""Fused trials: each member of a fused group trains exactly as its solo trial would, and ends alone."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from app.ml.artifacts import ModelSpec, NetPredictor, build_module, describe_layers, save_trial
from workers.fused import (
    FusedMLP,
    Member,
    MemberSchedules,
    can_fuse,
    fusion_order,
    max_waste,
    plan_groups,
    train_group,
)
from workers.runner import standardization
from workers.trainer import (
    EpochReport,
    TrainData,
    TrainResult,
    make_optimizer,
    make_scheduler,
    step_scheduler,
    train,
)

RTOL = 1e-5
EPOCHS = 6  # past the step schedule's first halving (epoch 5)


def digits(n_train: int = 300, n_val: int = 100) -> TrainData:
    d = load_digits()
    x = (d.images[:n_train + n_val, None] / 16).astype(np.float32)
    y = d.target[:n_train + n_val].astype(np.int64)
    real = torch.get_default_dtype()  # the test's precision
    return TrainData(torch.tensor(x[:n_train], dtype=real), torch.tensor(y[:n_train]),
                     torch.tensor(x[n_train:], dtype=real), torch.tensor(y[n_train:]), "classification", image=True)


DATA = digits()
DATA64 = TrainData(*(t.double() if t.is_floating_point() else t for t in (DATA.x_train, DATA.y_train, DATA.x_val,
                                                                         DATA.y_val)), "classification", image=True)
MEAN, STD = standardization(DATA.x_train.numpy(), True)


@pytest.fixture(autouse=True)
def _float64(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fused and solo runs are compared in float64. In float32 the two sum in different orders, which the CPU's
    kernels choose (AVX2 or AVX-512, say): rounding noise that adaptive optimizers, or a bias feeding a batch
    norm, grow into differences of the learning rate's order on some CPUs and not on others. In float64 that
    noise is 2^29 times smaller, so a difference is the engine's, not the CPU's. Tests of float32 artefacts
    (saved weights, dropout masks) are marked float32."""
    if request.node.get_closest_marker("float32"):
        yield
        return
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def split() -> TrainData:
    """The digits split in the test's precision."""
    return DATA64 if torch.get_default_dtype() == torch.float64 else DATA


def spec(params: dict[str, Any]) -> ModelSpec:
    return ModelSpec("mlp", {"batch_size": 32, **params}, "classification", (1, 8, 8), 10, None,
                     [str(i) for i in range(10)], MEAN.tolist(), STD.tolist())


def solo(params: dict[str, Any], seed: int, data: TrainData | None = None, **kw: Any) -> TrainResult:
    """The trial as the runner trains it alone: build under its seed, then workers.trainer.train."""
    torch.manual_seed(seed)
    module = build_module(spec(params))
    return train(module, data or split(), spec(params).params, epochs=kw.pop("epochs", EPOCHS),
                 objective="val_accuracy", direction="maximize", seed=seed, **kw)


def fused(group: list[dict[str, Any]], data: TrainData | None = None, **kw: Any) -> dict[Hashable, TrainResult]:
    members = [Member(i, spec(p), 100 + i) for i, p in enumerate(group)]
    return train_group(members, data or split(), epochs=kw.pop("epochs", EPOCHS), objective="val_accuracy",
                       direction="maximize", **kw)


def curve(history: list[EpochReport]) -> list[tuple[float, ...]]:
    return [(r.train_loss, r.val_loss, r.metrics["val_accuracy"], r.learning_rate) for r in history]


def assert_same_run(got: TrainResult, want: TrainResult) -> None:
    assert (got.epochs_run, got.best_epoch, got.stop_reason) == (want.epochs_run, want.best_epoch, want.stop_reason)
    np.testing.assert_allclose(curve(got.history), curve(want.history), rtol=RTOL, atol=0)
    assert list(got.best_state) == list(want.best_state)
    for name, tensor in want.best_state.items():  # the weights a trial publishes, at the curves' tolerance
        torch.testing.assert_close(got.best_state[name], tensor, rtol=RTOL, atol=RTOL)


# Three members per optimizer, varying every other network and schedule choice between them: padded widths
# (different units, funnel), fewer layers, each batch-norm placement, each activation and each initialization.
VARIANTS: list[dict[str, Any]] = [
    {"n_layers": 2, "units": 24, "batch_norm": "before_activation", "activation": "relu",
     "weight_init": "he_normal", "lr_schedule": "step", "weight_decay": 1e-3},
    {"n_layers": 3, "units": 32, "layer_shape": "funnel", "batch_norm": "after_activation", "activation": "tanh",
     "weight_init": "glorot_uniform", "lr_schedule": "cosine"},
    {"n_layers": 1, "units": 12, "batch_norm": "none", "activation": "silu", "weight_init": "he_uniform",
     "lr_schedule": "plateau", "weight_decay": 1e-2},
]
LEARNING_RATES = {"sgd": 0.1, "momentum": 0.03, "nesterov": 0.03, "adagrad": 0.05, "rmsprop": 0.002,
                  "adam": 0.005, "adamw": 0.005}


# Adagrad, RMSprop, Adam and AdamW divide by the root of (averaged) squared gradients. The bias of a layer
# followed by batch norm, and a ReLU unit active for one or two rows of a batch followed by batch norm, get
# gradients of rounding noise, which they turn into steps of about ±lr: such a solo run changes by 1e-4 to
# 1e-3 between one and two threads, so there is no exact curve to compare against. Their first member runs
# without batch norm; their second (tanh, batch norm after) and SGD's members cover the placements.
ILL_CONDITIONED = {name: {"batch_norm": "none"} for name in ("adagrad", "rmsprop", "adam", "adamw")}


@pytest.mark.parametrize("optimizer", ["adagrad", "rmsprop"])
def test_batch_norm_before_the_activation_with_adaptive_optimizers(optimizer: str) -> None:
    """Where equality holds for batch norm before the activation under an adaptive optimizer: one hidden
    layer, Adagrad or RMSprop (measured at 1, 2 and 4 threads, every activation). Adam and AdamW do not hold
    even there, nor does a second normalized layer under any of the four: the bias feeding a batch norm has a
    gradient of rounding noise only, and their updates turn its last-bit differences between the stacked
    and the solo arithmetic into differences of the order of the learning rate."""
    group = [{"n_layers": 1, "units": 24, "batch_norm": "before_activation", "activation": act,
              "lr_schedule": schedule, "weight_init": init, "optimizer": optimizer,
              "learning_rate": LEARNING_RATES[optimizer]}
             for act, schedule, init in (("tanh", "step", "glorot_uniform"), ("silu", "cosine", "he_normal"),
                                         ("sigmoid", "plateau", "he_uniform"), ("relu", "constant", "he_normal"))]
    results = fused(group, patience=None)
    for i, params in enumerate(group):
        assert_same_run(results[i], solo(params, 100 + i, patience=None))


@pytest.mark.parametrize("optimizer", list(LEARNING_RATES))
def test_each_member_follows_its_solo_curve(optimizer: str) -> None:
    group = [{**v, "optimizer": optimizer, "learning_rate": LEARNING_RATES[optimizer], "momentum": 0.8}
             for v in VARIANTS]
    group[0].update(ILL_CONDITIONED.get(optimizer, {}))
    results = fused(group, patience=None)
    for i, params in enumerate(group):
        want = solo(params, 100 + i, patience=None)
        assert_same_run(results[i], want)
    assert results[0].history[-1].learning_rate < results[0].history[0].learning_rate  # the step schedule acted


def test_mixed_optimizers_inits_and_sigmoid_in_one_group() -> None:
    group = [
        {"optimizer": "adam", "learning_rate": 0.01, "weight_init": "normal", "activation": "sigmoid",
         "units": 40},
        {"optimizer": "sgd", "learning_rate": 0.1, "weight_init": "glorot_normal", "n_layers": 4, "units": 8},
        {"optimizer": "rmsprop", "learning_rate": 0.001, "units": 16},
        {"optimizer": "momentum", "learning_rate": 0.01, "batch_norm": "before_activation", "units": 12},
        {"optimizer": "nesterov", "learning_rate": 0.05, "momentum": 0.9, "batch_norm": "after_activation",
         "activation": "sigmoid", "n_layers": 1, "units": 64},
        {"optimizer": "adamw", "learning_rate": 0.003, "weight_decay": 0.1, "n_layers": 3, "units": 20},
    ]
    results = fused(group, patience=2)
    for i, params in enumerate(group):
        assert_same_run(results[i], solo(params, 100 + i, patience=2))


def test_each_members_schedule_decides_as_its_solo_scheduler() -> None:
    """Per-member plateau, step and cosine, fed each member's own validation losses (plateau fires for one)."""
    group = [{"lr_schedule": "plateau", "learning_rate": 0.1}, {"lr_schedule": "plateau", "learning_rate": 0.2},
             {"lr_schedule": "step", "learning_rate": 0.3}, {"lr_schedule": "cosine", "learning_rate": 0.4}]
    losses = [[1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
              [1.0] * 8, [1.0] * 8]
    fused_rates = MemberSchedules(group, epochs=8)
    solo_rates = []
    for params, member_losses in zip(group, losses, strict=True):
        opt = make_optimizer({"optimizer": "sgd", **params}, nn.Linear(2, 2))
        sched = make_scheduler(params, opt, epochs=8)
        rates = []
        for loss in member_losses:
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            step_scheduler(sched, loss)
        solo_rates.append(rates)
    got: list[list[float]] = [[] for _ in group]
    for epoch in range(8):
        for member, rate in enumerate(fused_rates.rates()):
            got[member].append(rate)
        fused_rates.step([member_losses[epoch] for member_losses in losses])
    assert got == solo_rates
    assert got[0][-1] < 0.1 and got[1][-1] == 0.2  # the plateau fired for the first member only


def test_regression_members_follow_their_solo_curves() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = x @ torch.randn(5, 2, generator=g) + 0.1 * torch.randn(200, 2, generator=g)
    data = TrainData(x[:150], y[:150], x[150:], y[150:], "regression")
    mean, std = standardization(x[:150].numpy(), False)

    def reg(p: dict[str, Any]) -> ModelSpec:
        return ModelSpec("mlp", {"batch_size": 16, **p}, "regression", (5,), 2, None, None, mean.tolist(),
                         std.tolist())

    group = [{"optimizer": "adam", "learning_rate": 0.01, "units": 8},
             {"optimizer": "momentum", "learning_rate": 0.01, "units": 16, "n_layers": 1}]
    results = train_group([Member(i, reg(p), 7 + i) for i, p in enumerate(group)], data, epochs=3,
                          objective="val_mse", direction="minimize")
    for i, p in enumerate(group):
        torch.manual_seed(7 + i)
        want = train(build_module(reg(p)), data, reg(p).params, epochs=3, objective="val_mse",
                     direction="minimize", seed=7 + i)
        got = results[i]
        np.testing.assert_allclose([(r.train_loss, r.val_loss, r.metrics["val_mae"]) for r in got.history],
                                   [(r.train_loss, r.val_loss, r.metrics["val_mae"]) for r in want.history],
                                   rtol=RTOL)


@pytest.mark.parametrize(("n_train", "batch_size"), [(289, 32), (301, 50), (300, 7)],
                         ids=["lone-last-row-32", "lone-last-row-50", "batch-7"])
def test_members_take_the_solo_batches_at_any_batch_size_and_row_count(n_train: int, batch_size: int) -> None:
    """Every row in one batch per epoch, as the solo loop cuts them: a lone last row joins the batch before."""
    data = digits(n_train, 60)
    group = [{**v, "batch_size": batch_size, "optimizer": "momentum", "learning_rate": 0.03} for v in VARIANTS]
    results = fused(group, data, epochs=2, patience=None)
    for i, params in enumerate(group):
        assert_same_run(results[i], solo(params, 100 + i, data, epochs=2, patience=None))


def test_a_batch_size_one_group_trains_each_member_as_its_solo_trial() -> None:
    """Batch size 1: every batch is a lone row, normalized by the running statistics as in the solo loop."""
    data = digits(40, 30)
    group = [{"batch_size": 1, "optimizer": "sgd", "learning_rate": 0.02, "units": 8, "n_layers": 1,
              "batch_norm": placement} for placement in ("before_activation", "after_activation", "none")]
    results = fused(group, data, epochs=2, patience=None)
    for i, params in enumerate(group):
        want = solo(params, 100 + i, data, epochs=2, patience=None)
        torch.manual_seed(100 + i)
        initial = build_module(spec(params)).state_dict()
        assert any(not torch.equal(t, initial[name]) for name, t in want.best_state.items())  # it trained
        assert_same_run(results[i], want)


def test_augmented_members_follow_their_solo_curves() -> None:
    """Each augmenting member draws its shifts, rotations and noise from its own generator, as its solo trial;
    a member that does not augment draws nothing and is unchanged by its neighbours' augmentation."""
    group = [{**v, "optimizer": "sgd", "learning_rate": 0.1, "augmentation": aug}
             for v, aug in zip(VARIANTS, ("light", "none", "light"), strict=True)]
    results = fused(group, epochs=3, patience=None)
    for i, params in enumerate(group):
        assert_same_run(results[i], solo(params, 100 + i, epochs=3, patience=None))


# ---- ending one member ---------------------------------------------------------------------------------


class StopAt:
    """Stops member `key` after epoch `epoch`; records every ended member."""

    def __init__(self, key: Hashable, epoch: int) -> None:
        self.key, self.epoch = key, epoch
        self.ended: list[Hashable] = []

    def on_epoch_end(self, key: Hashable, report: EpochReport) -> bool:
        return key == self.key and report.epoch >= self.epoch

    def on_member_end(self, key: Hashable, result: TrainResult) -> None:
        self.ended.append(key)


GROUP3 = [{"optimizer": "adam", "learning_rate": 0.01, "units": 16},
          {"optimizer": "momentum", "learning_rate": 0.05, "units": 48, "n_layers": 3},
          {"optimizer": "sgd", "learning_rate": 0.1, "units": 8, "batch_norm": "before_activation"}]


def test_stopping_one_member_leaves_the_others_unchanged() -> None:
    full = fused(GROUP3, patience=None)
    stopper = StopAt(1, 2)
    cut = fused(GROUP3, patience=None, callbacks=[stopper])
    assert (cut[1].stop_reason, cut[1].epochs_run) == ("stopped", 2)
    assert stopper.ended[0] == 1 and sorted(stopper.ended) == [0, 1, 2]
    np.testing.assert_allclose(curve(cut[1].history), curve(full[1].history)[:2], rtol=RTOL)
    for i in (0, 2):
        assert_same_run(cut[i], full[i])


def test_a_stop_signal_ends_a_member_mid_epoch_without_counting_that_epoch() -> None:
    polls = 0

    def signal() -> set[Hashable]:
        nonlocal polls
        polls += 1
        return {0} if polls > 12 else set()  # 10 batches per epoch: in the second epoch

    results = fused(GROUP3, epochs=3, patience=None, stop_signal=signal)
    assert (results[0].stop_reason, results[0].epochs_run, len(results[0].history)) == ("stopped", 1, 1)
    for i in (1, 2):
        assert_same_run(results[i], solo(GROUP3[i], 100 + i, epochs=3, patience=None))


def test_a_diverging_member_fails_alone() -> None:
    group = [{"optimizer": "sgd", "learning_rate": 1e6, "weight_init": "normal"}, *GROUP3[:2]]
    results = fused(group, epochs=3, patience=None)
    want = solo(group[0], 100, epochs=3, patience=None)
    assert want.stop_reason == results[0].stop_reason == "non_finite_loss"
    assert results[0].epochs_run == want.epochs_run
    for i in (1, 2):
        assert_same_run(results[i], solo(group[i], 100 + i, epochs=3, patience=None))


# ---- dropout -------------------------------------------------------------------------------------------


@pytest.mark.float32
def test_dropout_keeps_each_members_own_fraction_with_independent_masks() -> None:
    rates = [0.0, 0.2, 0.5, 0.5]
    model = FusedMLP([spec({"n_layers": 1, "units": 256, "activation": "sigmoid", "dropout": p}) for p in rates],
                     [1, 2, 3, 4]).train()
    torch.manual_seed(0)
    z = torch.randn(len(rates), 2000, 256)
    out = model._block(0, z)
    kept = out != 0  # sigmoid is never 0: a zero is a dropped unit
    fractions = kept.float().mean(dim=(1, 2))
    torch.testing.assert_close(fractions, torch.tensor([1 - p for p in rates]), rtol=0, atol=0.01)
    same = (kept[2] == kept[3]).float().mean()  # independent masks at 0.5 agree half the time
    assert abs(float(same) - 0.5) < 0.01
    scale = out[1][kept[1]] / torch.sigmoid(z[1])[kept[1]]  # kept units scaled by 1/keep, as nn.Dropout
    torch.testing.assert_close(scale, torch.full_like(scale, 1 / 0.8))
    model.eval()
    torch.testing.assert_close(model._block(0, z), torch.sigmoid(z))  # no dropout in evaluation


def test_dropout_members_still_learn() -> None:
    group = [{"optimizer": "adam", "learning_rate": 0.01, "units": 64, "dropout": p} for p in (0.1, 0.5)]
    results = fused(group, epochs=3, patience=None)
    for r in results.values():
        assert r.history[-1].train_loss < r.history[0].train_loss
        assert r.best_metrics["val_accuracy"] > 0.5


def test_members_alike_at_a_layer_run_as_one_slice_there() -> None:
    # Each slice costs its own batch norm, activation and dropout (a GPU launch each): members of one
    # placement and activation that have a layer share one slice at it, whatever their depths.
    kinds = [("none", "relu"), ("before_activation", "tanh"), ("after_activation", "relu")]
    params = [{"units": 16, "n_layers": depth, "batch_norm": bn, "activation": act}
              for depth in (1, 2, 3) for bn, act in kinds for _ in range(2)]
    specs = [spec(p) for p in np.random.default_rng(0).permutation(params)]
    model = FusedMLP([specs[i] for i in fusion_order(specs)], list(range(len(specs))))
    for i, slices in enumerate(model.segments):
        live = [(placement, act) for _, _, (lv, placement, act) in slices if lv]
        assert sorted(live) == sorted(kinds), (i, slices)  # one slice per kind, not one per kind and depth
        assert sum(not lv for _, _, (lv, _, _) in slices) == (0 if i == 0 else len(kinds)), (i, slices)
    out = model(torch.stack([split().x_train[:16]] * len(specs)))
    for slot in range(len(specs)):
        torch.testing.assert_close(out[slot], model.member_module(slot).train()(split().x_train[:16]),
                                   rtol=1e-5, atol=1e-5)


# ---- weights out -----------------------------------------------------------------------------------------


def test_padding_never_changes_an_output_or_learns() -> None:
    group = [spec({"units": 8, "n_layers": 1, "activation": "sigmoid", "batch_norm": "after_activation"}),
             spec({"units": 32, "n_layers": 3})]
    model = FusedMLP(group, [5, 6])
    x = split().x_train[:64]
    out = model(torch.stack([x, x]))
    out.sum().backward()
    assert model.weight[0].grad is not None
    assert float(model.weight[0].grad[0, :, 8:].abs().sum()) == 0.0  # padded units of member 0
    assert float(model.weight[1].grad[0].abs().sum()) == 0.0  # a layer member 0 does not have
    assert float(model.head_weight.grad[0, 8:].abs().sum()) == 0.0
    for slot in range(len(group)):
        module = model.member_module(slot).train()
        torch.testing.assert_close(out[slot], module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.float32
def test_saved_member_loads_as_an_ordinary_trial(tmp_path: Path) -> None:
    from tests.integration.test_export import _plain_loader

    group = [{"optimizer": "adam", "learning_rate": 0.01, "units": 16, "batch_norm": "before_activation",
              "dropout": 0.2},
             {"optimizer": "sgd", "learning_rate": 0.1, "units": 40, "n_layers": 3, "layer_shape": "funnel"}]
    results = fused(group, epochs=3)
    x = split().x_val
    for i, p in enumerate(group):
        module = build_module(spec(p))
        module.load_state_dict(results[i].best_state)  # the solo layout, key for key
        stem = tmp_path / f"trial-{i}"
        save_trial(stem, results[i].best_state, spec(p), metrics={}, layers=describe_layers(module))
        served = NetPredictor.load(stem, spec(p)).predict(x.numpy())
        folder = tmp_path / f"export-{i}"
        folder.mkdir()
        stem.with_suffix(".safetensors").rename(folder / "model.safetensors")
        stem.with_suffix(".json").rename(folder / "config.json")
        plain, _ = _plain_loader()["load"](str(folder))
        with torch.no_grad():
            np.testing.assert_allclose(plain(x).double().softmax(1).numpy(), served, rtol=1e-6, atol=1e-7)
        accuracy = float((served.argmax(1) == split().y_val.numpy()).mean())
        assert accuracy == pytest.approx(results[i].best_metrics["val_accuracy"])  # what the group measured


def test_fused_member_predicts_what_its_solo_module_predicts() -> None:
    group = [spec({"units": 16, "batch_norm": "after_activation", "activation": "tanh"}),
             spec({"units": 40, "n_layers": 1, "weight_init": "normal"})]
    model = FusedMLP(group, [3, 4]).eval()
    for slot, (s, seed) in enumerate(zip(group, [3, 4], strict=True)):
        torch.manual_seed(seed)
        torch.testing.assert_close(model.member_module(slot).state_dict(), build_module(s).state_dict())
    with torch.no_grad():
        out = model(split().x_val)
        for slot in range(2):
            torch.testing.assert_close(out[slot], model.member_module(slot)(split().x_val), rtol=1e-5, atol=1e-5)


# ---- what runs solo ------------------------------------------------------------------------------------


def test_can_fuse_says_why_not() -> None:
    assert can_fuse([spec({}), spec({"units": 7})]) == (True, "")
    cnn = ModelSpec("cnn", {}, "classification", (1, 8, 8), 10, None, None, [0.0], [1.0])
    branches = ModelSpec("mlp", {"branch_merge": "add"}, "classification", (4,), 2, [[0, 1], [2, 3]], None)
    for specs, word in (([spec({}), cnn], "CNN"), ([branches], "branch"),
                        ([spec({}), spec({"batch_size": 64})], "batch_size")):
        ok, reason = can_fuse(specs)
        assert not ok and word in reason
    with pytest.raises(ValueError, match="batch_size"):
        FusedMLP([spec({}), spec({"batch_size": 64})], [0, 1])


def test_plan_groups_splits_by_batch_size_and_padding_waste() -> None:
    specs = [spec({"units": 32}), spec({"units": 34}), spec({"units": 512, "n_layers": 4}), spec({"units": 33}),
             spec({"units": 32, "batch_size": 64}), spec({"units": 500, "n_layers": 4})]
    groups = plan_groups(specs, max_members=8, step_overhead=0)  # arithmetic alone
    assert sorted(i for g in groups for i in g) == list(range(len(specs)))
    assert sorted(map(sorted, groups)) == [[0, 1, 3], [2, 5], [4]]
    assert all(len(g) <= 2 for g in plan_groups(specs, max_members=2))


def test_a_cpu_group_pads_no_more_than_the_step_overheads_it_saves() -> None:
    """On a CPU padding costs its full arithmetic (measured slower fused): a group there may cost at most what
    its members would alone, step overheads counted; elsewhere it may pad up to MAX_WASTE more."""
    from workers.fused.partition import STEP_OVERHEAD, own_cost, padded_cost

    rng = np.random.default_rng(0)
    specs = [spec({"units": int(np.exp(rng.uniform(np.log(32), np.log(512)))), "n_layers": int(rng.integers(1, 5)),
                   "batch_size": 128}) for _ in range(24)]  # the documented space's sizes
    overhead = STEP_OVERHEAD / 128
    cpu = plan_groups(specs, max_members=8, max_waste=max_waste("cpu"))
    for group in cpu:
        members = [specs[i] for i in group]
        assert padded_cost(members) + overhead <= sum(own_cost(m) + overhead for m in members)
    gpu = plan_groups(specs, max_members=8, max_waste=max_waste("cuda:0"))
    assert len(gpu) < len(cpu)  # the same trials in fewer, more padded groups
    assert sorted(i for g in cpu for i in g) == sorted(i for g in gpu for i in g) == list(range(24))


def test_plan_groups_fuses_small_networks_whose_step_overhead_outweighs_padding() -> None:
    # Padded 32 -> 96 units is 3x the arithmetic of the narrow members, but tiny networks cost mostly the
    # fixed cost of a step, which a group pays once: they fuse; counting arithmetic alone splits them.
    specs = [spec({"units": 32, "n_layers": 1}), spec({"units": 96, "n_layers": 1}), spec({"units": 40})]
    assert sorted(map(sorted, plan_groups(specs, max_members=8))) == [[0, 1, 2]]
    assert len(plan_groups(specs, max_members=8, step_overhead=0)) > 1
    huge = [spec({"units": 32, "n_layers": 1, "batch_size": 128}),
            spec({"units": 512, "n_layers": 4, "batch_size": 128})]
    assert len(plan_groups(huge, max_members=8)) == 2  # 512-wide padding outweighs any overhead


class _KeepStates:
    """A member's checkpoint hook that keeps the state of every epoch boundary."""

    def __init__(self) -> None:
        self.states: dict[int, Any] = {}
        self.waited = False

    def on_epoch_state(self, report: EpochReport, state: Any) -> None:
        self.states[report.epoch] = state()

    def wait(self) -> None:
        self.waited = True


def test_a_members_checkpoint_continues_it_alone_as_the_group_would_have(tmp_path: Path) -> None:
    """Each member's state at epoch 3, written to a file and read back against its solo network, continues in
    the solo loop exactly as the uninterrupted group trained it: every optimizer's buffers and step count,
    schedules, batch-norm statistics, best weights and the early-stopping counter carry over."""
    from workers.checkpoints import read_checkpoint, write_checkpoint

    group = [
        {"optimizer": "adam", "learning_rate": 0.01, "weight_init": "normal", "activation": "sigmoid", "units": 40,
         "lr_schedule": "step"},
        {"optimizer": "sgd", "learning_rate": 0.1, "weight_init": "glorot_normal", "n_layers": 4, "units": 8},
        {"optimizer": "rmsprop", "learning_rate": 0.001, "units": 16, "lr_schedule": "plateau"},
        {"optimizer": "momentum", "learning_rate": 0.01, "batch_norm": "before_activation", "units": 12},
        {"optimizer": "nesterov", "learning_rate": 0.05, "momentum": 0.9, "batch_norm": "after_activation",
         "activation": "sigmoid", "n_layers": 1, "units": 64, "lr_schedule": "cosine"},
        {"optimizer": "adamw", "learning_rate": 0.003, "weight_decay": 0.1, "n_layers": 3, "units": 20},
        {"optimizer": "adagrad", "learning_rate": 0.05, "units": 24, "batch_norm": "none"},
    ]
    hooks = {i: _KeepStates() for i in range(len(group))}
    results = fused(group, patience=3, checkpoints=hooks)
    assert all(h.waited for h in hooks.values())  # each member's last write is finished before its end
    for i, params in enumerate(group):
        path = write_checkpoint(tmp_path / str(i), hooks[i].states[3]).path
        torch.manual_seed(100 + i)  # the runner builds the network under the trial's seed, then loads
        module = build_module(spec(params))
        resumed = train(module, split(), spec(params).params, epochs=EPOCHS, objective="val_accuracy",
                        direction="maximize", patience=3, seed=100 + i,
                        resume_from=read_checkpoint(path, module=module))
        assert_same_run(resumed, results[i])
