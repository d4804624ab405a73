"""The epoch loop of a fused group: `workers.trainer.train`'s semantics, per member, in one model.

Each member draws its own data order from its own generator seeded as its solo trial's, and has its own
learning-rate schedule, early stopping, best epoch and failure: a member whose loss goes non-finite ends
alone, a member that a callback or `stop_signal` stops ends alone, and every member that ends is compacted
out of the stacked weights and optimizer state, so it costs no more compute. Members must share a batch
size (`can_fuse`); the caller groups trials by it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from app.ml.artifacts import ModelSpec
from workers.fused.layers import FusedMLP, fusion_order
from workers.fused.optim import FusedOptimizer, MemberSchedules
from workers.fused.snapshot import member_loop_state
from workers.trainer import (
    DEFAULT_BATCH_SIZE,
    EVAL_BATCH_SIZE,
    CheckpointHook,
    EpochReport,
    TrainData,
    TrainResult,
    _autocast,
    _check_args,
    _noise_std,
    augment,
    metrics_of,
    split_sums,
)
from workers.training_rules import Progress, batch_bounds, one_sample_batch_norm


@dataclass(frozen=True)
class Member:
    """One trial of a group: `key` names it in every report (the runner's trial id)."""

    key: Hashable
    spec: ModelSpec
    seed: int


class GroupCallback(Protocol):
    def on_epoch_end(self, key: Hashable, report: EpochReport) -> bool:
        """Return True to stop this member after this epoch."""
        ...

    def on_member_end(self, key: Hashable, result: TrainResult) -> None:
        """The member has ended (completed, early-stopped, stopped or non-finite) and left the group."""
        ...


StopSignal = Callable[[], Collection[Hashable]]  # polled between batches: keys of members to stop now


class MemberCheckpointHook(CheckpointHook, Protocol):
    def wait(self) -> object:
        """Finish the write in flight and hand it on: the member has ended."""
        ...


@dataclass
class _MemberState:
    member: Member
    generator: torch.Generator
    augment: bool
    progress: Progress  # best epoch and patience, decided as the solo loop decides them
    best_batches: int = 0
    history: list[EpochReport] = field(default_factory=list)


class _Group:
    """The live members, their stacked model, optimizer, schedules and best weights, kept aligned by slot."""

    def __init__(self, members: Sequence[Member], data: TrainData, *, epochs: int, direction: str,
                 patience: int | None, callbacks: Sequence[GroupCallback],
                 checkpoints: Mapping[Hashable, MemberCheckpointHook]) -> None:
        device = data.x_train.device
        self.epochs, self.checkpoints = epochs, checkpoints
        self.model = FusedMLP([m.spec for m in members], [m.seed for m in members]).to(device)
        params = [dict(m.spec.params) for m in members]
        self.optimizer = FusedOptimizer(self.model.parameters(), params)
        self.schedules = MemberSchedules(params, epochs=epochs)
        self.callbacks = callbacks
        image = data.image
        self.states = [_MemberState(m, torch.Generator(device=device).manual_seed(m.seed),
                                    image and p.get("augmentation") == "light",
                                    Progress(direction == "maximize", epochs, patience))
                       for m, p in zip(members, params, strict=True)]
        self.best = {n: t.detach().clone() for n, t in self.model.member_tensors().items()}
        self.results: dict[Hashable, TrainResult] = {}

    def __len__(self) -> int:
        return len(self.states)

    def keep_best(self, slots: list[int], epoch: int, values: list[float], metrics: list[dict[str, float]]) -> None:
        if not slots:
            return
        index = torch.as_tensor(slots, dtype=torch.long, device=self.model.head_bias.device)
        with torch.no_grad():
            for name, t in self.model.member_tensors().items():
                self.best[name].index_copy_(0, index, t.detach().index_select(0, index))
        for slot, value, m in zip(slots, values, metrics, strict=True):
            st = self.states[slot]
            st.progress.record(epoch, value, m)
            st.best_batches = self.model.batches_tracked

    def checkpoint(self, slot: int, report: EpochReport) -> None:
        """Offer the member's checkpoint hook this epoch boundary (before the callbacks, as the solo loop)."""
        st = self.states[slot]
        hook = self.checkpoints.get(st.member.key)
        if hook is not None:
            hook.on_epoch_state(report, lambda: member_loop_state(
                self.model, self.optimizer, self.schedules, slot, epoch=report.epoch,
                params=dict(st.member.spec.params), epochs=self.epochs, progress=st.progress, best=self.best,
                best_batches=st.best_batches, generator=st.generator, history=st.history))

    def end(self, ending: dict[int, tuple[str, int]]) -> list[int]:
        """End members {slot: (stop_reason, epochs_run)}, tell the callbacks, compact; the kept slots."""
        if not ending:
            return list(range(len(self)))
        for slot, (reason, epochs_run) in sorted(ending.items()):
            st = self.states[slot]
            hook = self.checkpoints.get(st.member.key)
            if hook is not None:
                hook.wait()  # its last write in flight, recorded before its end
            state = self.model.member_state(slot, self.best, st.best_batches)
            best = st.progress
            result = TrainResult(epochs_run=epochs_run, best_epoch=best.best_epoch, best_metrics=best.best_metrics,
                                 best_state=state, stop_reason=reason, history=list(st.history))
            self.results[st.member.key] = result
            for cb in self.callbacks:
                cb.on_member_end(st.member.key, result)
        keep = [s for s in range(len(self)) if s not in ending]
        if keep:
            self.model.keep_members(keep)
            self.optimizer.keep_members(keep, self.model.parameters())
            index = torch.as_tensor(keep, dtype=torch.long, device=self.model.head_bias.device)
            self.best = {n: t.index_select(0, index) for n, t in self.best.items()}
        self.schedules.keep_members(keep)
        self.states = [self.states[s] for s in keep]
        return keep


def train_group(members: Sequence[Member], data: TrainData, *, epochs: int, objective: str, direction: str,
                patience: int | None = 5, callbacks: Sequence[GroupCallback] = (),
                amp_dtype: torch.dtype | None = None, stop_signal: StopSignal | None = None,
                checkpoints: Mapping[Hashable, MemberCheckpointHook] | None = None) -> dict[Hashable, TrainResult]:
    """Train the members together; each one's result as `workers.trainer.train` would return it, by key.

    `best_state` of each result is the member's solo network's state_dict (`build_module` layout) at its
    best epoch. Dropout masks come from the global RNG seeded with the first member's seed. A member with a
    hook in `checkpoints` (by key) is offered its solo loop's state at every epoch boundary
    (`workers.fused.snapshot`): `trainer.train` continues it alone from there.
    """
    _check_args(data, epochs, objective, direction)
    if len({m.key for m in members}) != len(members):
        raise ValueError("member keys must be distinct")
    members = [members[i] for i in fusion_order([m.spec for m in members])]
    torch.manual_seed(members[0].seed)
    group = _Group(members, data, epochs=epochs, direction=direction, patience=patience, callbacks=callbacks,
                   checkpoints=checkpoints or {})
    batch_size = int(members[0].spec.params.get("batch_size", DEFAULT_BATCH_SIZE))
    noise_std = _noise_std(data) if any(st.augment for st in group.states) else None
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        group.optimizer.set_lr(group.schedules.rates())
        train_losses = _train_epoch(group, data, batch_size, epoch, noise_std, amp_dtype, stop_signal)
        if not len(group):
            break
        ending = {s: ("non_finite_loss", epoch) for s, v in enumerate(train_losses) if not math.isfinite(v)}
        train_losses = [train_losses[s] for s in group.end(ending)]
        if not len(group):
            break
        raw = evaluate_group(group.model, data.x_val, data.y_val, data.task)  # float32, as the test evaluation
        metrics = [{f"val_{k}": v for k, v in r.items()} for r in raw]
        ending = {s: ("non_finite_loss", epoch) for s, m in enumerate(metrics) if not math.isfinite(m["val_loss"])}
        keep = group.end(ending)
        train_losses, metrics = [train_losses[s] for s in keep], [metrics[s] for s in keep]
        if not len(group):
            break
        better = [s for s, m in enumerate(metrics) if group.states[s].progress.improves(m[objective])]
        group.keep_best(better, epoch, [metrics[s][objective] for s in better], [metrics[s] for s in better])
        lrs = group.schedules.rates()  # the rates this epoch used
        group.schedules.step([m["val_loss"] for m in metrics])
        seconds = time.perf_counter() - started
        ending = {}
        for s, st in enumerate(group.states):
            report = EpochReport(epoch, train_losses[s], metrics[s]["val_loss"], metrics[s], lrs[s], seconds)
            st.history.append(report)
            group.checkpoint(s, report)
            stop = [cb.on_epoch_end(st.member.key, report) for cb in group.callbacks]
            if any(stop):
                ending[s] = ("stopped", epoch)
            elif st.progress.out_of_patience(epoch):
                ending[s] = ("early_stopping", epoch)
            elif epoch == epochs:
                ending[s] = ("completed", epoch)
        group.end(ending)
        if not len(group):
            break
    return group.results


def _train_epoch(group: _Group, data: TrainData, batch_size: int, epoch: int, noise_std: float | None,
                 amp_dtype: torch.dtype | None, stop_signal: StopSignal | None) -> list[float]:
    """One pass over each member's fresh permutation; each live member's mean training loss."""
    model, optimizer = group.model, group.optimizer
    model.train()
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    perms = torch.stack([torch.randperm(n, generator=st.generator, device=x.device) for st in group.states])
    sums = torch.zeros(len(group), dtype=torch.float64, device=x.device)
    count = 0
    for start, end in batch_bounds(n, batch_size):
        if stop_signal is not None:
            stopped = set(stop_signal())
            ending = {s: ("stopped", epoch - 1) for s, st in enumerate(group.states) if st.member.key in stopped}
            if ending:  # the interrupted epoch does not count for them
                keep = group.end(ending)
                if not keep:
                    return []
                index = torch.as_tensor(keep, dtype=torch.long, device=x.device)
                perms, sums = perms.index_select(0, index), sums.index_select(0, index)
        idx = perms[:, start:end]
        xb, yb = x[idx], y[idx]
        if noise_std is not None:
            xb = torch.stack([augment(xb[s], st.generator, noise_std) if st.augment else xb[s]
                              for s, st in enumerate(group.states)])
        with _autocast(x.device, amp_dtype), one_sample_batch_norm(model, active=end - start == 1):
            out = model(xb)
        losses = member_losses(out, yb, data.task)
        optimizer.zero_grad()
        losses.sum().backward()  # each member's weights see only its own loss's gradient
        optimizer.step()
        sums += losses.detach().double() * idx.shape[1]
        count += idx.shape[1]
    return (sums / max(count, 1)).tolist()


def _align(out: Tensor, y: Tensor, target_dims: int) -> Tensor:
    """float32 outputs shaped like the regression targets: a trailing 1 dropped for 1-d targets."""
    out = out.float()
    if target_dims == 1 and out.shape[-1] == 1:
        out = out[..., 0]
    return out


def member_losses(out: Tensor, y: Tensor, task: str) -> Tensor:
    """Each member's mean loss over its own batch: out [K, B, C], y [K, B, ...] -> [K]."""
    k, b = out.shape[0], out.shape[1]
    if task == "classification":
        return F.cross_entropy(out.reshape(k * b, -1).float(), y.reshape(-1), reduction="none").view(k, b).mean(1)
    err = F.mse_loss(_align(out, y, y.dim() - 1), y.float(), reduction="none")
    return err.reshape(k, -1).mean(1)


def evaluate_group(model: FusedMLP, x: Tensor, y: Tensor, task: str, *, batch_size: int = EVAL_BATCH_SIZE,
                   amp_dtype: torch.dtype | None = None) -> list[dict[str, float]]:
    """`workers.trainer.evaluate` for every member at once, over the shared split x, in eval mode."""
    sums = split_sums(model, x, y, _batch_sums, batch_size=batch_size, amp_dtype=amp_dtype, task=task)
    return [metrics_of(total, x.shape[0], y, task) for total in sums.tolist()]


def _batch_sums(out: Tensor, y: Tensor, task: str) -> Tensor:
    """Per member (loss sum, correct count or abs-error sum) of one batch shared by all: [K, 2]."""
    k, b = out.shape[0], out.shape[1]
    if task == "classification":
        loss = F.cross_entropy(out.reshape(k * b, -1).float(), y.repeat(k), reduction="none").view(k, b).sum(1)
        second = (out.argmax(dim=-1) == y).sum(1)
    else:
        err = _align(out, y, y.dim()) - y.float()
        loss, second = err.square().reshape(k, -1).sum(1), err.abs().reshape(k, -1).sum(1)
    return torch.stack([loss.double(), second.double()], dim=1)

