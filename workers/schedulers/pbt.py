"""Population-based training (Jaderberg et al. 2017) as decisions over recorded facts, with Ray Tune's rules.

Every `interval_epochs` after its last change, a member in the bottom `quantile` of the population (ranked by
each member's latest value) copies the checkpoint of a random member of the top `quantile` (exploit) and
continues with that member's mutable hyperparameters, each resampled with `resample_probability` and
otherwise multiplied by one of the `perturb` factors (explore). The decision names whose checkpoint, from
which epoch, and the new values: that record is the member's lineage, kept as plain data. The caller passes
the random generator, so a seeded study replays the same schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from app.schemas.scheduler import PbtConfig
from workers.schedulers.ranking import ranked


@dataclass(frozen=True)
class Range:
    """Where a mutable hyperparameter may go: resampled within it, perturbed values clipped to it."""

    low: float
    high: float
    log: bool = False

    def sample(self, rng: random.Random) -> float:
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def clip(self, value: float) -> float:
        return min(max(value, self.low), self.high)


@dataclass(frozen=True)
class Member:
    """One member as recorded: its latest epoch and value, the values in force, the epoch they took effect."""

    number: int
    epoch: int
    value: float
    params: Mapping[str, float]
    changed_at: int = 0  # 0: the values it started with


@dataclass(frozen=True)
class Keep:
    """Train on unchanged."""


@dataclass(frozen=True)
class Exploit:
    """A lineage step: at `epoch`, `member` continues from `source`'s checkpoint of `source_epoch`, with `params`."""

    member: int
    epoch: int
    source: int
    source_epoch: int
    params: dict[str, float] = field(default_factory=dict)


class Pbt:
    """The scheduler of one population; `ranges` bound the mutable hyperparameters of the study's space."""

    def __init__(self, config: PbtConfig, ranges: Mapping[str, Range], *, maximize: bool) -> None:
        missing = [name for name in config.mutable if name not in ranges]
        if missing:
            raise ValueError(f"no range for mutable hyperparameters {missing}")
        self.config = config
        self.ranges = ranges
        self.maximize = maximize

    def due(self, member: Member) -> bool:
        """Whether `member` has trained `interval_epochs` since it started or last copied a checkpoint."""
        return member.epoch - member.changed_at >= self.config.interval_epochs

    def on_epoch(self, member: Member, population: Sequence[Member], rng: random.Random) -> Keep | Exploit:
        """After `member` recorded an epoch: keep training, or exploit a top member and explore from it.

        `population` holds every member's latest record (`member` among them). Members that have not yet
        recorded an epoch are not ranked. The bottom and top take ceil(n * quantile) members each, at most
        half the population, as Ray Tune does.
        """
        if not self.due(member):
            return Keep()
        reporting = [m for m in population if m.epoch > 0]
        order = ranked(reporting, lambda m: m.value, maximize=self.maximize)
        count = min(math.ceil(len(order) * self.config.quantile), len(order) // 2)
        if count == 0 or member.number not in {m.number for m in order[len(order) - count:]}:
            return Keep()
        source = rng.choice(order[:count])
        return Exploit(member=member.number, epoch=member.epoch, source=source.number,
                       source_epoch=source.epoch, params=self.explore(source.params, rng))

    def explore(self, params: Mapping[str, float], rng: random.Random) -> dict[str, float]:
        """The source's values, each mutable one resampled or perturbed; the others copied as they are."""
        out = dict(params)
        for name in self.config.mutable:
            if name not in params:  # e.g. momentum under adam: not a hyperparameter of this member
                continue
            bounds = self.ranges[name]
            if rng.random() < self.config.resample_probability:
                out[name] = bounds.sample(rng)
            else:
                out[name] = bounds.clip(params[name] * rng.choice(self.config.perturb))
        return out


def schedules(starts: Mapping[int, Mapping[str, float]],
              steps: Sequence[Exploit]) -> dict[int, list[tuple[int, dict[str, float]]]]:
    """Each member's hyperparameter schedule, replayed from its starting values and the lineage steps.

    A schedule is a list of (epoch, values): the values in force after that epoch. `steps` are in the order
    they happened. A member that copies a checkpoint inherits the source's schedule up to the copied epoch,
    so the schedule of the best member is the one that produced its weights.
    """
    out = {number: [(0, dict(params))] for number, params in starts.items()}
    for step in steps:
        inherited = [(epoch, params) for epoch, params in out[step.source] if epoch < step.source_epoch]
        out[step.member] = [*inherited, (step.source_epoch, dict(step.params))]
    return out
