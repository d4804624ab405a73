"""StudySpec: what a client submits; StudyPublic: what it reads back."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.schemas.common import Public, Strict, did_you_mean
from app.schemas.scheduler import PbtConfig, SchedulerConfig

if TYPE_CHECKING:
    from app.ml.space import Hyperparameter, SpaceError

CLASSIFICATION_METRICS = ("val_accuracy", "val_loss")
REGRESSION_METRICS = ("val_mse", "val_mae", "val_loss")
COST_METRICS = ("param_count", "inference_ms")  # extra objectives of multi-objective studies
MAXIMIZED = {"val_accuracy"}
KEEP_BEST_K = 3  # completed trials that keep their checkpoint under keep_checkpoints "best_k"

# Any plain name after the prefix: the service answers an unknown one with the names that exist.
DATASET_REFERENCE = re.compile(r"(builtin|dataset|plugin):[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
Scalar = StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=64)]


class SpecRuleError(ValueError):
    """A rule across several fields of a spec is broken; loc names the field to change."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class FloatRange(Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class IntRange(Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False


class Choices(Strict):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1, max_length=64)


def _entry_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "missing-type"))
    return "value" if not isinstance(value, FloatRange | IntRange | Choices) else value.type


# A range or choices object (by its "type"), or a fixed value; errors name exactly the part that is wrong.
SpaceEntry = Annotated[
    Annotated[FloatRange, Tag("float")] | Annotated[IntRange, Tag("int")] | Annotated[Choices, Tag("categorical")]
    | Annotated[Scalar, Tag("value")],
    Discriminator(_entry_kind, custom_error_type="invalid_entry",
                  custom_error_message="give a fixed value or an object with type float, int or categorical"),
]


class Objective(Strict):
    # Any name here: which metrics apply depends on the task, so StudySpec.metric_errors refuses a wrong one
    # once, at objective.metric, listing the task's metrics (a Literal gave two errors and no such list).
    metric: str = Field(max_length=64, description="val_accuracy or val_loss (classification); val_mse, "
                        "val_mae or val_loss (regression); param_count or inference_ms as extra objectives")
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _default_direction(self) -> Objective:
        if self.direction is None:
            self.direction = "maximize" if self.metric in MAXIMIZED else "minimize"
        return self


def _option_applies(option: str, value: Any, info: ValidationInfo, owners: dict[str, tuple[str, ...]]) -> Any:
    """Refuse an option the named algorithm would silently ignore."""
    name = info.data.get("name")
    if value is not None and name is not None and name not in owners[option]:
        raise ValueError(f"{option} applies only to {', '.join(owners[option])}, not to {name}")
    return value


# Which sampler or pruner reads each option.
SAMPLER_OPTIONS = {"n_startup_trials": ("tpe", "cmaes", "gp"), "multivariate": ("tpe",),
                   "population_size": ("nsga2",), "qmc_type": ("qmc",)}
PRUNER_OPTIONS = {"n_startup_trials": ("median", "percentile"), "n_warmup_steps": ("median", "percentile"),
                  "percentile": ("percentile",), "min_resource": ("successive_halving", "hyperband"),
                  "reduction_factor": ("successive_halving", "hyperband")}
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)  # Optuna's CmaEsSampler refuses multi-objective studies


class SamplerSpec(Strict):
    name: Literal["random", "grid", "tpe", "cmaes", "gp", "qmc", "nsga2"] = "tpe"
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    n_startup_trials: int | None = Field(None, ge=0, le=1000, description="Random trials before the model "
                                         "takes over (tpe, cmaes, gp).")
    multivariate: bool | None = Field(None, description="tpe: model parameters jointly.")
    population_size: int | None = Field(None, ge=2, le=1000, description="nsga2: individuals per generation.")
    qmc_type: Literal["sobol", "halton"] | None = Field(None, description="qmc: the low-discrepancy series.")

    @field_validator(*SAMPLER_OPTIONS)
    @classmethod
    def _applies(cls, value: Any, info: ValidationInfo) -> Any:
        return _option_applies(str(info.field_name), value, info, SAMPLER_OPTIONS)


class PrunerSpec(Strict):
    name: Literal["none", "median", "percentile", "successive_halving", "hyperband"] = "median"
    n_startup_trials: int | None = Field(None, ge=0, le=1000)
    n_warmup_steps: int | None = Field(None, ge=0, le=1000)
    percentile: float | None = Field(None, gt=0, lt=100)
    min_resource: int | None = Field(None, ge=1, le=1000)
    reduction_factor: int | None = Field(None, ge=2, le=10)

    @field_validator(*PRUNER_OPTIONS)
    @classmethod
    def _applies(cls, value: Any, info: ValidationInfo) -> Any:
        return _option_applies(str(info.field_name), value, info, PRUNER_OPTIONS)


