"""What every training loop decides the same way: the solo loop (`workers.trainer`), the fused loop
(`workers.fused.train`) and a plugin's own loop (`workers.plugin_runner`).

An epoch's batches (`batch_bounds`), how a batch of one row meets batch norm (`one_sample_batch_norm`), the
best epoch so far by the objective and when patience runs out (`Progress`). One copy, so a fused member
cannot train on other batches, or stop at another epoch, than its solo trial.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each training batch over n rows: every row in exactly one batch per epoch.

    A last batch of one row joins the batch before it (batch_size + 1 rows), so batch norm never sees a
    lone sample unless the batch size itself is 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts = list(range(0, n, batch_size))
    if batch_size > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else n) for i, start in enumerate(starts)]


def _keeps_running_statistics(module: nn.Module) -> bool:
    """Batch norm, solo (`nn.BatchNorm*`) or stacked (`workers.fused.layers.StackedNorm`)."""
    return getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None


@contextmanager
def one_sample_batch_norm(module: nn.Module, *, active: bool = True) -> Iterator[None]:
    """Batch norm layers normalize a one-row batch with their running statistics, as in evaluation.

    The statistics of a single row are undefined (its variance is 0; torch refuses a 1-d one), so a
    batch of one is normalized the way the trained model will normalize it at inference; the running
    statistics are not updated by it, and the affine weights still train. Other layers stay in training
    mode (dropout applies).
    """
    norms = [m for m in module.modules() if _keeps_running_statistics(m) and m.training] if active else []
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


@dataclass
class Progress:
    """One trial's best epoch so far by its objective, and whether its patience has run out."""

    maximize: bool
    epochs: int  # the budget: the last epoch completes, it never stops early
    patience: int | None  # epochs without improvement before stopping early; None never stops early
    best_epoch: int = 0  # 0 until an epoch ends with a finite objective
    best_value: float | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.maximize else value < self.best_value

    def record(self, epoch: int, value: float, metrics: dict[str, float]) -> bool:
        """Note an epoch's objective; True when it is the new best (the caller keeps its weights)."""
        if not self.improves(value):
            return False
        self.best_epoch, self.best_value, self.best_metrics = epoch, value, dict(metrics)
        return True

    def out_of_patience(self, epoch: int) -> bool:
        """Stop early after `epoch`: `patience` epochs since the best, and the budget not yet spent."""
        return self.patience is not None and epoch < self.epochs and epoch - self.best_epoch >= self.patience
