"""One optimizer for a fused group: each member's own torch.optim update rule with its own coefficients.

A member's rule and arguments are the ones `workers.trainer.make_optimizer` gives its solo trial (SGD with or
without momentum or Nesterov, Adagrad, RMSprop, Adam, AdamW; torch's defaults for the rest). Every
parameter, gradient and state tensor of the group lives in one flat `[K, P]` buffer, and each member's row is
updated by torch's own single-pass (fused) kernel for its rule, with its own coefficients: per step, one
kernel call per member over all of its parameters. (Per-parameter `[K, 1, ...]` coefficient tensors, HFTA's
form, cost several full passes per rule on a CPU, where memory traffic, not launches, bounds the update.)
Learning-rate schedules are per member too: `MemberSchedules` drives torch's own schedulers, one per member.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from workers.trainer import DEFAULT_LEARNING_RATE, DEFAULT_MOMENTUM, make_scheduler, step_scheduler

# The gradients are views of one flat buffer, strided unlike a fresh gradient: autograd says so once, harmlessly.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam / AdamW defaults
ADAM_EPS, RMSPROP_EPS, ADAGRAD_EPS = 1e-8, 1e-8, 1e-10
RMSPROP_ALPHA = 0.99
_STATE = {"momentum": ("momentum_buffer",), "nesterov": ("momentum_buffer",), "adagrad": ("sum",),
          "rmsprop": ("square_avg",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


class FusedOptimizer:
    """Per-member update rules over parameters whose first axis is the member axis.

    The parameters, their gradients and every state tensor live in flat `[K, P]` buffers (P: one member's
    share of all parameters), and each parameter's `.data` and `.grad` are views into them: a step is one
    call of each member's rule on its row of each buffer, not one per parameter and member, so a group of
    K members takes K kernel calls per step, each one pass over a member's parameters.
    """

    def __init__(self, params: Iterable[nn.Parameter], member_params: Sequence[dict[str, Any]]) -> None:
        self.names = [str(p.get("optimizer", "adam")) for p in member_params]
        unknown = sorted(set(self.names) - set(OPTIMIZERS))
        if unknown:
            raise ValueError(f"unknown optimizer {unknown[0]!r}")
        self.params = list(params)
        device = self.params[0].device
        self.lr = torch.tensor([float(p.get("learning_rate", DEFAULT_LEARNING_RATE)) for p in member_params],
                               device=device)
        self.weight_decay = torch.tensor([float(p.get("weight_decay", 0.0)) for p in member_params], device=device)
        # torch refuses Nesterov without momentum; with momentum 0 both rules reduce to plain SGD.
        self.momentum = torch.tensor([float(p.get("momentum", DEFAULT_MOMENTUM)) if n in ("momentum", "nesterov")
                                      else 0.0 for p, n in zip(member_params, self.names, strict=True)],
                                     device=device)
        kinds = sorted({s for n in self.names for s in _STATE.get(n, ())})
        self.data, self.grad = self._flatten(self.params)
        self.state: dict[str, Tensor] = {s: torch.zeros_like(self.data) for s in kinds}
        self.steps = 0  # every member steps together
        self.counts = torch.zeros(len(self.names), device=device)  # the fused kernels' own step counts
        self._plan: list[Any] | None = None

    @staticmethod
    def _flatten(params: list[nn.Parameter]) -> tuple[Tensor, Tensor]:
        """Move the parameters into one [K, P] buffer and give them gradients that are views of another."""
        k = params[0].shape[0]
        data = torch.empty(k, sum(p[0].numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        grad = torch.zeros_like(data)
        for p, view, grad_view in zip(params, _views(data, params), _views(grad, params), strict=True):
            view.copy_(p.detach())
            p.data = view
            # Autograd adds into an existing .grad in place, so the flat buffer collects every gradient.
            p.grad = grad_view
        return data, grad

    def member_buffers(self) -> dict[str, list[Tensor]]:
        """Each state buffer (exp_avg, momentum_buffer...) as views shaped like the parameters, in their order:
        a member's optimizer state, sliced as its weights are (`FusedMLP.member_state`)."""
        return {kind: _views(flat, self.params) for kind, flat in self.state.items()}

    def member_buffer_kinds(self, slot: int) -> tuple[str, ...]:
        """The state buffers the member's own update rule keeps ("step" aside)."""
        return _STATE.get(self.names[slot], ())

    def set_lr(self, lrs: Sequence[float]) -> None:
        self.lr = torch.tensor(list(lrs), dtype=self.lr.dtype, device=self.lr.device)
        self._plan = None

    def zero_grad(self) -> None:
        """Zero every gradient at once, in place: the parameters' .grad are views of the flat buffer."""
        self.grad.zero_()

    def keep_members(self, slots: Sequence[int], params: Iterable[nn.Parameter]) -> None:
        """Drop the state and coefficients of members not in `slots`; `params` are the module's compacted ones."""
        self.params = list(params)
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.lr.device)
        self.lr, self.weight_decay, self.momentum = (t.index_select(0, index) for t in
                                                     (self.lr, self.weight_decay, self.momentum))
        self.data, self.grad = self._flatten(self.params)
        self.state = {k: v.index_select(0, index) for k, v in self.state.items()}
        self.counts = self.counts.index_select(0, index)
        self.names = [self.names[s] for s in slots]
        self._plan = None

    def _make_plan(self) -> list[tuple[Any, ...]]:
        """Each member's rule, its rows of the flat buffers and its coefficients as plain numbers."""
        plan = []
        lrs, wds, moms = self.lr.tolist(), self.weight_decay.tolist(), self.momentum.tolist()
        for k, name in enumerate(self.names):
            state = {s: v[k] for s, v in self.state.items() if s in _STATE.get(name, ())}
            plan.append((_RULES[name], self.data[k], self.grad[k], state, self.counts[k],
                         (lrs[k], wds[k], moms[k])))
        return plan

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        self.counts += 1  # torch's optimizers count the step before the fused kernels read it
        if self._plan is None:
            self._plan = self._make_plan()
        for rule, p, g, state, count, (lr, wd, momentum) in self._plan:
            rule(p, g, state, count, lr, wd, momentum, self.steps)


