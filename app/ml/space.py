"""The documented hyperparameter space: one table for the API, spec validation and the trainer.

A study's `search_space` entries narrow a range, restrict choices or fix a value; omitted entries take the
documented default. `resolve_space` turns a spec into concrete distributions, `sample_params` draws one
configuration through an Optuna trial, and `check_params` validates a configuration a client enqueues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna.distributions as od

from app.schemas.common import did_you_mean

MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class Context:
    """What decides which hyperparameters apply to a study."""

    model: str
    image: bool = False
    feature_groups: bool = False
    table: tuple[Hyperparameter, ...] | None = None  # a model plugin's own table; None: the documented SPACE

    @classmethod
    def of(cls, description: dict[str, Any], model: str,
           table: tuple[Hyperparameter, ...] | None = None) -> Context:
        """The context of a model over a dataset, from the dataset's description."""
        return cls(model=model, image=description.get("image_shape") is not None,
                   feature_groups=bool(description.get("groups")), table=table)


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    kind: str  # "int" | "float" | "categorical"
    default: dict[str, Any]  # {"low", "high", "log"} or {"choices"}
    note: str
    source: str
    domain: tuple[float, float] | None = None  # numeric: the widest range a study may use
    allowed: tuple[Any, ...] | None = None  # categorical: the documented choices
    models: tuple[str, ...] = MODELS
    condition: str | None = None
    model_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def applies(self, ctx: Context) -> bool:
        if ctx.model not in self.models:
            return False
        if self.name == "augmentation":
            return ctx.image
        if self.name == "branch_merge":
            return ctx.feature_groups
        return True

    @property
    def integer(self) -> bool:
        """Takes whole numbers only: an int range, or numeric choices that are all ints (batch_size)."""
        choices = self.default.get("choices", ())
        return self.kind == "int" or (self.kind == "categorical" and self.domain is not None and bool(choices)
                                      and all(isinstance(c, int) and not isinstance(c, bool) for c in choices))

    def default_for(self, model: str) -> dict[str, Any]:
        return self.model_defaults.get(model, self.default)

    def describe(self, model: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.kind, **self.default_for(model)}
        if self.domain is not None:
            out["domain"] = list(self.domain)
        if self.allowed is not None:
            out["allowed"] = list(self.allowed)
        out.update(condition=self.condition, note=self.note, source=self.source)
        return out


def _num(name: str, kind: str, low: float, high: float, log: bool, domain: tuple[float, float], note: str,
         source: str, **kw: Any) -> Hyperparameter:
    return Hyperparameter(name, kind, {"low": low, "high": high, "log": log}, note, source, domain=domain, **kw)


def _cat(name: str, choices: tuple[Any, ...], note: str, source: str, **kw: Any) -> Hyperparameter:
    return Hyperparameter(name, "categorical", {"choices": list(choices)}, note, source, allowed=choices, **kw)


