"""ASHA with promotion (Li et al. 2018): decisions over a study's recorded rung values, nothing else.

A trial trains to its next rung and pauses there with its checkpoint. A free slot promotes the best paused
trial that ranks in the top 1/eta of its rung, highest rung first, and otherwise starts a new trial. The
state is plain data built from the database (each trial's value at every rung it reached, and where it
waits), so the worker and the offline benchmark (`benchmarks/lcbench.py`) run this same code.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from app.schemas.scheduler import AshaConfig
from workers.schedulers.ranking import ranked


class EpochDecision(enum.Enum):
    CONTINUE = "continue"
    PAUSE = "pause"  # checkpoint and hand the slot back; a promotion resumes it
    FINISH = "finish"  # max_epochs reached: the trial is complete


@dataclass(frozen=True)
class TrialFacts:
    """One trial as recorded: its value at each rung it reached, and the rung it waits at (None: not paused)."""

    number: int
    rung_values: Mapping[int, float]
    paused_at: int | None = None

    def __post_init__(self) -> None:
        if self.paused_at is not None and self.paused_at != max(self.rung_values, default=None):
            raise ValueError(f"trial {self.number} is paused at {self.paused_at}, not at its highest rung")


@dataclass(frozen=True)
class Promote:
    """Resume `trial` from its checkpoint at `from_epoch` and train it to `to_epoch`."""

    trial: int
    from_epoch: int
    to_epoch: int


@dataclass(frozen=True)
class NewTrial:
    """No paused trial earns a promotion: ask the sampler for a new trial, which trains to the first rung."""

    to_epoch: int


Job = Promote | NewTrial


class Asha:
    """The scheduler of one study; `maximize` says which way its objective improves."""

    def __init__(self, config: AshaConfig, *, maximize: bool) -> None:
        self.config = config
        self.rungs = config.rungs
        self.maximize = maximize

    def on_epoch(self, epoch: int) -> EpochDecision:
        """After a trial recorded `epoch`: pause at a rung, finish at max_epochs, else go on."""
        if epoch >= self.config.max_epochs:
            return EpochDecision.FINISH
        return EpochDecision.PAUSE if epoch in self.rungs else EpochDecision.CONTINUE

    def next_job(self, trials: Iterable[TrialFacts]) -> Job:
        """What a free slot does: promote a paused trial in the top 1/eta of its rung, or start a new one.

        Rungs are scanned from the highest down, so trials nearest to completion finish first; within a
        rung the best value goes first and ties go to the older trial. A promoted trial is no longer paused
        at that rung, so it can never be promoted from it twice.
        """
        trials = list(trials)
        for index in range(len(self.rungs) - 1, -1, -1):
            rung = self.rungs[index]
            ranked = self._ranked(trials, rung)
            top = ranked[: len(ranked) // self.config.reduction_factor]
            waiting = [t for t in top if t.paused_at == rung]
            if waiting:
                to_epoch = self.rungs[index + 1] if index + 1 < len(self.rungs) else self.config.max_epochs
                return Promote(waiting[0].number, rung, to_epoch)
        return NewTrial(self.rungs[0])

    def best_paused(self, trials: Iterable[TrialFacts]) -> Promote | None:
        """The best paused trial of the highest rung any waits at, promoted whatever its rank: what a study
        whose every trial has started and that has none fully trained does, so that one is (a budget too small
        for the top 1/eta of a rung to hold anyone would otherwise end without one)."""
        trials = list(trials)
        for index in range(len(self.rungs) - 1, -1, -1):
            rung = self.rungs[index]
            waiting = [t for t in self._ranked(trials, rung) if t.paused_at == rung]
            if waiting:
                to_epoch = self.rungs[index + 1] if index + 1 < len(self.rungs) else self.config.max_epochs
                return Promote(waiting[0].number, rung, to_epoch)
        return None

    def at_study_end(self, trials: Iterable[TrialFacts]) -> dict[int, float]:
        """Paused trials never promoted: each ends pruned with its last (highest rung's) value."""
        return {t.number: t.rung_values[t.paused_at] for t in trials if t.paused_at is not None}

    def _ranked(self, trials: list[TrialFacts], rung: int) -> list[TrialFacts]:
        return ranked([t for t in trials if rung in t.rung_values], lambda t: t.rung_values[rung],
                      maximize=self.maximize)
