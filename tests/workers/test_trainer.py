"""The epoch loop: optimizers, schedules, early stopping, divergence, callbacks, seeding, augmentation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from app.ml.networks import build_model
from workers.trainer import (
    EpochReport,
    TrainData,
    augment,
    cpu_state,
    evaluate,
    make_optimizer,
    make_scheduler,
    step_scheduler,
    train,
)
from workers.training_rules import batch_bounds, one_sample_batch_norm


def blobs(n: int = 240, n_features: int = 4, n_classes: int = 3, seed: int = 0,
          sep: float = 4.0) -> TrainData:
    """Well separated Gaussian blobs on an arbitrary scale; 75% train, 25% validation."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    centers = torch.randn(n_classes, n_features, generator=g) * sep
    x = (centers[y] + torch.randn(n, n_features, generator=g)) * 10 + 50
    cut = n * 3 // 4
    return TrainData(x[:cut], y[:cut], x[cut:], y[cut:], task="classification", image=False)


def noise_labels(n: int = 120, n_features: int = 10, seed: int = 0) -> TrainData:
    """Random labels: a model can only memorize, so validation loss rises and early stopping fires."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_features, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return TrainData(x[:80], y[:80], x[80:], y[80:], task="classification", image=False)


def images(n: int = 96, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 16
    y = (x[:, 0, :4].mean(dim=(1, 2)) > x[:, 0, 4:].mean(dim=(1, 2))).long()
    return TrainData(x[:64], y[:64], x[64:], y[64:], task="classification", image=True)


def model_for(data: TrainData, params: dict[str, Any] | None = None, model: str = "mlp",
              n_outputs: int | None = None, seed: int = 0) -> nn.Module:
    x = data.x_train.numpy()
    if n_outputs is None:
        n_outputs = int(data.y_train.max()) + 1 if data.task == "classification" else 1
    torch.manual_seed(seed)
    return build_model(params or {"n_layers": 1, "units": 16}, model=model, input_shape=tuple(x.shape[1:]),
                       n_outputs=n_outputs, mean=x.mean(0), std=x.std(0))


def lrs(history: list[EpochReport]) -> list[float]:
    return [r.learning_rate for r in history]


# ---- optimizers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [
    ("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD), ("nesterov", torch.optim.SGD),
    ("adagrad", torch.optim.Adagrad), ("rmsprop", torch.optim.RMSprop), ("adam", torch.optim.Adam),
    ("adamw", torch.optim.AdamW),
])
def test_optimizer_class_lr_and_weight_decay(name: str, cls: type) -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = make_optimizer({"optimizer": name, "learning_rate": 0.0123, "weight_decay": 3e-4, "momentum": 0.7},
                         module)
    assert type(opt) is cls
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.0123)
    assert group["weight_decay"] == pytest.approx(3e-4)
    assert len(group["params"]) == len(list(module.parameters()))  # decay reaches biases and BN too
    if name == "sgd":
        assert group["momentum"] == 0 and group["nesterov"] is False
    if name == "momentum":
        assert group["momentum"] == pytest.approx(0.7) and group["nesterov"] is False
    if name == "nesterov":
        assert group["momentum"] == pytest.approx(0.7) and group["nesterov"] is True


def test_momentum_defaults_and_unknown_optimizer() -> None:
    module = nn.Linear(2, 2)
    assert make_optimizer({"optimizer": "momentum"}, module).param_groups[0]["momentum"] == pytest.approx(0.9)
    assert make_optimizer({"optimizer": "adamw"}, module).param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError):
        make_optimizer({"optimizer": "lbfgs"}, module)


# ---- learning-rate schedules ------------------------------------------------------------------------


def test_constant_schedule_is_none_and_keeps_lr() -> None:
    data = blobs(n=64)
    result = train(model_for(data), data, {"learning_rate": 0.01, "lr_schedule": "constant"}, epochs=3,
                   objective="val_accuracy", direction="maximize", patience=None)
    assert lrs(result.history) == [0.01] * 3
    assert make_scheduler({}, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0), epochs=3) is None


def test_step_schedule_halves_every_five_epochs() -> None:
    data = blobs(n=64)
    result = train(model_for(data), data, {"optimizer": "sgd", "learning_rate": 0.04, "lr_schedule": "step"},
                   epochs=11, objective="val_loss", direction="minimize", patience=None)
    assert lrs(result.history) == pytest.approx([0.04] * 5 + [0.02] * 5 + [0.01])


def test_cosine_schedule_decreases_to_near_zero() -> None:
    data = blobs(n=64)
    result = train(model_for(data), data, {"learning_rate": 0.1, "lr_schedule": "cosine"}, epochs=6,
                   objective="val_loss", direction="minimize", patience=None)
    rates = lrs(result.history)
    assert rates[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] < 0.01


def test_plateau_schedule_halves_after_stagnant_val_loss() -> None:
    data = blobs(n=64)
    # A tiny SGD step leaves the validation loss flat, which is what ReduceLROnPlateau watches (its eps
    # ignores reductions smaller than 1e-8, so the rate stays well above that).
    params = {"optimizer": "sgd", "learning_rate": 1e-5, "lr_schedule": "plateau"}
    result = train(model_for(data), data, params, epochs=6, objective="val_loss", direction="minimize",
                   patience=None)
    assert lrs(result.history) == pytest.approx([1e-5] * 4 + [5e-6] * 2)


def test_plateau_keeps_lr_while_val_loss_improves() -> None:
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = make_scheduler({"lr_schedule": "plateau"}, opt, epochs=10)
    for loss in (1.0, 0.9, 0.8, 0.7, 0.6):
        step_scheduler(scheduler, loss)
    assert opt.param_groups[0]["lr"] == 1.0
    for loss in (0.6, 0.6, 0.6):
        step_scheduler(scheduler, loss)
    assert opt.param_groups[0]["lr"] == 0.5


# ---- learning and early stopping --------------------------------------------------------------------


def test_learns_a_separable_problem() -> None:
    data = blobs()
    result = train(model_for(data), data, {"optimizer": "adam", "learning_rate": 0.01, "batch_size": 32},
                   epochs=8, objective="val_accuracy", direction="maximize", patience=None)
    assert result.stop_reason == "completed" and result.epochs_run == 8 and len(result.history) == 8
    assert result.best_metrics["val_accuracy"] >= 0.95
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert set(result.history[0].metrics) == {"val_accuracy", "val_loss"}


def test_early_stopping_restores_the_best_epoch() -> None:
    data = noise_labels()
    module = model_for(data, {"n_layers": 2, "units": 64})
    snapshots: dict[int, dict[str, Tensor]] = {}

    class Snapshot:
        def on_epoch_end(self, report: EpochReport) -> bool:
            snapshots[report.epoch] = cpu_state(module)
            return False

    result = train(module, data, {"optimizer": "adam", "learning_rate": 0.02, "batch_size": 16}, epochs=40,
                   objective="val_loss", direction="minimize", patience=3, callbacks=[Snapshot()])
    assert result.stop_reason == "early_stopping"
    assert result.epochs_run == result.best_epoch + 3 < 40
    losses = [r.val_loss for r in result.history]
    assert result.best_epoch == 1 + int(np.argmin(losses))
    assert result.best_metrics == result.history[result.best_epoch - 1].metrics
    fresh = evaluate(module, data.x_val, data.y_val, data.task)
    assert {f"val_{k}": v for k, v in fresh.items()} == pytest.approx(result.best_metrics, rel=1e-6)
    state = module.state_dict()
    for key, value in snapshots[result.best_epoch].items():
        assert torch.equal(state[key], value)
        assert torch.equal(result.best_state[key], value)
    last = snapshots[result.epochs_run]
    assert any(not torch.equal(state[k], last[k]) for k in state)


def test_maximize_objective_tracks_the_highest_value() -> None:
    data = noise_labels(seed=3)
    result = train(model_for(data), data, {"learning_rate": 0.05, "batch_size": 16}, epochs=6,
                   objective="val_accuracy", direction="maximize", patience=None)
    accs = [r.metrics["val_accuracy"] for r in result.history]
    assert result.best_metrics["val_accuracy"] == max(accs)
    assert result.best_epoch == 1 + accs.index(max(accs))


@pytest.mark.parametrize("objective,direction", [("val_accuracy", "maximize"), ("val_loss", "minimize")])
def test_a_tie_is_no_improvement(objective: str, direction: str) -> None:
    data = blobs(n=64)
    # A zero learning rate keeps every epoch's metrics equal: the first epoch stays the best.
    result = train(model_for(data), data, {"optimizer": "sgd", "learning_rate": 0.0}, epochs=10,
                   objective=objective, direction=direction, patience=2)
    assert result.best_epoch == 1
    assert result.stop_reason == "early_stopping" and result.epochs_run == 3


def test_huge_learning_rate_with_normal_init_is_non_finite() -> None:
    data = blobs(n=64)
    module = model_for(data, {"n_layers": 3, "units": 64, "weight_init": "normal"})
    initial = cpu_state(module)
    result = train(module, data, {"optimizer": "sgd", "learning_rate": 1e12}, epochs=5,
                   objective="val_accuracy", direction="maximize")
    assert result.stop_reason == "non_finite_loss"
    assert result.epochs_run < 5
    assert len(result.history) == result.epochs_run - 1  # the diverging epoch is not reported
    assert all(np.isfinite(r.train_loss) for r in result.history)
    if result.best_epoch == 0:
        assert result.best_metrics == {}
        assert all(torch.equal(initial[k], v) for k, v in module.state_dict().items())
    assert all(torch.isfinite(v.float()).all() for v in module.state_dict().values())


def test_callback_returning_true_stops_after_that_epoch() -> None:
    data = blobs(n=64)
    seen: list[tuple[str, int]] = []

    class Stopper:
        def on_epoch_end(self, report: EpochReport) -> bool:
            seen.append(("stop", report.epoch))
            return report.epoch == 2

    class Recorder:
        def on_epoch_end(self, report: EpochReport) -> bool:
            seen.append(("record", report.epoch))
            return False

    result = train(model_for(data), data, {}, epochs=10, objective="val_accuracy", direction="maximize",
                   patience=None, callbacks=[Stopper(), Recorder()])
    assert result.stop_reason == "stopped"
    assert result.epochs_run == 2 and [r.epoch for r in result.history] == [1, 2]
    assert seen == [("stop", 1), ("record", 1), ("stop", 2), ("record", 2)]


def comparable(history: list[EpochReport]) -> list[tuple[Any, ...]]:
    return [(r.epoch, r.train_loss, r.val_loss, r.metrics, r.learning_rate) for r in history]


def test_same_seed_gives_identical_history() -> None:
    data = blobs(n=96)
    params = {"n_layers": 2, "units": 16, "dropout": 0.3, "batch_norm": "before_activation", "batch_size": 16}
    runs = []
    for i, seed in enumerate((7, 7, 8)):
        module = model_for(data, params)
        torch.manual_seed(100 + i)  # train must seed dropout itself, whatever the global state
        runs.append(train(module, data, params, epochs=3, objective="val_loss", direction="minimize",
                          seed=seed))
    assert comparable(runs[0].history) == comparable(runs[1].history)
    assert comparable(runs[0].history) != comparable(runs[2].history)
    assert all(torch.equal(runs[0].best_state[k], runs[1].best_state[k]) for k in runs[0].best_state)


def test_batch_norm_survives_a_last_batch_of_one() -> None:
    data = blobs(n=88)
    data.x_train, data.y_train = data.x_train[:65], data.y_train[:65]  # batches of 64 and 1
    params = {"batch_norm": "before_activation", "batch_size": 64}
    result = train(model_for(data, params), data, params, epochs=2, objective="val_loss",
                   direction="minimize")
    assert result.epochs_run == 2


# ---- augmentation -----------------------------------------------------------------------------------


class InputRecorder(nn.Module):
    """Wraps a model and keeps the inputs it saw in training and in evaluation mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.train_inputs: list[Tensor] = []
        self.eval_inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        (self.train_inputs if self.training else self.eval_inputs).append(x.detach().clone())
        return self.inner(x)