SPACE: tuple[Hyperparameter, ...] = (
    _num("n_layers", "int", 1, 4, False, (1, 8), "How many hidden layers (mlp) or conv blocks (cnn) to stack.",
         "Capacity: more layers fit more complex functions, but overfit sooner and train slower.",
         model_defaults={"cnn": {"low": 1, "high": 3, "log": False}}),
    _num("units", "int", 32, 512, True, (1, 4096), "Width of a hidden dense layer (the head of a cnn).",
         "Capacity: wider layers fit more; widths matter by ratio, so the range is searched on a log scale."),
    _cat("layer_shape", ("constant", "funnel"), "funnel halves the width per layer (256→128→64).",
         "A funnel compresses towards the output with fewer weights than constant width.", models=("mlp",)),
    _cat("activation", ("relu", "tanh", "sigmoid", "silu"), "Nonlinearity; silu is swish.",
         "Saturating sigmoid and tanh shrink gradients in deep stacks; relu and silu do not."),
    _cat("batch_norm", ("none", "before_activation", "after_activation"),
         "Batch normalization around the activation; Dense → BN → activation is the classic block.",
         "Normalizing activations per batch steadies and speeds up training; where it goes is debated."),
    _num("dropout", "float", 0.0, 0.5, False, (0.0, 0.9), "Dropout rate, applied in training only.",
         "Regularization: dropping units at random keeps them from co-adapting, against overfitting."),
    _num("weight_decay", "float", 1e-8, 1e-2, True, (0.0, 1.0), "L2 penalty on the weights.",
         "Regularization: an L2 penalty keeps weights small, against overfitting."),
    _cat("weight_init", ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "normal"),
         "Initial weights; normal = N(0, 1.0); biases start at zero.",
         "He initialization suits relu, Glorot suits tanh and sigmoid; a bad scale stalls training."),
    _cat("optimizer", ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"),
         "The update rule.",
         "Adaptive methods (Adam, RMSProp) need less tuning; SGD with momentum often generalizes well."),
    _num("momentum", "float", 0.5, 0.99, False, (0.0, 0.999), "Momentum of SGD.",
         "Momentum averages past gradients, speeding progress along consistent directions.",
         condition="optimizer in [momentum, nesterov]"),
    _num("learning_rate", "float", 1e-5, 1e-1, True, (1e-7, 10.0), "Step size, sampled on a log scale.",
         "The most important hyperparameter; good values span decades, so sample it on a log scale."),
    _cat("lr_schedule", ("constant", "step", "plateau", "cosine"),
         "step halves every 5 epochs; plateau halves on a flat validation loss; cosine anneals.",
         "Lowering the learning rate late in training (or when validation loss stalls) refines the fit."),
    Hyperparameter("batch_size", "categorical", {"choices": [32, 64, 128, 256]}, "Samples per update.",
                   "Small batches are noisy but regularize; large ones are faster per epoch and need a larger step.",
                   domain=(1, 65536)),
    _cat("augmentation", ("none", "light"), "Images only: small random shifts, rotations and noise.",
         "Data augmentation: perturbed copies of training images teach invariance and reduce overfitting.",
         condition="image datasets"),
    _num("filters", "int", 16, 128, True, (1, 1024), "Channels of the first conv block; doubled per block.",
         "Capacity of a convolutional network: more filters detect more features.", models=("cnn",)),
    Hyperparameter("kernel_size", "categorical", {"choices": [3, 5]}, "Convolution kernel size.",
                   "Larger kernels see more context per layer at a higher cost.",
                   allowed=(1, 3, 5, 7), models=("cnn",)),
    _cat("separable", (False, True), "Depthwise separable convolution: per-channel conv, then 1x1.",
         "Separable convolutions need far fewer weights and operations for similar accuracy.", models=("cnn",)),
    _cat("branch_merge", ("concat", "add"), "One sub-network per feature group, merged.",
         "Multi-input models: a sub-network per group of related features, merged before the output.",
         models=("mlp",), condition="datasets with feature groups"),
)
BY_NAME = {hp.name: hp for hp in SPACE}
CONDITIONAL_ON_OPTIMIZER = {"momentum": ("momentum", "nesterov")}


class SpaceError(ValueError):
    """A search-space entry or an enqueued configuration breaks a rule; `loc` names the field."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def describe_space(model: str, table: tuple[Hyperparameter, ...] | None = None) -> list[dict[str, Any]]:
    return [hp.describe(model) for hp in (table or SPACE) if model in hp.models]


# ---- resolving a spec into distributions -------------------------------------------------------------


def resolve_space(entries: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Distributions (or fixed values) for every hyperparameter that applies in ctx; the first SpaceError."""
    resolved, problems = _resolve_all(entries, ctx)
    if problems:
        raise problems[0]
    return resolved


def space_errors(entries: dict[str, Any], ctx: Context) -> list[SpaceError]:
    """Every error resolve_space would find, so that a client fixes them in one go."""
    return _resolve_all(entries, ctx)[1]


