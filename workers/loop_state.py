"""The state of the epoch loop at an epoch boundary: everything that continues a trial exactly.

`capture_rng` / `restore_rng` cover every random source an epoch may draw from: torch's CPU generator
(dropout, initialisation), the CUDA generators the process has used, numpy's and Python's global
generators (plugin code), and the loop's own data-order generator, which also draws the augmentation.
A `LoopState` holds CPU copies, so training may go on while it is written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from workers.trainer import EpochReport, Scheduler


@dataclass(frozen=True)
class RngState:
    """Every random generator the epoch loop uses, as plain values and CPU tensors."""

    torch_cpu: Tensor  # uint8, torch.get_rng_state()
    torch_cuda: list[Tensor]  # one per CUDA device; empty when the process never initialised CUDA
    numpy: dict[str, Any]  # np.random.get_state() by field; "keys" is an int64 tensor
    python: list[Any]  # random.getstate(): [version, [625 ints], gauss_next]
    data_order: Tensor  # uint8, the loop's torch.Generator (batch order and augmentation); empty: none


@dataclass(frozen=True)
class LoopState:
    """The epoch loop after `epoch` finished epochs (its scheduler stepped, its callbacks not yet run)."""

    epoch: int
    params: dict[str, Any]  # the hyperparameters in force
    model: dict[str, Tensor]  # the current weights (state_dict), CPU copies
    optimizer: dict[str, Any]  # optimizer.state_dict(), its tensors as CPU copies
    scheduler: dict[str, Any] | None  # scheduler.state_dict(); None for a constant rate
    best_epoch: int  # 0: no epoch improved yet (best_model is the initial weights)
    best_value: float | None
    best_metrics: dict[str, float]
    best_model: dict[str, Tensor]
    rng: RngState
    history: list[EpochReport] = field(default_factory=list)  # epochs 1..epoch, in order
    # A model plugin's own loop: the state it handed to `report` (its weights live there, not in `model`).
    own: dict[str, Any] | None = None

    @property
    def epochs_since_best(self) -> int:
        """The early-stopping counter: stop once it reaches the patience."""
        return self.epoch - self.best_epoch


def cpu_copy(value: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples with every tensor detached and copied to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(v) for v in value)
    return value


def capture_rng(generator: torch.Generator | None) -> RngState:
    # Only generators already initialised: asking an unused CUDA for its state would initialise it.
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # the MT19937 tuple
    version, internal, gauss_next = random.getstate()
    return RngState(
        torch_cpu=torch.get_rng_state(),
        torch_cuda=cuda,
        numpy={"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
               "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        python=[version, list(internal), gauss_next],
        data_order=generator.get_state() if generator is not None else torch.empty(0, dtype=torch.uint8),
    )


def restore_rng(rng: RngState, generator: torch.Generator | None) -> None:
    torch.set_rng_state(rng.torch_cpu)
    if rng.torch_cuda and torch.cuda.is_available():
        # A machine with fewer devices restores those it has: a trial runs on one device.
        for i, state in enumerate(rng.torch_cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    n = rng.numpy
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = rng.python
    random.setstate((version, tuple(internal), gauss_next))
    if generator is not None:
        generator.set_state(rng.data_order)


def capture_loop(*, epoch: int, params: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Scheduler | None, best_epoch: int, best_value: float | None,
                 best_metrics: dict[str, float], best_model: dict[str, Tensor], generator: torch.Generator,
                 history: list[EpochReport]) -> LoopState:
    """A snapshot of the loop; `best_model` must be CPU tensors that the loop replaces, never mutates."""
    return LoopState(
        epoch=epoch, params=dict(params), model=cpu_copy(module.state_dict()),
        optimizer=cpu_copy(optimizer.state_dict()),
        scheduler=cpu_copy(scheduler.state_dict()) if scheduler is not None else None,
        best_epoch=best_epoch, best_value=best_value, best_metrics=dict(best_metrics),
        best_model=dict(best_model), rng=capture_rng(generator), history=list(history))


def restore_loop(state: LoopState, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Scheduler | None, generator: torch.Generator) -> None:
    """Load the weights, optimizer, schedule and random generators; the caller restores its best-so-far."""
    if (state.scheduler is None) != (scheduler is None):
        raise ValueError("the checkpoint's learning-rate schedule differs from the trial's")
    module.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)  # moves the buffers to the parameters' device
    if scheduler is not None and state.scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    restore_rng(state.rng, generator)