def recorded_run(augmentation: str, image: bool = True) -> tuple[InputRecorder, TrainData]:
    data = images()
    data.image = image
    recorder = InputRecorder(model_for(data, {"n_layers": 1, "filters": 4, "units": 8}, model="cnn"))
    train(recorder, data, {"augmentation": augmentation, "batch_size": 32}, epochs=2, objective="val_loss",
          direction="minimize", patience=None)
    return recorder, data


def rows_are_training_rows(batches: list[Tensor], x_train: Tensor) -> bool:
    flat = x_train.flatten(1)
    return all((b.flatten(1)[:, None, :] == flat[None]).all(dim=2).any(dim=1).all() for b in batches)


def test_light_augmentation_changes_training_batches_only() -> None:
    recorder, data = recorded_run("light")
    assert len(recorder.train_inputs) == 4
    assert not any(rows_are_training_rows([b], data.x_train) for b in recorder.train_inputs)
    assert recorder.train_inputs[0].shape == (32, 1, 8, 8)
    assert all(torch.equal(b, data.x_val) for b in recorder.eval_inputs)
    assert len(recorder.eval_inputs) == 2


@pytest.mark.parametrize("augmentation,image", [("none", True), ("light", False)])
def test_no_augmentation_without_light_or_images(augmentation: str, image: bool) -> None:
    recorder, data = recorded_run(augmentation, image=image)
    assert rows_are_training_rows(recorder.train_inputs, data.x_train)