def _views(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """The `[K, P]` buffer cut into views shaped like each parameter, in their order (the layout of `_flatten`)."""
    views, offset = [], 0
    for p in params:
        n = p[0].numel()
        views.append(flat[:, offset:offset + n].view(p.shape))
        offset += n
    return views


# Each rule is torch.optim's own kernel for the solo trial's optimizer (`make_optimizer` asks for the fused
# kernels on the CPU, foreach for RMSprop), run on one member's row of the flat buffers: the same arithmetic
# in one pass over the member's parameters.


def _sgd(p: Tensor, g: Tensor, state: dict[str, Tensor], count: Tensor, lr: float, wd: float, momentum: float,
         step: int, *, nesterov: bool = False) -> None:
    buffers = [state["momentum_buffer"]] if momentum != 0 and "momentum_buffer" in state else []
    torch._fused_sgd_([p], [g], buffers, weight_decay=wd, momentum=momentum if buffers else 0.0, lr=lr,
                      dampening=0.0, nesterov=nesterov and bool(buffers), maximize=False, is_first_step=step == 1)


def _adagrad(p: Tensor, g: Tensor, state: dict[str, Tensor], count: Tensor, lr: float, wd: float,
             momentum: float, step: int) -> None:
    if p.device.type != "cpu":  # torch fuses Adagrad on the CPU only; elsewhere its foreach arithmetic
        if wd != 0:
            g = g.add(p, alpha=wd)
        total = state["sum"]
        total.addcmul_(g, g, value=1)
        p.addcdiv_(g, total.sqrt().add_(ADAGRAD_EPS), value=-lr)
        return
    torch._fused_adagrad_([p], [g], [state["sum"]], [count], lr=lr, lr_decay=0.0, weight_decay=wd,
                          eps=ADAGRAD_EPS, maximize=False)


def _rmsprop(p: Tensor, g: Tensor, state: dict[str, Tensor], count: Tensor, lr: float, wd: float,
             momentum: float, step: int) -> None:
    if wd != 0:
        g = g.add(p, alpha=wd)
    avg = state["square_avg"]
    avg.mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
    p.addcdiv_(g, avg.sqrt().add_(RMSPROP_EPS), value=-lr)


def _adam(p: Tensor, g: Tensor, state: dict[str, Tensor], count: Tensor, lr: float, wd: float, momentum: float,
          step: int, *, decoupled: bool = False) -> None:
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused([p], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [], [count], amsgrad=False, lr=lr,
          beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], weight_decay=wd, eps=ADAM_EPS, maximize=False)


_RULES: dict[str, Any] = {
    "sgd": _sgd,
    "momentum": _sgd,
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
