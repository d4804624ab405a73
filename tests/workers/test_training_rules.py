"""The rules the solo, fused and plugin loops share: the best epoch so far and when patience runs out."""

from __future__ import annotations

import math

from workers.training_rules import Progress


def test_the_best_epoch_is_the_first_strictly_better_finite_objective() -> None:
    p = Progress(maximize=True, epochs=10, patience=None)
    assert (p.best_epoch, p.best_value, p.best_metrics) == (0, None, {})
    assert not p.record(1, math.nan, {"val_accuracy": math.nan})  # a non-finite epoch is never the best
    assert p.record(2, 0.5, {"val_accuracy": 0.5})
    assert not p.record(3, 0.5, {"val_accuracy": 0.5})  # a tie keeps the earlier epoch
    assert not p.record(4, 0.4, {"val_accuracy": 0.4})
    assert p.record(5, 0.6, {"val_accuracy": 0.6, "val_loss": 1.0})
    assert (p.best_epoch, p.best_value, p.best_metrics) == (5, 0.6, {"val_accuracy": 0.6, "val_loss": 1.0})
    low = Progress(maximize=False, epochs=10, patience=None)
    assert low.record(1, 2.0, {}) and low.record(2, 1.0, {}) and not low.record(3, math.inf, {})


def test_patience_counts_from_the_best_epoch_and_never_cuts_the_budgets_last() -> None:
    p = Progress(maximize=False, epochs=6, patience=2)
    p.record(1, 1.0, {})
    p.record(2, 1.5, {})
    assert not p.out_of_patience(2)
    p.record(3, 1.5, {})
    assert p.out_of_patience(3)  # two epochs since the best
    last = Progress(maximize=False, epochs=3, patience=2)
    last.record(1, 1.0, {})
    assert not last.out_of_patience(3)  # the last epoch completes the budget: not an early stop
    never = Progress(maximize=False, epochs=100, patience=None)
    assert not any(never.out_of_patience(epoch) for epoch in range(1, 100))
