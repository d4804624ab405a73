"""A study's scheduler settings: ASHA with promotion or PBT, validated once (a bad one is a 422)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from app.schemas.common import Strict

# The hyperparameters a running trial can change without rebuilding its network or its data order.
MUTABLE = ("learning_rate", "weight_decay", "momentum", "dropout")


class AshaConfig(Strict):
    """Asynchronous successive halving with promotion (Li et al. 2018): rungs at r, r*eta, r*eta^2, ... < R."""

    name: Literal["asha"]
    min_epochs: int = Field(1, ge=1, le=1000, description="r: the first rung, in epochs.")
    reduction_factor: int = Field(3, ge=2, le=10, description="eta: the top 1/eta of a rung is promoted.")
    max_epochs: int = Field(..., ge=2, le=1000, description="R: the epochs of a fully trained trial.")

    @model_validator(mode="after")
    def _rungs_fit(self) -> AshaConfig:
        if self.min_epochs >= self.max_epochs:
            raise ValueError(f"min_epochs ({self.min_epochs}) must be below max_epochs ({self.max_epochs})")
        return self

    @property
    def rungs(self) -> tuple[int, ...]:
        """The epochs at which a trial pauses, lowest first; max_epochs is where it ends, not a rung."""
        levels, level = [], self.min_epochs
        while level < self.max_epochs:
            levels.append(level)
            level *= self.reduction_factor
        return tuple(levels)


class PbtConfig(Strict):
    """Population-based training (Jaderberg et al. 2017) with Ray Tune's defaults."""

    name: Literal["pbt"]
    population: int = Field(..., ge=2, le=1000, description="Members training at once.")
    interval_epochs: int = Field(..., ge=1, le=1000, description="Epochs between exploit/explore steps.")
    quantile: float = Field(0.25, gt=0, le=0.5, description="The bottom fraction copies the top fraction.")
    perturb: tuple[float, float] = Field((0.8, 1.2), description="Factors a kept value is multiplied by.")
    resample_probability: float = Field(0.25, ge=0, le=1, description="Chance a value is drawn afresh.")
    mutable: tuple[str, ...] = Field(("learning_rate",), min_length=1, max_length=len(MUTABLE),
                                     description=f"Hyperparameters that may change: any of {', '.join(MUTABLE)}.")

    @model_validator(mode="after")
    def _sane(self) -> PbtConfig:
        low, high = self.perturb
        if not 0 < low < high:
            raise ValueError(f"perturb must be two factors 0 < low < high, got {list(self.perturb)}")
        fixed = [name for name in self.mutable if name not in MUTABLE]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change during training; "
                             f"mutable hyperparameters are {', '.join(MUTABLE)}")
        if len(set(self.mutable)) != len(self.mutable):
            raise ValueError(f"mutable lists a hyperparameter twice: {list(self.mutable)}")
        return self


SchedulerConfig = Annotated[AshaConfig | PbtConfig, Field(discriminator="name")]
