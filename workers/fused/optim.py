"""One optimizer for a fused group: each member's own torch.optim update rule with its own coefficients.

A member's rule and arguments are the ones `workers.trainer.make_optimizer` gives its solo trial (SGD with or
without momentum or Nesterov, Adagrad, RMSprop, Adam, AdamW; torch's defaults for the rest). Coefficients
are `[K, 1, ...]` tensors that broadcast over the stacked weights (HFTA's optimizers); members of one family
sit in contiguous runs of the member axis, and each run is updated by its family's rule on its slice.
Learning-rate schedules are per member too: `MemberSchedules` drives torch's own schedulers, one per member.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from workers.fused.layers import runs
from workers.trainer import DEFAULT_LEARNING_RATE, DEFAULT_MOMENTUM, make_scheduler, step_scheduler

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam / AdamW defaults
ADAM_EPS, RMSPROP_EPS, ADAGRAD_EPS = 1e-8, 1e-8, 1e-10
RMSPROP_ALPHA = 0.99
_STATE = {"momentum": ("momentum_buffer",), "nesterov": ("momentum_buffer",), "adagrad": ("sum",),
          "rmsprop": ("square_avg",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


class FusedOptimizer:
    """Per-member update rules over parameters whose first axis is the member axis."""

    def __init__(self, params: Iterable[nn.Parameter], member_params: Sequence[dict[str, Any]]) -> None:
        self.params = list(params)
        self.names = [str(p.get("optimizer", "adam")) for p in member_params]
        unknown = sorted(set(self.names) - set(OPTIMIZERS))
        if unknown:
            raise ValueError(f"unknown optimizer {unknown[0]!r}")
        device = self.params[0].device
        self.lr = torch.tensor([float(p.get("learning_rate", DEFAULT_LEARNING_RATE)) for p in member_params],
                               device=device)
        self.weight_decay = torch.tensor([float(p.get("weight_decay", 0.0)) for p in member_params], device=device)
        # torch refuses Nesterov without momentum; with momentum 0 both rules reduce to plain SGD.
        self.momentum = torch.tensor([float(p.get("momentum", DEFAULT_MOMENTUM)) if n in ("momentum", "nesterov")
                                      else 0.0 for p, n in zip(member_params, self.names, strict=True)],
                                     device=device)
        kinds = {s for n in self.names for s in _STATE.get(n, ())}
        self.state: list[dict[str, Tensor]] = [{s: torch.zeros_like(p) for s in sorted(kinds)} for p in self.params]
        self.steps = 0  # every member steps together, so one count serves the bias corrections
        self._runs = runs(self.names)
        self._plan: list[Any] | None = None
        self._grads: list[tuple[nn.Parameter, Tensor | None]] = []

    def set_lr(self, lrs: Sequence[float]) -> None:
        self.lr = torch.tensor(list(lrs), dtype=self.lr.dtype, device=self.lr.device)
        self._plan = None

    def zero_grad(self) -> None:
        """Zero the gradients in place: the update plan keeps views of them."""
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def keep_members(self, slots: Sequence[int], params: Iterable[nn.Parameter]) -> None:
        """Drop the state and coefficients of members not in `slots`; `params` are the module's compacted ones."""
        self.params = list(params)
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.lr.device)
        self.lr, self.weight_decay, self.momentum = (t.index_select(0, index) for t in
                                                     (self.lr, self.weight_decay, self.momentum))
        self.state = [{k: v.index_select(0, index) for k, v in st.items()} for st in self.state]
        self.names = [self.names[s] for s in slots]
        self._runs = runs(self.names)
        self._plan = None

    def _make_plan(self) -> list[tuple[Any, Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]]:
        """Views of each run's slice of every parameter, gradient, state and coefficient, made once."""
        plan = []
        for p, state in zip(self.params, self.state, strict=True):
            if p.grad is None:  # not used by any member's forward (a placement no member has any more)
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            for a, b, name in self._runs:
                coef = {"lr": self.lr[a:b].view(shape), "wd": self.weight_decay[a:b].view(shape),
                        "momentum": self.momentum[a:b].view(shape)}
                plan.append((_RULES[name], p.data[a:b], p.grad[a:b], {k: v[a:b] for k, v in state.items()}, coef))
        return plan

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self._plan is None or any(p.grad is not None and not _same(p, g) for p, g in self._grads):
            self._plan = self._make_plan()
            self._grads = [(p, p.grad) for p in self.params]
        for rule, p, g, state, coef in self._plan:
            rule(p, g, state, coef, self.steps)


def _same(p: nn.Parameter, grad: Tensor | None) -> bool:
    return p.grad is grad


def _sgd(p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Tensor], step: int, *,
         momentum: bool = False, nesterov: bool = False) -> None:
    g = g + c["wd"] * p
    if momentum or nesterov:
        buf = state["momentum_buffer"]
        buf.mul_(c["momentum"]).add_(g)  # from zeros: the first step's buffer is the gradient, as torch's
        g = g + c["momentum"] * buf if nesterov else buf
    p.sub_(c["lr"] * g)


def _adagrad(p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Tensor], step: int) -> None:
    g = g + c["wd"] * p
    total = state["sum"]
    total.addcmul_(g, g)
    p.sub_(c["lr"] * (g / total.sqrt().add_(ADAGRAD_EPS)))


def _rmsprop(p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Tensor], step: int) -> None:
    g = g + c["wd"] * p
    avg = state["square_avg"]
    avg.mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
    p.sub_(c["lr"] * (g / avg.sqrt().add_(RMSPROP_EPS)))


def _adam(p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Tensor], step: int, *,
          decoupled: bool = False) -> None:
    if decoupled:
        p.mul_(1 - c["lr"] * c["wd"])
    else:
        g = g + c["wd"] * p
    beta1, beta2 = ADAM_BETAS
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = c["lr"] / (1 - beta1**step)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
    p.sub_(step_size * (m / denom))


_RULES: dict[str, Any] = {
    "sgd": _sgd,
    "momentum": lambda *a: _sgd(*a, momentum=True),
    "nesterov": lambda *a: _sgd(*a, nesterov=True),
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": lambda *a: _adam(*a, decoupled=True),
}


class MemberSchedules:
    """Each member's learning-rate schedule, run by torch's own scheduler (`make_scheduler`) on a stand-in.

    The stand-in optimizer holds nothing but the member's rate, so step, plateau and cosine decide exactly
    as they do for the solo trial; `rates()` reads the rates for the next epoch.
    """

    def __init__(self, member_params: Sequence[dict[str, Any]], *, epochs: int) -> None:
        self.optimizers = [torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                           lr=float(p.get("learning_rate", DEFAULT_LEARNING_RATE)))
                           for p in member_params]
        self.schedulers = [make_scheduler(p, opt, epochs=epochs)
                           for p, opt in zip(member_params, self.optimizers, strict=True)]

    def rates(self) -> list[float]:
        return [float(opt.param_groups[0]["lr"]) for opt in self.optimizers]

    def step(self, val_losses: Sequence[float]) -> None:
        for opt, sched, loss in zip(self.optimizers, self.schedulers, val_losses, strict=True):
            opt.step()  # a no-op (no gradient) that tells the scheduler an epoch of updates happened
            step_scheduler(sched, loss)

    def keep_members(self, slots: Sequence[int]) -> None:
        self.optimizers = [self.optimizers[s] for s in slots]
        self.schedulers = [self.schedulers[s] for s in slots]
