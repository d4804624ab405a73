"""The epoch loop of one trial: a closed loop over device-resident tensors.

Reporting, pruning and checkpoints plug in as callbacks; early stopping on the validation objective and
restoring the best epoch's weights are built in. Epochs are numbered from 1; epoch 0 means the initial
weights. No DataLoader: each epoch permutes indices on the device and slices batches from the tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.loop_state import LoopState, capture_loop, restore_loop
from workers.training_rules import Progress, batch_bounds, one_sample_batch_norm

DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_MOMENTUM = 0.9
EVAL_BATCH_SIZE = 4096
STEP_SIZE, STEP_GAMMA = 5, 0.5  # "step": halve every 5 epochs
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 2
MAX_SHIFT_PX, MAX_SHIFT_FRACTION = 2.0, 0.1
MAX_ROTATION_DEG = 10.0
NOISE_FRACTION = 0.05

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


@dataclass
class TrainData:
    """Train and validation tensors, already on the target device."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    task: str  # "classification" (y int64 class ids) | "regression" (y float32, (N,) or (N, k))
    image: bool = False  # inputs are (C, H, W) images: augmentation applies


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_loss: float
    metrics: dict[str, float]  # val_* metrics of this epoch
    learning_rate: float  # the rate used during this epoch
    seconds: float


class Callback(Protocol):
    def on_epoch_end(self, report: EpochReport) -> bool:
        """Return True to stop training after this epoch."""
        ...


class CheckpointHook(Protocol):
    def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
        """At each epoch boundary, before the callbacks: `state()` snapshots the loop to continue it."""
        ...


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int  # 0 when no epoch finished with finite losses
    best_metrics: dict[str, float]  # val_* metrics of best_epoch; empty when best_epoch is 0
    best_state: dict[str, Tensor]  # CPU copies of the best epoch's state_dict
    stop_reason: str  # "completed" | "early_stopping" | "stopped" | "non_finite_loss"
    history: list[EpochReport] = field(default_factory=list)


# ---- optimizer and schedule --------------------------------------------------------------------------


def make_optimizer(params: dict[str, Any], module: nn.Module) -> torch.optim.Optimizer:
    """The update rule named by params["optimizer"]; weight_decay applies to every parameter."""
    name = params.get("optimizer", "adam")
    lr = float(params.get("learning_rate", DEFAULT_LEARNING_RATE))
    wd = float(params.get("weight_decay", 0.0))
    momentum = float(params.get("momentum", DEFAULT_MOMENTUM))
    weights = list(module.parameters())
    fast = _fast_update(name, weights)
    if name == "sgd":
        return torch.optim.SGD(weights, lr=lr, weight_decay=wd, **fast)
    if name == "momentum":
        return torch.optim.SGD(weights, lr=lr, momentum=momentum, weight_decay=wd, **fast)
    if name == "nesterov":  # torch refuses nesterov without momentum
        return torch.optim.SGD(weights, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=wd,
                               **fast)
    if name == "adagrad":
        return torch.optim.Adagrad(weights, lr=lr, weight_decay=wd, **fast)
    if name == "rmsprop":
        return torch.optim.RMSprop(weights, lr=lr, weight_decay=wd, **fast)
    if name == "adam":
        return torch.optim.Adam(weights, lr=lr, weight_decay=wd, **fast)
    if name == "adamw":
        return torch.optim.AdamW(weights, lr=lr, weight_decay=wd, **fast)
    raise ValueError(f"unknown optimizer {name!r}")


def _fast_update(name: str, weights: list[Tensor]) -> dict[str, bool]:
    """The quickest kernel torch offers for this update on the weights' device: the same arithmetic.

    Small models take many small steps, where the default per-tensor loop dominates: a fused Adam step
    halves the time of a batch-32 MNIST epoch on one CPU thread.
    """
    device = weights[0].device.type if weights else "cpu"
    if device not in ("cpu", "cuda") or not all(w.is_floating_point() for w in weights):
        return {}
    fused = {"sgd", "momentum", "nesterov", "adam", "adamw"} | ({"adagrad"} if device == "cpu" else set())
    return {"fused": True} if name in fused else {"foreach": True}


def make_scheduler(params: dict[str, Any], optimizer: torch.optim.Optimizer, *,
                   epochs: int) -> Scheduler | None:
    """The per-epoch learning-rate schedule; plateau steps on the validation loss."""
    name = params.get("lr_schedule", "constant")
    sched = torch.optim.lr_scheduler
    if name == "constant":
        return None
    if name == "step":
        return sched.StepLR(optimizer, step_size=STEP_SIZE, gamma=STEP_GAMMA)
    if name == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR,
                                       patience=PLATEAU_PATIENCE)
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    raise ValueError(f"unknown lr_schedule {name!r}")