class Budget(Strict):
    n_trials: int = Field(20, ge=1, le=1_000_000)
    timeout_s: float | None = Field(None, gt=0, le=30 * 86400)
    max_parallel: int = Field(4, ge=1, le=256)
    epochs: int = Field(10, ge=1, le=1000)
    patience: int | None = Field(5, ge=1, le=1000, description="Early-stopping patience in epochs.")
    max_attempts: int = Field(2, ge=1, le=10)
    trial_timeout_s: float | None = Field(None, gt=0, le=7 * 86400)


class EnsembleSpec(Strict):
    top_k: int = Field(5, ge=1, le=20)
    trees: bool = False


STOP_VALUE_MAX = 1e12  # beyond any accuracy, loss or error a study reports


class StopSpec(Strict):
    target_value: float | None = Field(None, ge=-STOP_VALUE_MAX, le=STOP_VALUE_MAX,
                                       description="Stop once the best complete trial reaches this value.")
    no_improvement_trials: int | None = Field(None, ge=1, le=10_000)
    min_delta: float = Field(0.0, ge=0, le=STOP_VALUE_MAX)
    running: Literal["finish", "cancel"] = Field("finish", description="What happens to running trials when a "
                                                 "criterion (timeout_s included) fires.")


class WarmStartSpec(Strict):
    studies: list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]] = Field(min_length=1, max_length=10)
    top_k: int = Field(5, ge=1, le=100, description="Best configurations of each study to run first.")
    history: bool = Field(False, description="Instead of re-running configurations, add the studies' complete "
                          "and pruned trials (at most 1,000 in all, the best of each first) to the new study's "
                          "history; they must optimize the same objectives.")