def test_augment_is_small_and_seeded() -> None:
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    a = augment(x, torch.Generator().manual_seed(1), noise_std=0.05)
    b = augment(x, torch.Generator().manual_seed(1), noise_std=0.05)
    assert torch.equal(a, b)
    assert a.shape == x.shape
    mass = a.clamp(min=0.5).sub(0.5).clamp(max=0.5).sum(dim=(1, 2, 3)) * 2
    assert torch.all(mass > 40) and torch.all(mass < 90)  # the 64-pixel square moved, not destroyed
    assert not torch.equal(a[0], a[1])
    noise_only = augment(torch.zeros(4, 1, 8, 8), torch.Generator().manual_seed(0), noise_std=0.05)
    assert noise_only.std().item() == pytest.approx(0.05, rel=0.2)


# ---- regression, evaluation and arguments -----------------------------------------------------------


def regression(k: int | None = None, n: int = 128) -> TrainData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    w = torch.randn(5, k or 1, generator=g)
    y = x @ w + 0.01 * torch.randn(n, k or 1, generator=g)
    if k is None:
        y = y[:, 0]
    return TrainData(x[:96], y[:96], x[96:], y[96:], task="regression", image=False)


@pytest.mark.parametrize("k", [None, 2])
def test_regression_reports_mse_and_mae(k: int | None) -> None:
    data = regression(k)
    module = model_for(data, n_outputs=k or 1)
    result = train(module, data, {"learning_rate": 0.01, "batch_size": 16}, epochs=3, objective="val_mse",
                   direction="minimize")
    for report in result.history:
        assert set(report.metrics) == {"val_mse", "val_mae", "val_loss"}
        assert report.metrics["val_loss"] == report.metrics["val_mse"]
    assert result.history[-1].val_loss < result.history[0].val_loss
    with torch.no_grad():
        pred = module.eval()(data.x_val).reshape(data.y_val.shape)
    err = pred - data.y_val
    assert result.best_metrics["val_mse"] == pytest.approx(err.square().mean().item(), rel=1e-5)
    assert result.best_metrics["val_mae"] == pytest.approx(err.abs().mean().item(), rel=1e-5)


