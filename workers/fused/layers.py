"""A fused MLP: K trials' networks as one stack of batched matmuls, each member computing its own network.

Weights are shaped `[K, in, out]` and run by `torch.baddbmm` (HFTA's fused linear). Widths are padded to
the group's widest with zeros and the padded units' outputs are masked to zero, so padding never changes an
output and never receives a gradient. A member with fewer layers passes its activations through the layers
it lacks (no gradient reaches the weights it does not use). Batch norm (per placement, with per-member
statistics), activation and dropout rate are per member.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.ml.artifacts import ModelSpec, build_module
from app.ml.networks import DEFAULTS, Standardize, _widths

BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # nn.BatchNorm1d's defaults, which the solo network uses
ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
}
Run = tuple[int, int, Any]  # [start, end) of the member axis and the value its members share


def member_params(spec: ModelSpec) -> dict[str, Any]:
    """A member's hyperparameters with the network defaults filled in, as build_model reads them."""
    return {**DEFAULTS, **spec.params}


def can_fuse(specs: Sequence[ModelSpec]) -> tuple[bool, str]:
    """Whether these trials can train as one fused group; the reason when they cannot.

    Fused: plain MLPs over the same data (task, input shape, outputs, standardization) and batch size.
    Solo: feature-group branches (each branch is its own stack over a column subset, merged by concat or
    add: a fused stack per branch is not built) and CNNs (fusing needs grouped convolutions over members of
    one block structure; not built). Different batch sizes form different groups: a member with half the
    batch size takes twice the steps per epoch, so padding its rows would leave the other members idle.
    """
    if not specs:
        return False, "no members"
    first = specs[0]
    for spec in specs:
        if spec.model != "mlp":
            return False, f"model {spec.model!r} runs solo: only MLPs are fused (CNNs need grouped convolutions)"
        if spec.feature_groups and spec.params.get("branch_merge") is not None:
            return False, "feature-group branches (branch_merge) run solo: a fused stack per branch is not built"
        same = (spec.task, tuple(spec.input_shape), spec.n_outputs, spec.mean, spec.std) == \
            (first.task, tuple(first.input_shape), first.n_outputs, first.mean, first.std)
        if not same:
            return False, "members must train on the same data (task, input shape, outputs, standardization)"
        if _batch_size(spec) != _batch_size(first):
            return False, "members of one group share a batch size: group trials by batch_size"
    return True, ""


def _batch_size(spec: ModelSpec) -> int:
    from workers.trainer import DEFAULT_BATCH_SIZE

    return int(spec.params.get("batch_size", DEFAULT_BATCH_SIZE))


def fusion_order(specs: Sequence[ModelSpec]) -> list[int]:
    """Member indices sorted so that members alike sit together, each layer then running one slice per
    batch-norm placement and activation (`FusedMLP._block`): by placement, activation, then deepest first, so
    that at every layer the members of one placement and activation that have the layer stay contiguous and
    those passing through follow them (depth first would split each placement and activation into a slice per
    depth, more operators per step: `benchmarks/fused.py --ops`, docs/benchmarks/performance.md)."""
    def key(i: int) -> tuple[str, str, int]:
        p = member_params(specs[i])
        return (str(p["batch_norm"]), str(p["activation"]), -len(_widths(p)))

    return sorted(range(len(specs)), key=key)


def runs(values: Sequence[Any]) -> list[Run]:
    """Maximal runs of equal consecutive values: [(start, end, value)]."""
    out: list[Run] = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], i + 1, v)
        else:
            out.append((i, i + 1, v))
    return out


@dataclass(frozen=True)
class _Member:
    spec: ModelSpec
    widths: tuple[int, ...]
    activation: str
    batch_norm: str
    keep: float  # 1 - dropout


def _member(spec: ModelSpec) -> _Member:
    p = member_params(spec)
    return _Member(spec, tuple(_widths(p)), str(p["activation"]), str(p["batch_norm"]), 1.0 - float(p["dropout"]))