class StudySpec(Strict):
    name: str = Field(min_length=1, max_length=200)
    dataset: str = Field(max_length=80, description="builtin:<name> (e.g. builtin:iris), dataset:<id> of an upload, "
                         "or plugin:<name> of an enabled dataset plugin")
    task: Literal["classification", "regression"] = "classification"
    # mlp, cnn or an enabled model plugin's name: which plugins are enabled is the service's to check.
    model: str = Field("mlp", pattern=r"^[a-z][a-z0-9_\-]{0,63}$")
    objective: Objective | list[Objective] = Field(default_factory=lambda: Objective(metric="val_accuracy"))
    search_space: dict[Annotated[str, Field(max_length=64)], SpaceEntry] = Field(default_factory=dict,
                                                                                   max_length=64)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    budget: Budget = Field(default_factory=Budget)
    validation_split: float = Field(0.2, ge=0.05, le=0.5)
    ensemble: EnsembleSpec | None = None
    stop: StopSpec | None = None
    warm_start: WarmStartSpec | None = None
    tensorboard: bool = False
    precision: Literal["fp32", "tf32", "bf16"] | None = Field(
        None, description="arithmetic of training on a GPU: fp32, tf32 (tensor-core matmuls) or bf16 (autocast); "
                          "default bf16 for classification, fp32 for regression; a CPU trains in fp32")
    checkpoint_every: int = Field(1, ge=1, le=1000, description="Epochs between a running trial's checkpoints.")
    keep_checkpoints: Literal["best_k", "all", "none"] = Field(
        "best_k", description="Which completed trials keep their last checkpoint (to extend them later): the "
        "keep_best_k best by the objective, all, or none. Running and paused trials always keep their latest.")
    keep_best_k: int | None = Field(None, ge=1, le=1000, description=f"{KEEP_BEST_K} when not given.")
    scheduler: SchedulerConfig | None = Field(
        None, description="asha: asynchronous successive halving with promotion: trials pause with their "
        "checkpoint at rungs of min_epochs * reduction_factor^k epochs, and a free slot resumes one in the top "
        "1/reduction_factor of its rung before it starts a new trial; max_epochs must be budget.epochs. pbt: "
        "population-based training: population (= budget.n_trials) members train side by side; every "
        "interval_epochs the bottom quantile continues from a top member's checkpoint with perturbed or resampled "
        "mutable hyperparameters (no pruner, no early stopping).")

    @field_validator("keep_best_k")
    @classmethod
    def _best_k_applies(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("keep_checkpoints", "best_k") != "best_k":
            raise ValueError(f"keep_best_k applies only to keep_checkpoints 'best_k', not "
                             f"{info.data['keep_checkpoints']!r}")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_reference(cls, v: str) -> str:
        if not DATASET_REFERENCE.fullmatch(v):
            hint = f"; did you mean builtin:{v}?" if re.fullmatch(r"[A-Za-z0-9_]{1,40}", v) else ""
            raise ValueError("name a dataset as builtin:<name> (e.g. builtin:iris), dataset:<id> of an upload "
                             f"or plugin:<name>{hint}")
        return v

    @field_validator("objective")
    @classmethod
    def _objectives_distinct(cls, v: Objective | list[Objective]) -> Objective | list[Objective]:
        if isinstance(v, list):
            if not 1 <= len(v) <= 4:
                raise ValueError("give 1 to 4 objectives")
            if len({o.metric for o in v}) != len(v):
                raise ValueError("objectives must be distinct metrics")
        return v

    @model_validator(mode="after")
    def _metrics_fit_task(self) -> StudySpec:
        objs = self.objectives
        if self.budget.max_parallel > self.budget.n_trials:
            self.budget.max_parallel = self.budget.n_trials
        if (len(objs) > 1 or isinstance(self.scheduler, PbtConfig)) and "pruner" not in self.model_fields_set:
            self.pruner = PrunerSpec(name="none")  # the default pruner cannot prune several objectives, nor pbt's
        return self

    # ---- derived facts, decided here once: readers never rebuild them from the stored dict ----

    @property
    def objectives(self) -> list[Objective]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    @property
    def primary(self) -> Objective:
        """The first objective: the one the best trial, pruning, early stopping and the ensemble follow."""
        return self.objectives[0]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def maximize(self) -> bool:
        return self.primary.direction == "maximize"

    @property
    def seed(self) -> int:
        """The study's seed (0 when none was given): splits, per-trial seeds and the sampler derive from it."""
        return self.sampler.seed or 0

    def trial_timeout_s(self, default_s: float) -> float:
        """One attempt's wall-clock limit: the spec's, else the worker's default."""
        return float(self.budget.trial_timeout_s or default_s)

    @property
    def cancels_running_trials(self) -> bool:
        """A fired stop criterion (the study's timeout included) also ends running trials."""
        return self.stop is not None and self.stop.running == "cancel"

    @property
    def checkpoints_best_k(self) -> int:
        return self.keep_best_k or KEEP_BEST_K

    @property
    def ensemble_top_k(self) -> int:
        return self.ensemble.top_k if self.ensemble is not None else EnsembleSpec().top_k

    def resolved_space(self, description: dict[str, Any],
                       table: tuple[Hyperparameter, ...] | None) -> dict[str, Any]:
        """Distributions or fixed values of every hyperparameter that applies over the described dataset.

        table is the model plugin's hyperparameter table (app.plugins.table_for), None for a built-in model.
        Raises app.ml.space.SpaceError for an entry that is unknown or does not apply.
        """
        from app.ml.space import Context, resolve_space  # Optuna's distributions: not for the client's import

        return resolve_space(self.space_entries(), Context.of(description, self.model, table))

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> StudySpec:
        """The typed spec of a stored study (it was validated and dumped by this class)."""
        return cls.model_validate(stored)

    def metric_errors(self) -> list[SpecRuleError]:
        """Each objective whose metric the task lacks (the first may not be a cost metric), at objective.metric
        (objective.<i>.metric for several), listing the allowed names."""
        allowed = CLASSIFICATION_METRICS if self.task == "classification" else REGRESSION_METRICS
        out = []
        for i, o in enumerate(self.objectives):
            fits = allowed if i == 0 else allowed + COST_METRICS
            if o.metric not in fits:
                loc: tuple[str | int, ...] = ("objective", "metric") if i == 0 and not isinstance(
                    self.objective, list) else ("objective", i, "metric")
                out.append(SpecRuleError(loc, f"unknown metric {o.metric!r} for task {self.task!r}"
                                         f"{did_you_mean(o.metric, list(fits))}: use one of {', '.join(fits)}"))
        return out

    def algorithm_errors(self) -> list[SpecRuleError]:
        """Metrics, sampler and pruner settings that cannot work with this spec's task, objectives and budget,
        each naming the field to change (the service turns them into one 422)."""
        out = self.metric_errors()
        multi, epochs, pruner = len(self.objectives) > 1, self.budget.epochs, self.pruner
        if multi and self.sampler.name in SINGLE_OBJECTIVE_SAMPLERS:
            out.append(SpecRuleError(("sampler", "name"), f"{self.sampler.name} optimizes a single objective; "
                                     "for several use nsga2, tpe, gp, qmc, random or grid"))
        if multi and pruner.name != "none":
            out.append(SpecRuleError(("pruner", "name"),
                                     "Optuna cannot prune multi-objective studies: set pruner.name to 'none'"))
        if pruner.min_resource is not None and pruner.min_resource > epochs:
            out.append(SpecRuleError(("pruner", "min_resource"),
                                     f"min_resource ({pruner.min_resource}) exceeds budget.epochs ({epochs})"))
        if pruner.n_warmup_steps is not None and pruner.n_warmup_steps >= epochs:
            out.append(SpecRuleError(("pruner", "n_warmup_steps"), f"with budget.epochs {epochs} a warm-up of "
                                     f"{pruner.n_warmup_steps} steps leaves only the last epoch to prune at"))
        return out + self.scheduler_errors()

    def scheduler_pauses(self) -> tuple[int, ...]:
        """The epochs at which the scheduler pauses trials: ASHA's rungs, PBT's interval boundaries; () without."""
        scheduler = self.scheduler
        if isinstance(scheduler, PbtConfig):
            return tuple(range(scheduler.interval_epochs, self.budget.epochs, scheduler.interval_epochs))
        return scheduler.rungs if scheduler is not None else ()

    def scheduler_errors(self) -> list[SpecRuleError]:
        scheduler = self.scheduler
        if scheduler is None:
            return []
        out = []
        if len(self.objectives) > 1:
            out.append(SpecRuleError(("scheduler", "name"),
                                     f"{scheduler.name} ranks trials by one objective: give one"))
        if isinstance(scheduler, PbtConfig):
            return out + self._pbt_errors(scheduler)
        if scheduler.max_epochs != self.budget.epochs:
            out.append(SpecRuleError(("scheduler", "max_epochs"), f"max_epochs ({scheduler.max_epochs}) must be "
                                     f"budget.epochs ({self.budget.epochs}): the epochs of a fully trained trial"))
        return out

    def _pbt_errors(self, pbt: PbtConfig) -> list[SpecRuleError]:
        from app.ml.space import MODELS, Context, SpaceError, resolve_space

        out = []
        if pbt.population != self.budget.n_trials:
            out.append(SpecRuleError(("scheduler", "population"), f"population ({pbt.population}) must be "
                                     f"budget.n_trials ({self.budget.n_trials}): each member is one trial"))
        if pbt.interval_epochs >= self.budget.epochs:
            out.append(SpecRuleError(("scheduler", "interval_epochs"), f"interval_epochs ({pbt.interval_epochs}) "
                                     f"must be below budget.epochs ({self.budget.epochs})"))
        if "pruner" in self.model_fields_set and self.pruner.name != "none":
            out.append(SpecRuleError(("pruner", "name"), "pbt replaces its worst members instead of stopping "
                                     "them: set pruner.name to 'none' (the default with pbt)"))
        if self.model not in MODELS:
            out.append(SpecRuleError(("scheduler", "name"), f"pbt changes hyperparameters inside hpsearch's "
                                     f"training loop: use model mlp or cnn, not {self.model!r}"))
            return out
        try:
            space = resolve_space(self.space_entries(), Context(model=self.model))
        except SpaceError:
            return out  # the space's own errors are reported with the dataset at hand
        for i, name in enumerate(pbt.mutable):
            if not hasattr(space.get(name), "low"):
                out.append(SpecRuleError(("scheduler", "mutable", i), f"{name} is not searched by this study's "
                                         "space: pbt explores only hyperparameters with a range"))
        return out

    def space_errors(self, description: dict[str, Any],
                     table: tuple[Hyperparameter, ...] | None) -> list[SpaceError]:
        """Every SpaceError resolved_space would raise first, for one answer that lists them all."""
        from app.ml.space import Context, space_errors

        return space_errors(self.space_entries(), Context.of(description, self.model, table))

    def space_entries(self) -> dict[str, Any]:
        """Entries in the plain form app.ml.space expects."""
        out: dict[str, Any] = {}
        for name, entry in self.search_space.items():
            out[name] = entry.model_dump(exclude={"type"}) if isinstance(entry, Strict) else entry
        return out


class Progress(Public):
    n_trials: int
    waiting: int = 0
    running: int = 0
    paused: int = 0
    complete: int = 0
    pruned: int = 0
    fail: int = 0
    finished: int = 0


class BestTrial(Public):
    number: int
    value: float | None
    values: list[float] | None = None
    params: dict[str, Any]


class StudyPublic(Public):
    id: str
    name: str
    status: str
    dataset: str
    model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_s: float | None
    stop_reason: str | None
    stopped_at: datetime | None = Field(description="When the criterion in stop_reason fired (for n_trials "
                                                    "and cancelled, when the study ended).")
    error: str | None
    progress: Progress
    best_trial: BestTrial | None
    test_metrics: dict[str, Any] | None
    checkpoint_bytes: int = Field(0, description="Bytes of the checkpoints the study's trials hold: each running "
                                  "trial's latest and the completed trials' that keep_checkpoints keeps.")
    spec: dict[str, Any]


class StudiesPublic(Public):
    data: list[StudyPublic]
    count: int
    next_cursor: str | None