def _resolve_all(entries: dict[str, Any], ctx: Context) -> tuple[dict[str, Any], list[SpaceError]]:
    if problems := name_errors(entries, ctx):
        return {}, problems
    resolved: dict[str, Any] = {}
    for hp in ctx.table or SPACE:
        if hp.applies(ctx):
            try:
                resolved[hp.name] = _resolve_entry(hp, entries.get(hp.name, hp.default_for(ctx.model)))
            except SpaceError as exc:
                problems.append(exc)
    if not problems:
        try:
            _drop_unreachable_conditions(resolved, entries)
        except SpaceError as exc:
            problems.append(exc)
    return resolved, problems


def name_errors(entries: dict[str, Any], ctx: Context) -> list[SpaceError]:
    """One error per entry that names no hyperparameter, or one that does not apply in ctx; each lists the
    names that do apply (to this model over this dataset) and the closest of them."""
    table = ctx.table or SPACE
    by_name = {hp.name: hp for hp in table}
    applicable = [hp.name for hp in table if hp.applies(ctx)]
    out = []
    for name in entries:
        hp = by_name.get(name)
        if hp is None:
            out.append(SpaceError((name,), f"unknown hyperparameter{did_you_mean(name, applicable)}; "
                                  f"{ctx.model} takes {', '.join(applicable)}"))
        elif not hp.applies(ctx):
            out.append(SpaceError((name,), f"does not apply to model {ctx.model!r} with this dataset; "
                                  f"it takes {', '.join(applicable)}"))
    return out


def _drop_unreachable_conditions(resolved: dict[str, Any], entries: dict[str, Any]) -> None:
    """Leave out a conditional entry that no allowed optimizer activates; refuse it when the spec names it.

    Without this, a study fixed to adam would still carry momentum's default range, which a grid cannot hold.
    """
    optimizer = resolved.get("optimizer")
    possible = list(optimizer.choices) if isinstance(optimizer, od.CategoricalDistribution) else [optimizer]
    for name, parents in CONDITIONAL_ON_OPTIMIZER.items():
        if name not in resolved or set(possible) & set(parents):
            continue
        if name in entries:
            raise SpaceError((name,), f"applies only when optimizer is one of {list(parents)}; "
                                      f"this study's optimizer is one of {possible}")
        del resolved[name]


def _resolve_entry(hp: Hyperparameter, entry: Any) -> Any:
    if not isinstance(entry, dict):
        _check_value(hp, entry, (hp.name,))
        return entry  # a fixed value
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError((hp.name, "choices"), "must be a non-empty list")
        for i, choice in enumerate(choices):
            _check_value(hp, choice, (hp.name, "choices", i))
        return od.CategoricalDistribution(choices)
    if hp.kind == "categorical" and hp.domain is None:
        raise SpaceError((hp.name,), "is categorical: give 'choices' or a fixed value")
    return _resolve_range(hp, entry)


def _resolve_range(hp: Hyperparameter, entry: dict[str, Any]) -> od.BaseDistribution:
    low, high, log = entry.get("low"), entry.get("high"), bool(entry.get("log", False))
    for key, v in (("low", low), ("high", high)):
        _check_value(hp, v, (hp.name, key), numeric=True)
    assert low is not None and high is not None
    if low > high:
        raise SpaceError((hp.name,), f"low ({low}) is greater than high ({high})")
    if log and low <= 0:
        raise SpaceError((hp.name, "low"), "a log range must stay above 0")
    if hp.integer:  # 16.0 is 16: a float range of an integer hyperparameter must not sample 37.4
        return od.IntDistribution(int(low), int(high), log=log)
    return od.FloatDistribution(float(low), float(high), log=log)