def test_evaluate_matches_a_direct_computation_in_any_batch_size() -> None:
    data = blobs(n=200)
    module = model_for(data, {"n_layers": 1, "units": 8, "dropout": 0.5})
    module.train()
    with torch.no_grad():
        logits = module.eval()(data.x_val)
    module.train()
    expected_acc = (logits.argmax(1) == data.y_val).float().mean().item()
    expected_loss = nn.functional.cross_entropy(logits, data.y_val).item()
    for batch_size in (7, 4096):
        got = evaluate(module, data.x_val, data.y_val, "classification", batch_size=batch_size)
        assert got == pytest.approx({"accuracy": expected_acc, "loss": expected_loss}, rel=1e-5)
    assert module.training  # evaluate puts the mode back


def test_bfloat16_autocast_trains() -> None:
    data = blobs(n=96)
    result = train(model_for(data), data, {"learning_rate": 0.01}, epochs=2, objective="val_accuracy",
                   direction="maximize", amp_dtype=torch.bfloat16)
    assert result.epochs_run == 2
    assert all(np.isfinite(r.train_loss) and np.isfinite(r.val_loss) for r in result.history)


def test_bad_arguments_are_rejected() -> None:
    data = blobs(n=64)
    module = model_for(data)
    with pytest.raises(ValueError):
        train(module, data, {}, epochs=1, objective="val_mse", direction="minimize")
    with pytest.raises(ValueError):
        train(module, data, {}, epochs=1, objective="val_loss", direction="down")
    with pytest.raises(ValueError):
        train(module, data, {}, epochs=0, objective="val_loss", direction="minimize")
    with pytest.raises(ValueError):
        train(module, data, {"lr_schedule": "exp"}, epochs=1, objective="val_loss", direction="minimize")


