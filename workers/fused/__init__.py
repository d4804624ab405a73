"""Fused trials: several trials of one study trained as one stacked model on one device (HFTA-style)."""

from __future__ import annotations

from workers.fused.layers import FusedMLP, can_fuse, fusion_order
from workers.fused.optim import FusedOptimizer, MemberSchedules
from workers.fused.partition import max_waste, plan_groups
from workers.fused.train import GroupCallback, Member, StopSignal, evaluate_group, train_group

__all__ = ["FusedMLP", "FusedOptimizer", "GroupCallback", "Member", "MemberSchedules", "StopSignal", "can_fuse",
           "evaluate_group", "fusion_order", "max_waste", "plan_groups", "train_group"]