def apply_changed(params: dict[str, Any], before: dict[str, Any], optimizer: torch.optim.Optimizer,
                  scheduler: Scheduler | None) -> None:
    """Carry hyperparameters changed since a checkpoint (PBT's explore) into the restored optimizer: the
    learning rate scales with its schedule, as the schedule had started from the new value; weight decay and
    momentum take their new values. Dropout needs nothing here: the network is built with the new rate."""
    old_lr, new_lr = before.get("learning_rate"), params.get("learning_rate")
    factor = float(new_lr) / float(old_lr) if old_lr and new_lr and old_lr != new_lr else 1.0
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
        if "weight_decay" in params:
            group["weight_decay"] = float(params["weight_decay"])
        if "momentum" in params and group.get("momentum"):
            group["momentum"] = float(params["momentum"])
    if factor != 1.0 and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


def step_scheduler(scheduler: Scheduler | None, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


# ---- losses and evaluation ---------------------------------------------------------------------------


def metric_names(task: str) -> tuple[str, ...]:
    """The val_* metrics `train` reports for a task; an objective must be one of them."""
    if task == "classification":
        return ("val_accuracy", "val_loss")
    if task == "regression":
        return ("val_mse", "val_mae", "val_loss")
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")


def _align(out: Tensor, y: Tensor) -> Tensor:
    """float32 outputs shaped like the regression targets: (N, 1) → (N,) for 1-d targets."""
    out = out.float()
    if y.ndim == 1 and out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    return out


def _loss(out: Tensor, y: Tensor, task: str, reduction: str = "mean") -> Tensor:
    if task == "classification":
        return F.cross_entropy(out.float(), y, reduction=reduction)
    return F.mse_loss(_align(out, y), y.float(), reduction=reduction)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def evaluate(module: nn.Module, x: Tensor, y: Tensor, task: str, *, batch_size: int = EVAL_BATCH_SIZE,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """accuracy/loss (classification) or mse/mae/loss (regression) over x, batched, in eval mode."""
    sums = split_sums(module, x, y, _batch_sums, batch_size=batch_size, amp_dtype=amp_dtype, task=task)
    return metrics_of(sums.tolist(), x.shape[0], y, task)


def split_sums(model: nn.Module, x: Tensor, y: Tensor, batch_sums: Callable[[Tensor, Tensor, str], Tensor], *,
               batch_size: int, amp_dtype: torch.dtype | None, task: str) -> Tensor:
    """The batch sums of a whole split added up in eval mode (the model's training mode is restored)."""
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    sums: Tensor | None = None
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            with _autocast(x.device, amp_dtype):
                out = model(x[start:start + batch_size])
            part = batch_sums(out, y[start:start + batch_size], task)
            sums = part if sums is None else sums + part
    model.train(was_training)
    assert sums is not None
    return sums


def metrics_of(total: list[float], n: int, y: Tensor, task: str) -> dict[str, float]:
    """Metrics from a split's (loss sum, correct count or abs-error sum) over its n rows."""
    if task == "classification":
        return {"accuracy": total[1] / n, "loss": total[0] / n}
    k = y[0].numel()
    mse, mae = total[0] / (n * k), total[1] / (n * k)
    return {"mse": mse, "mae": mae, "loss": mse}


def _batch_sums(out: Tensor, y: Tensor, task: str) -> Tensor:
    """(loss sum, correct count or abs-error sum) for one batch, kept on the device."""
    if task == "classification":
        loss = F.cross_entropy(out.float(), y, reduction="sum")
        second = (out.argmax(dim=1) == y).sum()
    else:
        err = _align(out, y) - y.float()
        loss, second = err.square().sum(), err.abs().sum()
    return torch.stack([loss.double(), second.double()])


# ---- augmentation ------------------------------------------------------------------------------------


def augment(x: Tensor, generator: torch.Generator, noise_std: float) -> Tensor:
    """Random small shifts and rotations (one batched affine warp) plus Gaussian noise, on x's device."""
    b, _, h, w = x.shape
    dev = x.device

    def uniform(scale: float) -> Tensor:
        return (torch.rand(b, generator=generator, device=dev) * 2 - 1) * scale

    angle = uniform(math.radians(MAX_ROTATION_DEG))
    # A shift of d pixels is 2d/size in grid_sample's [-1, 1] coordinates.
    tx = uniform(2 * min(MAX_SHIFT_PX, MAX_SHIFT_FRACTION * w) / w)
    ty = uniform(2 * min(MAX_SHIFT_PX, MAX_SHIFT_FRACTION * h) / h)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return warped + noise * noise_std


# ---- the loop ----------------------------------------------------------------------------------------


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the module's state_dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def train(module: nn.Module, data: TrainData, params: dict[str, Any], *, epochs: int, objective: str,
          direction: str, patience: int | None = 5, seed: int = 0, callbacks: Sequence[Callback] = (),
          amp_dtype: torch.dtype | None = None, stop_signal: Callable[[], bool] | None = None,
          checkpoint: CheckpointHook | None = None, resume_from: LoopState | None = None) -> TrainResult:
    """Train for up to `epochs`, keep and restore the best epoch by `objective` on the validation split.

    `stop_signal` is polled between batches (it must not block): True ends training at once, mid-epoch,
    with stop_reason "stopped"; the unfinished epoch is not reported. `resume_from` continues a loop that
    `checkpoint` captured (same data, params and arguments): the result is the uninterrupted run's.
    """
    _check_args(data, epochs, objective, direction)
    device = data.x_train.device
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    module.to(device)
    optimizer = make_optimizer(params, module)
    scheduler = make_scheduler(params, optimizer, epochs=epochs)
    batch_size = int(params.get("batch_size", DEFAULT_BATCH_SIZE))
    noise_std = _noise_std(data) if params.get("augmentation") == "light" and data.image else None
    best = Progress(maximize=direction == "maximize", epochs=epochs, patience=patience)
    best_state = cpu_state(module)
    history: list[EpochReport] = []
    reason, done = "completed", 0  # done: epochs finished before this call
    if resume_from is not None:
        restore_loop(resume_from, module=module, optimizer=optimizer, scheduler=scheduler, generator=generator)
        apply_changed(params, resume_from.params, optimizer, scheduler)
        best.best_epoch, best.best_value = resume_from.best_epoch, resume_from.best_value
        best.best_metrics, best_state = dict(resume_from.best_metrics), resume_from.best_model
        history, done = list(resume_from.history), resume_from.epoch
        if best.out_of_patience(done):  # the captured run stopped here
            reason, epochs = "early_stopping", done
    epoch = done
    for epoch in range(done + 1, epochs + 1):
        started = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        train_loss = _train_epoch(module, data, optimizer, batch_size, generator, noise_std, amp_dtype,
                                  stop_signal)
        if train_loss is None:
            reason = "stopped"
            epoch -= 1  # the interrupted epoch does not count
            break
        if not math.isfinite(train_loss):
            reason = "non_finite_loss"
            break
        raw = evaluate(module, data.x_val, data.y_val, data.task)  # in float32, as the test evaluation
        metrics = {f"val_{k}": v for k, v in raw.items()}
        if not math.isfinite(metrics["val_loss"]):
            reason = "non_finite_loss"
            break
        if best.record(epoch, metrics[objective], metrics):
            best_state = cpu_state(module)
        step_scheduler(scheduler, metrics["val_loss"])
        seconds = time.perf_counter() - started
        report = EpochReport(epoch, train_loss, metrics["val_loss"], metrics, lr, seconds)
        history.append(report)
        if checkpoint is not None:
            checkpoint.on_epoch_state(report, partial(
                capture_loop, epoch=epoch, params=params, module=module, optimizer=optimizer, scheduler=scheduler,
                best_epoch=best.best_epoch, best_value=best.best_value, best_metrics=best.best_metrics,
                best_model=best_state, generator=generator, history=history))
        stop = [cb.on_epoch_end(report) for cb in callbacks]  # every callback sees every epoch
        if any(stop):
            reason = "stopped"
            break
        if best.out_of_patience(epoch):
            reason = "early_stopping"
            break
    module.load_state_dict(best_state)
    return TrainResult(epochs_run=epoch, best_epoch=best.best_epoch, best_metrics=best.best_metrics,
                       best_state=best_state, stop_reason=reason, history=history)


def _check_args(data: TrainData, epochs: int, objective: str, direction: str) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if objective not in metric_names(data.task):
        raise ValueError(f"objective must be one of {list(metric_names(data.task))}, got {objective!r}")
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    if data.x_train.shape[0] == 0:
        raise ValueError("the training split is empty")


def _noise_std(data: TrainData) -> float:
    """Augmentation noise: a fraction of the raw training inputs' standard deviation."""
    return NOISE_FRACTION * float(data.x_train.float().std())


def _train_epoch(module: nn.Module, data: TrainData, optimizer: torch.optim.Optimizer, batch_size: int,
                 generator: torch.Generator, noise_std: float | None, amp_dtype: torch.dtype | None,
                 stop_signal: Callable[[], bool] | None = None) -> float | None:
    """One pass over a fresh permutation; the mean training loss (NaN/inf when it diverged), None if stopped.

    Batch losses stay on the device until the epoch ends: the loop never waits for the device.
    """
    module.train()
    x, y = data.x_train, data.y_train
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    losses: list[Tensor] = []
    sizes: list[int] = []
    for start, end in batch_bounds(x.shape[0], batch_size):
        if stop_signal is not None and stop_signal():
            return None
        idx = perm[start:end]
        xb, yb = x[idx], y[idx]
        if noise_std is not None:
            xb = augment(xb, generator, noise_std)
        with _autocast(x.device, amp_dtype), one_sample_batch_norm(module, active=end - start == 1):
            out = module(xb)
        loss = _loss(out, yb, data.task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        sizes.append(end - start)
    weights = torch.tensor(sizes, dtype=torch.float64, device=x.device)
    return float(torch.stack(losses).double() @ weights) / sum(sizes)