def _check_value(hp: Hyperparameter, value: Any, loc: tuple[str | int, ...], numeric: bool = False) -> None:
    if hp.allowed is not None and not numeric:
        if isinstance(value, bool) != isinstance(hp.allowed[0], bool) or value not in hp.allowed:
            raise SpaceError(loc, f"must be one of {list(hp.allowed)}, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpaceError(loc, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SpaceError(loc, "must be finite")
    if hp.integer:
        if float(value) != int(value):
            raise SpaceError(loc, f"must be an integer, got {value!r}")
    assert hp.domain is not None
    lo, hi = hp.domain
    if not lo <= value <= hi:
        raise SpaceError(loc, f"must be within [{lo}, {hi}], got {value!r}")


# ---- sampling and checking configurations -------------------------------------------------------------


def _active(name: str, params: dict[str, Any]) -> bool:
    parents = CONDITIONAL_ON_OPTIMIZER.get(name)
    return parents is None or params.get("optimizer") in parents


def sample_params(trial: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    """Draw one configuration through an Optuna trial; conditional entries only where they apply."""
    params: dict[str, Any] = {}
    for name, dist in resolved.items():  # table order: optimizer precedes momentum
        if not _active(name, params):
            continue
        if isinstance(dist, od.BaseDistribution):
            params[name] = _suggest(trial, name, dist)
        else:
            params[name] = dist
    return params


def _suggest(trial: Any, name: str, dist: od.BaseDistribution) -> Any:
    if isinstance(dist, od.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, od.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    assert isinstance(dist, od.FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def sampled_distributions(resolved: dict[str, Any], params: dict[str, Any]) -> dict[str, od.BaseDistribution]:
    """The Optuna distributions of the entries of params that a sampler decides."""
    return {k: d for k, d in resolved.items() if isinstance(d, od.BaseDistribution) and k in params}


def check_params(params: dict[str, Any], resolved: dict[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """Validate a client's configuration against a resolved space; fixed entries are filled in.

    With partial=True missing sampled entries are allowed (the sampler fills them).
    """
    for name in params:
        if name not in resolved:
            raise SpaceError((name,), "not in this study's search space")
    out: dict[str, Any] = {}
    for name, dist in resolved.items():
        value = params.get(name)
        if not _active(name, {**params, **out}):
            if value is not None:
                raise SpaceError((name,), f"applies only when optimizer is one of {CONDITIONAL_ON_OPTIMIZER[name]}")
            continue
        if not isinstance(dist, od.BaseDistribution):
            if value is not None and value != dist:
                raise SpaceError((name,), f"is fixed to {dist!r} in this study")
            out[name] = dist
            continue
        if value is None:
            if partial:
                continue
            raise SpaceError((name,), "missing")
        if not _in_distribution(dist, value):
            raise SpaceError((name,), f"{value!r} is outside this study's space {_dist_text(dist)}")
        out[name] = value
    return out


def _in_distribution(dist: od.BaseDistribution, value: Any) -> bool:
    if isinstance(dist, od.CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in dist.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(dist, od.IntDistribution) and int(value) != value:
        return False
    return in_range(dist, value)


def in_range(dist: od.BaseDistribution, value: Any) -> bool:
    """Whether a number lies in an int or float distribution's range, on its step (Optuna's own check is
    private); False for any other distribution."""
    if isinstance(dist, od.IntDistribution):
        return dist.low <= value <= dist.high and (value - dist.low) % dist.step == 0
    if isinstance(dist, od.FloatDistribution):
        if not dist.low <= value <= dist.high:
            return False
        return dist.step is None or abs((value - dist.low) / dist.step - round((value - dist.low) / dist.step)) < 1e-8
    return False


def _dist_text(dist: od.BaseDistribution) -> str:
    if isinstance(dist, od.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    assert isinstance(dist, od.IntDistribution | od.FloatDistribution)
    return f"[{dist.low}, {dist.high}]"


GRID_MAX_POINTS = 100_000


def grid_space(resolved: dict[str, Any]) -> dict[str, list[Any]]:
    """The finite grid of a resolved space: every sampled entry must be categorical or a small int range.

    SpaceError names the first entry that is a continuous (or log) range.
    """
    grid: dict[str, list[Any]] = {}
    points = 1
    for name, dist in resolved.items():
        if isinstance(dist, od.CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, od.IntDistribution) and not dist.log and dist.high - dist.low < 1000:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, od.BaseDistribution):
            raise SpaceError((name,), f"grid search needs choices or a fixed value here, not the range "
                                      f"{_dist_text(dist)}{' (log)' if getattr(dist, 'log', False) else ''}")
        else:
            continue
        points *= len(grid[name])
    if points > GRID_MAX_POINTS:
        raise SpaceError((), f"the grid has {points} points; at most {GRID_MAX_POINTS}")
    return grid
