"""The documented space: resolving specs, conditional sampling, checking configurations, grids, 422s."""

from __future__ import annotations

from typing import Any

import optuna
import optuna.distributions as od
import pytest

from app.core.config import Settings
from app.core.db import Database
from app.ml.space import (
    BY_NAME,
    SPACE,
    Context,
    SpaceError,
    check_params,
    grid_space,
    resolve_space,
    sample_params,
)
from tests.factories import API, client_for, study_spec

MLP = Context("mlp")
MLP_GROUPS = Context("mlp", feature_groups=True)
MLP_IMAGES = Context("mlp", image=True)
CNN = Context("cnn", image=True)
CNN_ONLY = {"filters", "kernel_size", "separable"}


def space_error(entries: dict[str, Any], ctx: Context = MLP) -> SpaceError:
    with pytest.raises(SpaceError) as info:
        resolve_space(entries, ctx)
    return info.value


def sampled(resolved: dict[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n configurations drawn through real Optuna trials, as the supervisor draws them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(sample_params(trial, resolved))
        study.tell(trial, 0.0)
    return out


# ---- which hyperparameters apply --------------------------------------------------------------------


def test_defaults_cover_exactly_the_entries_that_apply() -> None:
    common = {hp.name for hp in SPACE} - CNN_ONLY - {"augmentation", "branch_merge"}
    assert set(resolve_space({}, MLP)) == common
    assert set(resolve_space({}, MLP_GROUPS)) == common | {"branch_merge"}
    assert set(resolve_space({}, MLP_IMAGES)) == common | {"augmentation"}
    assert set(resolve_space({}, CNN)) == (common - {"layer_shape"}) | CNN_ONLY | {"augmentation"}


def test_defaults_are_the_documented_distributions() -> None:
    mlp, cnn = resolve_space({}, MLP_GROUPS), resolve_space({}, CNN)
    assert mlp["learning_rate"] == od.FloatDistribution(1e-5, 1e-1, log=True)
    assert mlp["units"] == od.IntDistribution(32, 512, log=True)
    assert mlp["n_layers"] == od.IntDistribution(1, 4) and cnn["n_layers"] == od.IntDistribution(1, 3)
    assert mlp["momentum"] == od.FloatDistribution(0.5, 0.99)
    assert mlp["batch_size"] == od.CategoricalDistribution([32, 64, 128, 256])
    assert mlp["branch_merge"] == od.CategoricalDistribution(["concat", "add"])
    assert cnn["separable"] == od.CategoricalDistribution([False, True])
    assert cnn["filters"] == od.IntDistribution(16, 128, log=True)


def test_entries_narrow_restrict_or_fix() -> None:
    resolved = resolve_space({"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                              "n_layers": {"low": 2, "high": 3}, "activation": {"choices": ["relu", "silu"]},
                              "dropout": 0.25, "separable": True, "kernel_size": 5}, CNN)
    assert resolved["learning_rate"] == od.FloatDistribution(1e-3, 1e-2, log=True)
    assert resolved["n_layers"] == od.IntDistribution(2, 3)
    assert resolved["activation"] == od.CategoricalDistribution(["relu", "silu"])
    assert (resolved["dropout"], resolved["separable"], resolved["kernel_size"]) == (0.25, True, 5)


def test_a_float_range_of_batch_size_samples_whole_numbers_only() -> None:
    """Recorded == trained: a range written with floats still samples ints, and a fractional bound is refused."""
    resolved = resolve_space({"batch_size": {"low": 16.0, "high": 64.0}}, MLP)
    assert resolved["batch_size"] == od.IntDistribution(16, 64)
    assert all(isinstance(c["batch_size"], int) for c in sampled(resolved, 20))
    assert space_error({"batch_size": {"low": 16.5, "high": 64}}).loc == ("batch_size", "low")


@pytest.mark.parametrize("entries,ctx,loc", [
    ({"wings": 2}, MLP, ("wings",)),
    ({"filters": 32}, MLP, ("filters",)),  # cnn only
    ({"layer_shape": "funnel"}, CNN, ("layer_shape",)),  # mlp only
    ({"branch_merge": "add"}, MLP, ("branch_merge",)),  # no feature groups
    ({"augmentation": "light"}, MLP, ("augmentation",)),  # not images
    ({"learning_rate": {"low": 0.1, "high": 0.01}}, MLP, ("learning_rate",)),
    ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, MLP, ("weight_decay", "low")),
    ({"activation": {"choices": []}}, MLP, ("activation", "choices")),
    ({"activation": {"choices": ["relu", "gelu"]}}, MLP, ("activation", "choices", 1)),
    ({"dropout": 0.99}, MLP, ("dropout",)),
    ({"units": 0}, MLP, ("units",)),
    ({"n_layers": 2.5}, MLP, ("n_layers",)),
    ({"kernel_size": 4}, CNN, ("kernel_size",)),
    ({"separable": 1}, CNN, ("separable",)),  # a number is not a boolean
    ({"optimizer": {"low": 1, "high": 2}}, MLP, ("optimizer",)),
    ({"learning_rate": {"low": 1e-9, "high": 1e-3}}, MLP, ("learning_rate", "low")),  # below the domain
    ({"optimizer": "adam", "momentum": 0.9}, MLP, ("momentum",)),  # momentum never applies to adam
])
def test_refused_entries_name_the_field(entries: dict[str, Any], ctx: Context, loc: tuple[Any, ...]) -> None:
    assert space_error(entries, ctx).loc == loc


def test_momentum_is_left_out_when_no_allowed_optimizer_uses_it() -> None:
    assert "momentum" not in resolve_space({"optimizer": {"choices": ["adam", "sgd"]}}, MLP)
    assert "momentum" in resolve_space({"optimizer": {"choices": ["adam", "nesterov"]}}, MLP)
    kept = resolve_space({"optimizer": "momentum", "momentum": {"low": 0.8, "high": 0.9}}, MLP)
    assert kept["momentum"] == od.FloatDistribution(0.8, 0.9)


# ---- sampling ----------------------------------------------------------------------------------------


def test_momentum_is_sampled_only_for_momentum_and_nesterov() -> None:
    configs = sampled(resolve_space({}, MLP), 60)
    optimizers = {c["optimizer"] for c in configs}
    assert {"momentum", "nesterov"} < optimizers and len(optimizers) >= 5
    for c in configs:
        assert ("momentum" in c) == (c["optimizer"] in ("momentum", "nesterov")), c


def test_sampled_configurations_hold_exactly_the_applicable_entries() -> None:
    for ctx, expected_extra, absent in [
        (MLP, set(), CNN_ONLY | {"augmentation", "branch_merge"}),
        (MLP_GROUPS, {"branch_merge"}, CNN_ONLY | {"augmentation"}),
        (CNN, CNN_ONLY | {"augmentation"}, {"branch_merge", "layer_shape"}),
    ]:
        resolved = resolve_space({"dropout": 0.1}, ctx)
        for c in sampled(resolved, 15):
            assert expected_extra <= set(c) and not absent & set(c)
            assert c["dropout"] == 0.1  # a fixed value is part of every configuration
            assert check_params(c, resolved) == c  # and every sampled configuration is valid


def test_sampled_values_stay_inside_narrowed_ranges() -> None:
    resolved = resolve_space({"learning_rate": {"low": 1e-3, "high": 2e-3, "log": True},
                              "units": {"low": 40, "high": 44}, "batch_size": {"choices": [64]}}, MLP)
    for c in sampled(resolved, 20):
        assert 1e-3 <= c["learning_rate"] <= 2e-3 and 40 <= c["units"] <= 44 and c["batch_size"] == 64
        assert isinstance(c["units"], int)


# ---- checking client configurations -----------------------------------------------------------------


def test_check_params_fills_fixed_values_and_refuses_the_rest() -> None:
    resolved = resolve_space({"optimizer": {"choices": ["adam", "momentum"]}, "dropout": 0.2}, MLP)
    full = sampled(resolved, 1)[0]
    assert check_params({k: v for k, v in full.items() if k != "dropout"}, resolved) == full
    partial = check_params({"optimizer": "adam"}, resolved, partial=True)
    assert partial == {"optimizer": "adam", "dropout": 0.2}
    cases = [
        ({"wings": 1}, ("wings",)),
        ({"dropout": 0.3}, ("dropout",)),  # fixed in this study
        ({"optimizer": "adam", "momentum": 0.9}, ("momentum",)),  # only for momentum/nesterov
        ({"optimizer": "sgd"}, ("optimizer",)),  # not among this study's choices
        ({"units": 4096}, ("units",)),
        ({"units": True}, ("units",)),
        ({"learning_rate": "fast"}, ("learning_rate",)),
    ]
    for params, loc in cases:
        with pytest.raises(SpaceError) as info:
            check_params(params, resolved, partial=True)
        assert info.value.loc == loc, params
    with pytest.raises(SpaceError, match="missing"):
        check_params({"optimizer": "adam"}, resolved)


# ---- grids -------------------------------------------------------------------------------------------


def grid_entries(**extra: Any) -> dict[str, Any]:
    """Every numeric entry fixed or given choices, as a grid study needs."""
    return {"learning_rate": {"choices": [1e-3, 1e-2]}, "units": 32, "n_layers": {"low": 1, "high": 2},
            "dropout": 0.0, "weight_decay": 0.0, "optimizer": {"choices": ["adam", "sgd"]}, **extra}


def test_grid_holds_choices_and_small_int_ranges_not_fixed_values() -> None:
    grid = grid_space(resolve_space(grid_entries(activation="relu"), MLP))
    assert grid["learning_rate"] == [1e-3, 1e-2] and grid["n_layers"] == [1, 2]
    assert "units" not in grid and "dropout" not in grid and "activation" not in grid
    assert "momentum" not in grid  # neither adam nor sgd uses it
    assert grid["batch_size"] == [32, 64, 128, 256]


@pytest.mark.parametrize("entries,loc", [
    ({"learning_rate": {"low": 1e-3, "high": 1e-2}}, ("learning_rate",)),
    ({"units": {"low": 32, "high": 64, "log": True}}, ("units",)),
    ({"optimizer": {"choices": ["adam", "momentum"]}}, ("momentum",)),  # momentum's default range applies
])
def test_grid_refuses_continuous_ranges(entries: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(SpaceError, match="grid search needs choices") as info:
        grid_space(resolve_space(grid_entries(**entries), MLP))
    assert info.value.loc == loc


def test_grid_refuses_too_many_points() -> None:
    entries = grid_entries(n_layers={"low": 1, "high": 8}, units={"low": 1, "high": 999})
    with pytest.raises(SpaceError, match="points") as info:
        grid_space(resolve_space(entries, MLP))
    assert info.value.loc == ()


# ---- through the API: 422 with the field path --------------------------------------------------------


def locs(response: Any) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    return [e["loc"] for e in response.json()["detail"]]


GRID_SPACE = {"learning_rate": {"type": "categorical", "choices": [1e-3, 1e-2]}, "optimizer": "adam",
              "units": 32, "n_layers": 1, "dropout": 0.0, "weight_decay": 0.0, "batch_size": 64,
              "activation": "relu", "batch_norm": "none", "weight_init": "he_normal",
              "lr_schedule": "constant", "layer_shape": "constant", "augmentation": "none"}  # 2 grid points
MULTI = [{"metric": "val_accuracy"}, {"metric": "param_count"}]


INVALID: list[tuple[dict[str, Any], list[Any]]] = [
    ({"search_space": {"wings": 2}}, ["body", "search_space", "wings"]),
    ({"search_space": {"units": {"type": "int", "low": 64, "high": 32}}}, ["body", "search_space", "units"]),
    ({"search_space": {"learning_rate": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
     ["body", "search_space", "learning_rate", "low"]),
    ({"search_space": {"activation": {"type": "categorical", "choices": []}}},
     ["body", "search_space", "activation", "categorical", "choices"]),
    ({"search_space": {"batch_norm": "sometimes"}}, ["body", "search_space", "batch_norm"]),
    ({"search_space": {"weight_decay": 2.0}}, ["body", "search_space", "weight_decay"]),
    ({"search_space": {"branch_merge": "add"}}, ["body", "search_space", "branch_merge"]),  # digits: none
    ({"search_space": {"optimizer": "adam", "momentum": 0.9}}, ["body", "search_space", "momentum"]),
    ({"sampler": {"name": "grid"}}, ["body", "search_space", "dropout"]),  # the first continuous range
    ({"sampler": {"name": "grid"}, "search_space": {**GRID_SPACE, "learning_rate": {
        "type": "float", "low": 1e-3, "high": 1e-2}}}, ["body", "search_space", "learning_rate"]),
    ({"sampler": {"name": "grid"}, "search_space": GRID_SPACE, "budget": {"n_trials": 3}},
     ["body", "budget", "n_trials"]),
    ({"sampler": {"name": "random", "multivariate": True}}, ["body", "sampler", "multivariate"]),
    ({"sampler": {"name": "grid", "n_startup_trials": 3}}, ["body", "sampler", "n_startup_trials"]),
    ({"sampler": {"name": "nsga2", "population_size": 1}}, ["body", "sampler", "population_size"]),
    ({"sampler": {"name": "qmc", "qmc_type": "lattice"}}, ["body", "sampler", "qmc_type"]),
    ({"sampler": {"name": "cmaes"}, "objective": MULTI}, ["body", "sampler", "name"]),
    ({"pruner": {"name": "median"}, "objective": MULTI}, ["body", "pruner", "name"]),
    ({"pruner": {"name": "percentile", "percentile": 0}}, ["body", "pruner", "percentile"]),
    ({"pruner": {"name": "percentile", "percentile": 100}}, ["body", "pruner", "percentile"]),
    ({"pruner": {"name": "median", "percentile": 50}}, ["body", "pruner", "percentile"]),
    ({"pruner": {"name": "hyperband", "n_warmup_steps": 1}}, ["body", "pruner", "n_warmup_steps"]),
    ({"pruner": {"name": "median", "n_warmup_steps": 3}}, ["body", "pruner", "n_warmup_steps"]),  # = epochs
    ({"pruner": {"name": "hyperband", "min_resource": 4}}, ["body", "pruner", "min_resource"]),
    ({"pruner": {"name": "successive_halving", "reduction_factor": 1}},
     ["body", "pruner", "reduction_factor"]),
]


def test_invalid_space_and_algorithm_settings_are_422_at_the_field(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    for overrides, loc in INVALID:
        found = locs(client.post(f"{API}/studies", json=study_spec(**overrides)))
        assert any(found_loc[: len(loc)] == loc for found_loc in found), (overrides, found)
    assert client.get(f"{API}/studies").json()["count"] == 0  # nothing half-created


def test_valid_algorithm_settings_are_accepted(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    specs = [
        study_spec(sampler={"name": "grid", "seed": 1}, search_space=GRID_SPACE, budget={"n_trials": 2}),
        study_spec(sampler={"name": "nsga2", "population_size": 4}, objective=MULTI, pruner={"name": "none"}),
        study_spec(sampler={"name": "tpe", "multivariate": True, "n_startup_trials": 2}),
        study_spec(sampler={"name": "qmc", "qmc_type": "halton"},
                   pruner={"name": "median", "n_startup_trials": 1}),
        study_spec(pruner={"name": "hyperband", "min_resource": 1, "reduction_factor": 2}),
        study_spec(pruner={"name": "percentile", "percentile": 40.0, "n_warmup_steps": 2}),
    ]
    for spec in specs:
        response = client.post(f"{API}/studies", json=spec)
        assert response.status_code == 201, (spec, response.text)
    multi = study_spec(objective=MULTI)
    del multi["pruner"]  # not asked for: several objectives get no pruner rather than a 422
    assert client.post(f"{API}/studies", json=multi).json()["spec"]["pruner"]["name"] == "none"


def test_every_documented_name_is_in_the_table() -> None:
    documented = {"n_layers", "units", "layer_shape", "activation", "batch_norm", "dropout", "weight_decay",
                  "weight_init", "optimizer", "momentum", "learning_rate", "lr_schedule", "batch_size",
                  "augmentation", "filters", "kernel_size", "separable", "branch_merge"}
    assert set(BY_NAME) == documented


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_each_source_says_what_it_teaches_not_a_document_no_user_has(model: str) -> None:
    from app.ml.space import describe_space

    for entry in describe_space(model):
        assert "course notes" not in entry["source"].lower(), entry
        assert len(entry["source"].split()) >= 6, entry  # a sentence, not a reference