class FusedMLP(nn.Module):
    """K members' MLPs (app.ml.networks) as one module: input [K, B, *shape] or [N, *shape], output [K, B, out].

    Each member starts from exactly the weights its solo network gets from `build_module` under
    `torch.manual_seed(seed)` (the runner's order), copied into its slot.
    """

    def __init__(self, specs: Sequence[ModelSpec], seeds: Sequence[int]) -> None:
        super().__init__()
        ok, reason = can_fuse(specs)
        if not ok:
            raise ValueError(reason)
        if len(seeds) != len(specs):
            raise ValueError("one seed per member")
        self.members = [_member(s) for s in specs]
        self._layouts: dict[int, tuple[ModelSpec, nn.Module]] = {}  # solo_layout's, by id of the spec
        first = specs[0]
        self.input_shape = tuple(int(d) for d in first.input_shape)
        self.n_outputs = int(first.n_outputs)
        self.batches_tracked = 0  # training forwards: every solo BatchNorm's num_batches_tracked
        solo = [_solo(spec, seed) for spec, seed in zip(specs, seeds, strict=True)]
        self.standardize = _standardize_of(solo[0])
        k, depth = len(specs), max(len(m.widths) for m in self.members)
        # Layer i's padded width covers every member's width there, or the width it carries through.
        self.widths = [max(m.widths[min(i, len(m.widths) - 1)] for m in self.members) for i in range(depth)]
        fan_in = [int(np.prod(self.input_shape))] + self.widths[:-1]
        self.weight = nn.ParameterList([nn.Parameter(torch.zeros(k, fan_in[i], w)) for i, w in enumerate(self.widths)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(k, 1, w)) for w in self.widths])
        placements = {m.batch_norm for m in self.members} - {"none"}
        # One stacked batch norm per placement and layer: a member uses the one of its own placement.
        self.norms = nn.ModuleDict({p: nn.ModuleList([StackedNorm(k, w) for w in self.widths])
                                    for p in sorted(placements)})
        self.head_weight = nn.Parameter(torch.zeros(k, self.widths[-1], self.n_outputs))
        self.head_bias = nn.Parameter(torch.zeros(k, 1, self.n_outputs))
        with torch.no_grad():
            for slot, module in enumerate(solo):
                self._snatch(slot, module)
        self._refresh()

    # ---- per-member tensors ------------------------------------------------------------------------

    def member_tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer whose first axis is the member axis, by state_dict name."""
        return {name: t for name, t in self.state_dict(keep_vars=True).items() if not name.startswith("standardize")}

    def keep_members(self, slots: Sequence[int]) -> None:
        """Drop every member not in `slots` (in that order): stopped members then cost no compute.

        The parameters are new objects afterwards: hand `parameters()` to the optimizer's `keep_members`.
        """
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.head_bias.device)
        with torch.no_grad():
            for name, t in self.member_tensors().items():
                # New tensors, not new `.data`: a graph still alive from the last batch caches the old shapes.
                kept = t.detach().index_select(0, index)
                parent, _, attr = name.rpartition(".")
                owner = self.get_submodule(parent) if parent else self
                setattr(owner, attr, nn.Parameter(kept) if isinstance(t, nn.Parameter) else kept)
        self.members = [self.members[s] for s in slots]
        self._refresh()

    def _refresh(self) -> None:
        """Masks, depth gates, dropout keep probabilities and per-choice member masks for the current members."""
        dev = self.head_bias.device
        k = len(self.members)

        def members_with(attr: str, value: str) -> Tensor:
            return torch.tensor([getattr(m, attr) == value for m in self.members], device=dev).view(k, 1, 1)

        self.any_dropout = any(m.keep < 1.0 for m in self.members)
        self.masks: list[Tensor | None] = []
        self.segments: list[list[Run]] = []  # per layer: runs of members alike there, (live, placement, act)
        self.keeps: list[Tensor] = []  # per layer: each member's keep probability, 1 where it passes through
        for i, w in enumerate(self.widths):
            live = [len(m.widths) > i for m in self.members]
            mask = torch.zeros(k, 1, w, device=dev)
            for slot, m in enumerate(self.members):
                mask[slot, :, :m.widths[i] if live[slot] else w] = 1.0
            self.masks.append(None if bool(mask.all()) else mask)
            # Members passing through are alike whatever their placement and activation: one slice for them.
            alike = [(lv, m.batch_norm, m.activation) if lv else (False, "", "")
                     for lv, m in zip(live, self.members, strict=True)]
            self.segments.append(runs(alike))
            self.keeps.append(torch.tensor([m.keep if lv else 1.0 for lv, m in zip(live, self.members, strict=True)],
                                           device=dev).view(k, 1, 1))

    def _apply(self, fn: Any, recurse: bool = True) -> FusedMLP:
        out = super()._apply(fn, recurse)
        self._refresh()  # masks and gates follow the module to its device
        return out

    # ---- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.members)
        h = self.standardize(x).flatten(start_dim=x.dim() - len(self.input_shape))
        if h.dim() == 2:  # one input shared by every member (evaluation)
            h = h.unsqueeze(0).expand(k, -1, -1)
        if self.training and self._norms_training():
            self.batches_tracked += 1
        for i in range(len(self.widths)):
            out = self._block(i, torch.baddbmm(self.bias[i], h, self.weight[i]), h)
            if self.masks[i] is not None:
                out = out * self.masks[i]
            h = out
        return torch.baddbmm(self.head_bias, h, self.head_weight)

    def _norms_training(self) -> bool:
        """Batch statistics count this forward, as a solo BatchNorm's num_batches_tracked counts it; a batch of
        one row normalizes with the running statistics (`one_sample_batch_norm`) and is not counted."""
        return all(norm.training for norms in self.norms.values() for norm in norms)

    def _block(self, i: int, z: Tensor, h: Tensor | None = None) -> Tensor:
        """Batch norm before or after the activation, the activation, dropout: per member, as the solo layers.

        Members alike at layer i (same placement and activation, or passing their input `h` through a layer
        they lack) sit in contiguous slices of the member axis (`fusion_order`); each slice runs only its own
        choice and the slices are concatenated. Computing every choice over the whole stack and selecting with
        `torch.where` cost several full-stack operations per choice, forward and backward.
        """
        pieces = []
        for a, b, (live, placement, act) in self.segments[i]:
            if not live:  # a layer this member lacks: its activations pass through (no gradient reaches z)
                if h is None:
                    raise ValueError(f"layer {i} passes members {a}..{b - 1} through: give its input h")
                pieces.append(_fit(h[a:b], self.widths[i]))
                continue
            s = z if b - a == z.shape[0] else z[a:b]
            if placement == "before_activation":
                s = self.norms[placement][i](s, a, b)
            s = ACTIVATION_FNS[act](s)
            if placement == "after_activation":
                s = self.norms[placement][i](s, a, b)
            pieces.append(s)
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self.training and self.any_dropout:
            keep = self.keeps[i]
            out = out * (torch.rand(out.shape, device=out.device, dtype=out.dtype) < keep).to(out.dtype).div_(keep)
        return out

    # ---- member <-> solo network -------------------------------------------------------------------

    def _snatch(self, slot: int, module: nn.Module) -> None:
        """Copy a solo network (build_module) into `slot`; the rest of the slot stays zero."""
        linears, bns = _layers_of(module)
        widths = self.members[slot].widths
        for i, lin in enumerate(linears[:-1]):
            self.weight[i][slot, :lin.in_features, :lin.out_features] = lin.weight.T
            self.bias[i][slot, 0, :lin.out_features] = lin.bias
        head = linears[-1]
        self.head_weight[slot, :head.in_features] = head.weight.T
        self.head_bias[slot, 0] = head.bias
        placement = self.members[slot].batch_norm
        for i, bn in enumerate(bns):
            norm = self.norms[placement][i]
            w = widths[i]
            norm.weight[slot, :w] = bn.weight
            norm.bias[slot, :w] = bn.bias
            norm.running_mean[slot, :w] = bn.running_mean
            norm.running_var[slot, :w] = bn.running_var

    def solo_layout(self, slot: int) -> nn.Module:
        """A solo network of member `slot`'s spec on the CPU, built once per spec and only read or overwritten
        (`member_state` fills it): its parameter names and shapes are the member's solo trial's."""
        spec = self.members[slot].spec
        key = id(spec)
        if key not in self._layouts:
            self._layouts[key] = (spec, _solo(spec, 0))  # the spec is kept: its id stays its own
        return self._layouts[key][1]

    def member_state(self, slot: int, state: dict[str, Tensor] | None = None,
                     batches_tracked: int | None = None) -> dict[str, Tensor]:
        """Member `slot` as its solo network's state_dict (same keys and shapes), on the CPU.

        `state` is a `member_tensors()`-shaped snapshot (e.g. the best epoch's) taken after `batches_tracked`
        training batches; the live weights otherwise.
        """
        tracked = self.batches_tracked if batches_tracked is None else batches_tracked
        src = {n: t.detach() for n, t in (state or self.member_tensors()).items()}
        module = self.solo_layout(slot)
        linears, bns = _layers_of(module)
        with torch.no_grad():
            for i, lin in enumerate(linears[:-1]):
                lin.weight.copy_(src[f"weight.{i}"][slot, :lin.in_features, :lin.out_features].T)
                lin.bias.copy_(src[f"bias.{i}"][slot, 0, :lin.out_features])
            head = linears[-1]
            head.weight.copy_(src["head_weight"][slot, :head.in_features].T)
            head.bias.copy_(src["head_bias"][slot, 0])
            placement = self.members[slot].batch_norm
            for i, bn in enumerate(bns):
                w, prefix = bn.num_features, f"norms.{placement}.{i}."
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, name).copy_(src[prefix + name][slot, :w])
                bn.num_batches_tracked.fill_(tracked)
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def member_module(self, slot: int) -> nn.Module:
        """Member `slot` as a solo network (build_module) holding its live weights, in eval mode, on the CPU."""
        module = _solo(self.members[slot].spec, 0)
        module.load_state_dict(self.member_state(slot))
        return module.eval()


class StackedNorm(nn.Module):
    """K BatchNorm1d layers of width w: one channel per (member, unit), statistics over each member's batch."""

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, k: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, width))
        self.bias = nn.Parameter(torch.zeros(k, width))
        self.register_buffer("running_mean", torch.zeros(k, width))
        self.register_buffer("running_var", torch.ones(k, width))

    def forward(self, s: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Normalize members [start, end) of the stack; `s` holds just those members."""
        k, rows, w = s.shape
        sl = slice(start, start + k if end is None else end)
        # The solo BatchNorm1d's own kernel over (rows, k*w) channels: each one sees only its member's batch.
        flat = s.transpose(0, 1).reshape(rows, k * w)
        y = F.batch_norm(flat, self.running_mean[sl].view(-1), self.running_var[sl].view(-1),
                         self.weight[sl].reshape(-1), self.bias[sl].reshape(-1), self.training, BN_MOMENTUM, BN_EPS)
        return y.view(rows, k, w).transpose(0, 1)


def _solo(spec: ModelSpec, seed: int) -> nn.Module:
    """build_module under torch.manual_seed(seed), as the runner does, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module: nn.Module = build_module(spec)
    return module


def _standardize_of(module: nn.Module) -> Standardize:
    layer = next(m for m in module.children() if isinstance(m, Standardize))
    return layer


def _layers_of(module: nn.Module) -> tuple[list[nn.Linear], list[nn.BatchNorm1d]]:
    """The solo network's Linear layers (hidden ones, then the head) and BatchNorm1d layers, in order."""
    linears = [m for m in module.children() if isinstance(m, nn.Linear)]
    bns = [m for m in module.children() if isinstance(m, nn.BatchNorm1d)]
    return linears, bns


def _fit(h: Tensor, width: int) -> Tensor:
    """Pass-through activations padded with zeros or cut to `width` (cut columns are zero padding)."""
    have = h.shape[-1]
    if have == width:
        return h
    return F.pad(h, (0, width - have)) if have < width else h[..., :width]
