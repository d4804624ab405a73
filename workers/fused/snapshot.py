"""A fused member's loop state in its solo trial's form: a checkpoint that `workers.trainer.train` continues.

The weights and the best weights are the member's solo state_dict (`FusedMLP.member_state`). The optimizer
state is the state_dict of the solo optimizer (`make_optimizer`) holding the member's rows of the fused
buffers, cut to its widths as its weights are, and its step count; the schedule is the member's own torch
scheduler's state; the data order is the member's own generator. Dropout masks come from the group's global
generator, which the checkpoint carries as the solo loop's: a member resumed alone draws its masks from there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from workers.fused.layers import FusedMLP
from workers.fused.optim import FusedOptimizer, MemberSchedules
from workers.loop_state import LoopState, capture_rng
from workers.trainer import EpochReport, make_optimizer, make_scheduler
from workers.training_rules import Progress

_COUNTS_STEPS = ("adagrad", "rmsprop", "adam", "adamw")  # torch's rules that keep a "step" per parameter


def member_loop_state(model: FusedMLP, optimizer: FusedOptimizer, schedules: MemberSchedules, slot: int, *,
                      epoch: int, params: dict[str, Any], epochs: int, progress: Progress, best: dict[str, Tensor],
                      best_batches: int, generator: torch.Generator, history: list[EpochReport]) -> LoopState:
    """Member `slot` after `epoch` (its schedule stepped), as the solo loop's `capture_loop` would have it."""
    module = model.solo_layout(slot)  # for the solo parameter names and optimizer form only
    solo = make_optimizer(params, module)
    schedule = make_scheduler(params, solo, epochs=epochs)
    if schedule is not None:
        schedule.load_state_dict(schedules.schedulers[slot].state_dict())
    for group in solo.param_groups:
        group["lr"] = schedules.rates()[slot]  # the next epoch's rate, as the solo loop's optimizer holds it
    names = [name for name, _ in module.named_parameters()]
    fused_names = [name for name, _ in model.named_parameters()]
    live = model.member_tensors()
    buffers = {kind: model.member_state(slot, {**live, **dict(zip(fused_names, views, strict=True))})
               for kind, views in optimizer.member_buffers().items() if kind in optimizer.member_buffer_kinds(slot)}
    steps = {"step": torch.tensor(float(optimizer.counts[slot]))} if optimizer.names[slot] in _COUNTS_STEPS else {}
    state = solo.state_dict()
    state["state"] = {i: {**steps, **{kind: b[name] for kind, b in buffers.items()}} for i, name in enumerate(names)}
    return LoopState(
        epoch=epoch, params=dict(params), model=model.member_state(slot), optimizer=state,
        scheduler=schedule.state_dict() if schedule is not None else None,
        best_epoch=progress.best_epoch, best_value=progress.best_value, best_metrics=dict(progress.best_metrics),
        best_model=model.member_state(slot, best, best_batches), rng=capture_rng(generator), history=list(history))
