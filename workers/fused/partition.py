"""Split claimed trials into fused groups whose padding wastes little compute (HFTA's hfht/partition idea).

A fused group pads every member to the widest and deepest member, so a 32-unit member grouped with a
512-unit one computes 512-wide layers. Groups are formed per batch size (`can_fuse`), over members sorted by
size, and a member joins the current group only while the group's cost stays within `max_waste` of what its
members would cost alone. Costs count each training step's fixed cost too (`STEP_OVERHEAD`: Python,
operator launches, the optimizer call), which a solo trial pays once per member and a group once: small
networks are dominated by it, so fusing them pays even with much padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.ml.artifacts import ModelSpec
from app.ml.networks import _widths
from workers.fused.layers import can_fuse, member_params
from workers.trainer import DEFAULT_BATCH_SIZE

MAX_WASTE = 0.5  # a group's cost at most 1.5x its members' own cost
# On a CPU padding costs its full arithmetic: with the same trials (benchmarks/fused.py --sampler random,
# digits) groups allowed no padding beyond the step overheads they save trained 0.84x as many trials per
# minute as one at a time, against 0.75x at 0.25 and 0.61x at 0.5.
CPU_MAX_WASTE = 0.0
# A training step's fixed cost in multiply-adds: on one CPU thread a solo step of a tiny MLP takes about
# 0.5 ms beyond its arithmetic, the time of some 15 million multiply-adds of a batched matmul.
STEP_OVERHEAD = 15_000_000


def layer_sizes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each Linear of the member's solo network, the head last."""
    widths = _widths(member_params(spec))
    fan_in = [int(np.prod(spec.input_shape))] + widths
    return list(zip(fan_in, widths + [int(spec.n_outputs)], strict=True))


def own_cost(spec: ModelSpec) -> int:
    """Multiply-adds per sample of the member's own network."""
    return sum(i * o for i, o in layer_sizes(spec))


def padded_cost(specs: Sequence[ModelSpec]) -> int:
    """Multiply-adds per sample of the fused group (every member at the padded widths and depth)."""
    sizes = [[o for _, o in layer_sizes(s)[:-1]] for s in specs]
    depth = max(len(w) for w in sizes)
    widths = [max(w[min(i, len(w) - 1)] for w in sizes) for i in range(depth)]
    fan_in = [int(np.prod(specs[0].input_shape))] + widths
    outs = widths + [int(specs[0].n_outputs)]
    return len(specs) * sum(i * o for i, o in zip(fan_in, outs, strict=True))


def max_waste(device: str) -> float:
    """The padding a group on `device` may add, as a fraction of its members' own cost."""
    return CPU_MAX_WASTE if device == "cpu" else MAX_WASTE


def plan_groups(specs: Sequence[ModelSpec], *, max_members: int, max_waste: float = MAX_WASTE,
                step_overhead: int = STEP_OVERHEAD) -> list[list[int]]:
    """Indices of `specs` in fusable groups of at most `max_members`; a member that fits nowhere runs alone.

    A group fits while its padded cost plus one step overhead (per sample) stays within `1 + max_waste`
    times the sum of its members' own costs plus one step overhead each.
    """
    groups: list[list[int]] = []
    by_batch: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        by_batch.setdefault(int(member_params(spec).get("batch_size", DEFAULT_BATCH_SIZE)), []).append(i)
    for batch_size, members in by_batch.items():
        overhead = step_overhead / batch_size
        current: list[int] = []
        for i in sorted(members, key=lambda j: own_cost(specs[j])):
            if not can_fuse([specs[i]])[0]:
                groups.append([i])
                continue
            trial = current + [i]
            chosen = [specs[j] for j in trial]
            alone = sum(own_cost(s) + overhead for s in chosen)
            fits = len(trial) <= max_members and padded_cost(chosen) + overhead <= (1 + max_waste) * alone
            if current and not fits:
                groups.append(current)
                trial = [i]
            current = trial
        if current:
            groups.append(current)
    return groups
