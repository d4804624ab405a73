"""The study page's first read: a bounded picture of a study of any size."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.schemas.common import Public

ParamKind = Literal["int", "float", "categorical"]


class TopTrials(Public):
    """The best complete trials with their parameters, in columns (index i = one trial), best first."""

    number: list[int]
    value: list[float]
    params: dict[str, list[object | None]]


class HistoryOverviewPublic(Public):
    """Every finished trial's point, or a downsample of them, and the best-so-far line exact.

    Points are `[number, value]` pairs of real trials. Past `points` trials with a value, each state's plot
    is cut into a grid (stretches of numbers x bands of value) and every occupied cell keeps one trial, and
    every stretch its lowest and highest, so the cloud keeps its shape and its extremes; `best` always holds
    every trial that improved on all those numbered before it, so the best-so-far line is the same as drawn
    from every trial.
    """

    objective: str
    direction: Literal["maximize", "minimize"]
    param_names: list[str] = Field(description="Parameters of the top trials, in the documented order.")
    param_kinds: dict[str, ParamKind] = Field(description="int, float or categorical, from the study's space.")
    log_scale: list[str] = Field(description="Numeric parameters sampled on a log scale.")
    searched: list[str] = Field(description="Parameters the spec's search_space gives a range or choices.")
    trials: int = Field(description="Numbered trials in the study.")
    last_number: int | None
    first_open: int | None = Field(description="Lowest number of a trial still running or waiting.")
    with_value: dict[str, int] = Field(description="Complete and pruned trials with a value, by state.")
    sampled: bool = Field(description="True when complete and pruned are downsampled.")
    complete: list[tuple[int, float]]
    pruned: list[tuple[int, float]]
    best: list[tuple[int, float]]
    top: TopTrials
