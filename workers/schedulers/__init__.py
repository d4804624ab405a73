"""Schedulers that pause, promote and copy trials: pure decisions over a study's recorded facts.

No database and no torch here: the worker builds the facts from its tables and carries out the decision
(pause, resume from a checkpoint, copy a checkpoint), and `benchmarks/lcbench.py` replays the same
decisions against a simulated clock.
"""

from __future__ import annotations

from app.schemas.scheduler import MUTABLE, AshaConfig, PbtConfig, SchedulerConfig
from workers.schedulers.asha import Asha, EpochDecision, Job, NewTrial, Promote, TrialFacts
from workers.schedulers.pbt import Exploit, Keep, Member, Pbt, Range, schedules

__all__ = ["MUTABLE", "Asha", "AshaConfig", "EpochDecision", "Exploit", "Job", "Keep", "Member", "NewTrial",
           "Pbt", "PbtConfig", "Promote", "Range", "SchedulerConfig", "TrialFacts", "schedules"]
