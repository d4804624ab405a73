"""The ensemble chosen at finalization, and predictions from a study's models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from app.schemas.common import Public, Strict


class EnsembleMember(Public):
    name: str = Field(description="trial-<n> or trees")
    kind: Literal["trial", "trees"]
    trial_number: int | None
    weight: float = Field(description="Share in the average; 0 for a candidate that was never picked.")
    val: dict[str, float] = Field(description="The member alone on the validation split.")


class Scores(Public):
    val: dict[str, float]
    test: dict[str, float]


class BestSingle(Scores):
    trial_number: int


class EnsemblePublic(Public):
    study_id: str
    task: str
    classes: list[str] | None
    input_shape: list[int]
    objective: str
    direction: str
    method: str
    top_k: int = Field(description="Trials that were candidates (the best complete ones).")
    rounds: int
    best_round: int = Field(description="Selection round whose ensemble was kept (1: the best model alone).")
    trees: bool = Field(description="A gradient-boosted trees model was a candidate.")
    note: str | None
    members: list[EnsembleMember] = Field(description="The models averaged: those with a positive weight, as the "
                                          "export holds them.")
    candidates: list[EnsembleMember] = Field(description="Every candidate, picked or not (weight 0), with its "
                                             "validation score.")
    best_single: BestSingle
    ensemble: Scores


class PredictRequest(Strict):
    inputs: list[Any] = Field(description="Rows of raw inputs, each shaped like the model's input_shape: "
                                          "a list of features, or nested lists (C, H, W) for images.")


class PredictionsPublic(Public):
    use: Literal["best", "ensemble"]
    trial_number: int | None = Field(description="The trial whose model answered (None for the ensemble).")
    task: str
    classes: list[str] | None
    predictions: list[Any] = Field(description="A class label per row, or the predicted value(s) per row.")
    probabilities: list[list[float]] | None = Field(description="Per row, one probability per class in "
                                                                "`classes` order (classification only).")