class RowCounter(nn.Module):
    """Wraps a model and counts the rows of each training batch it is given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_rows: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.batch_rows.append(int(x.shape[0]))
        return self.inner(x)


@pytest.mark.parametrize("batch_norm", ["before_activation", "after_activation", "none"])
def test_a_last_batch_of_one_joins_the_previous_batch(batch_norm: str) -> None:
    data = blobs(n=88)
    data.x_train, data.y_train = data.x_train[:65], data.y_train[:65]  # 64 + 1 rows
    params = {"batch_norm": batch_norm, "batch_size": 32}
    counter = RowCounter(model_for(data, params))
    result = train(counter, data, params, epochs=2, objective="val_loss", direction="minimize", patience=None)
    assert result.epochs_run == 2
    assert counter.batch_rows == [32, 33] * 2  # every row trains every epoch, no batch of one


@pytest.mark.parametrize(("model", "batch_norm"), [("mlp", "before_activation"), ("mlp", "after_activation"),
                                                   ("mlp", "none"), ("cnn", "before_activation")])
def test_batch_size_one_trains_with_or_without_batch_norm(model: str, batch_norm: str) -> None:
    data = images() if model == "cnn" else blobs(n=40)
    params = {"batch_norm": batch_norm, "batch_size": 1, "n_layers": 1, "units": 8, "filters": 4}
    counter = RowCounter(model_for(data, params, model=model))
    result = train(counter, data, params, epochs=2, objective="val_loss", direction="minimize", patience=None)
    assert result.stop_reason == "completed" and result.epochs_run == 2
    assert counter.batch_rows == [1] * (2 * data.x_train.shape[0])
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in result.history)


def test_one_sample_batch_norm_uses_the_same_normalization_in_training_and_evaluation() -> None:
    """With batch size 1, batch statistics are undefined: training normalizes the way evaluation does."""
    data = blobs(n=40)
    params = {"batch_norm": "before_activation", "batch_size": 1, "n_layers": 1, "units": 8,
              "learning_rate": 0.0}
    module = model_for(data, params)
    train(module, data, params, epochs=1, objective="val_loss", direction="minimize")
    module.train()
    with one_sample_batch_norm(module):
        training_out = module(data.x_train[:1])
    assert all(m.training for m in module.modules())  # training mode comes back after the batch
    module.eval()
    assert torch.equal(training_out, module(data.x_train[:1]))


@pytest.mark.parametrize(("n", "batch_size", "sizes"), [(65, 32, [32, 33]), (64, 32, [32, 32]),
                                                        (66, 32, [32, 32, 2]), (1, 32, [1]), (3, 1, [1, 1, 1]),
                                                        (2, 1, [1, 1]), (33, 32, [33])])
def test_batch_bounds_cover_every_row_once(n: int, batch_size: int, sizes: list[int]) -> None:
    bounds = batch_bounds(n, batch_size)
    assert [end - start for start, end in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
