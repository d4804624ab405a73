"""Every sampler and pruner: the factories pass the spec's options on; each runs a real study end to end."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.core.optuna_store import optuna_storage
from app.ml.space import Context, resolve_space
from app.models import Study
from app.schemas.study import PrunerSpec, SamplerSpec, StudySpec
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status
from workers.search import GridSampler, SeededByTrial, algorithm, make_pruner, make_sampler

IRIS = Context("mlp", feature_groups=True)
MULTI = [{"metric": "val_accuracy", "direction": "maximize"},
         {"metric": "param_count", "direction": "minimize"}]


# ---- the factories -----------------------------------------------------------------------------------


def spec_of(**fields: Any) -> StudySpec:
    return StudySpec.model_validate({"name": "t", "dataset": "builtin:iris", **fields})


def sampler_for(sampler: dict[str, Any], **spec: Any) -> optuna.samplers.BaseSampler:
    entries = {k: ({kk: vv for kk, vv in v.items() if kk != "type"} if isinstance(v, dict) else v)
               for k, v in GRID.items()} if sampler["name"] == "grid" else {}
    return make_sampler(spec_of(sampler=sampler, **spec), resolve_space(entries, IRIS))


@pytest.mark.parametrize("name,cls", [
    ("random", optuna.samplers.RandomSampler), ("grid", GridSampler),
    ("tpe", optuna.samplers.TPESampler), ("cmaes", optuna.samplers.CmaEsSampler),
    ("gp", optuna.samplers.GPSampler), ("qmc", optuna.samplers.QMCSampler),
    ("nsga2", optuna.samplers.NSGAIISampler),
])
def test_make_sampler_builds_the_named_sampler(name: str, cls: type) -> None:
    seeded = sampler_for({"name": name, "seed": 3})
    assert isinstance(seeded, SeededByTrial) and algorithm(seeded) is cls  # built afresh for each trial
    if name != "grid":  # the grid is always seeded
        assert type(sampler_for({"name": name})) is cls


def test_sampler_options_reach_optuna() -> None:
    tpe = sampler_for({"name": "tpe", "n_startup_trials": 4, "multivariate": False})
    assert tpe._n_startup_trials == 4 and tpe._multivariate is False and tpe._constant_liar
    assert sampler_for({"name": "tpe"})._multivariate is True  # joint TPE for one objective
    assert sampler_for({"name": "tpe"}, objective=MULTI)._multivariate is False
    assert sampler_for({"name": "nsga2", "population_size": 6})._population_size == 6
    qmc = sampler_for({"name": "qmc", "qmc_type": "halton", "seed": 5}).current
    assert (qmc._qmc_type, qmc._scramble, qmc._seed) == ("halton", True, 5)
    assert sampler_for({"name": "qmc"})._scramble is False  # unseeded workers still share one sequence
    assert sampler_for({"name": "cmaes", "n_startup_trials": 2})._n_startup_trials == 2
    assert sampler_for({"name": "gp", "n_startup_trials": 2})._n_startup_trials == 2
    grid = sampler_for({"name": "grid"}).current.search_space
    assert grid == {"learning_rate": [1e-2, 3e-2], "branch_merge": ["concat", "add"]}  # fixed ones stay out


def test_grid_sampler_takes_every_point_once_without_stopping_the_study() -> None:
    """Optuna's own grid calls study.stop() after the last point, which raises outside optimize()."""
    sampler = sampler_for({"name": "grid", "seed": 0})
    study = optuna.create_study(sampler=sampler)
    points = set()
    for _ in range(4):
        trial = study.ask()
        points.add((trial.suggest_categorical("learning_rate", [1e-2, 3e-2]),
                    trial.suggest_categorical("branch_merge", ["concat", "add"])))
        study.tell(trial, 1.0)
    assert len(points) == 4


def test_make_sampler_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler(StudySpec.model_construct(sampler=SamplerSpec.model_construct(name="bayes")), {})
    with pytest.raises(ValueError, match="unknown pruner"):
        make_pruner(StudySpec.model_construct(pruner=PrunerSpec.model_construct(name="never")))


def test_pruner_options_reach_optuna() -> None:
    assert isinstance(make_pruner(spec_of(pruner={"name": "none"})), optuna.pruners.NopPruner)
    median = make_pruner(spec_of(pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1}))
    assert type(median) is optuna.pruners.MedianPruner
    assert (median._n_startup_trials, median._n_warmup_steps, median._percentile) == (2, 1, 50.0)
    percentile = make_pruner(spec_of(pruner={"name": "percentile", "percentile": 10.0}))
    assert type(percentile) is optuna.pruners.PercentilePruner and percentile._percentile == 10.0
    halving = make_pruner(spec_of(pruner={"name": "successive_halving", "min_resource": 2,
                                      "reduction_factor": 2}))
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)
    assert (halving._min_resource, halving._reduction_factor) == (2, 2)
    hyperband = make_pruner(spec_of(pruner={"name": "hyperband", "reduction_factor": 2}, budget={"epochs": 8}))
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (1, 8, 2)


def test_percentile_pruner_prunes_below_its_percentile() -> None:
    """A behaviour check of the built pruner over reported epochs, as the supervisor reports them."""
    pruner = make_pruner(spec_of(pruner={"name": "percentile", "percentile": 50.0, "n_startup_trials": 1}))
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (0.9, 0.8):
        trial = study.ask()
        trial.report(value, step=1)
        study.tell(trial, value)
    good, bad = study.ask(), study.ask()
    good.report(0.95, step=1)
    bad.report(0.1, step=1)
    assert not good.should_prune() and bad.should_prune()


# ---- each sampler and each pruner in a real study -----------------------------------------------------

# The documented space, narrowed where a tiny budget could otherwise diverge (N(0, 1) weights, lr 0.1).
SPACE = {"batch_size": 32, "units": {"type": "int", "low": 8, "high": 32},
         "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
         "weight_init": {"type": "categorical", "choices": ["he_normal", "glorot_uniform"]}}
GRID = {"learning_rate": {"type": "categorical", "choices": [1e-2, 3e-2]},
        "branch_merge": {"type": "categorical", "choices": ["concat", "add"]},
        "optimizer": "adam", "units": 16, "n_layers": 1, "dropout": 0.0, "weight_decay": 0.0,
        "batch_size": 32, "activation": "relu", "batch_norm": "none", "weight_init": "he_normal",
        "lr_schedule": "constant", "layer_shape": "constant"}

# One study per sampler over the documented default space on iris, each with one of the pruners.
CASES: dict[str, dict[str, Any]] = {
    "random": {"sampler": {"name": "random", "seed": 1},
               "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}},
    "tpe": {"sampler": {"name": "tpe", "seed": 1, "n_startup_trials": 1},
            "pruner": {"name": "percentile", "percentile": 25.0, "n_startup_trials": 1}},
    "cmaes": {"sampler": {"name": "cmaes", "seed": 1, "n_startup_trials": 1},
              "pruner": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2}},
    "gp": {"sampler": {"name": "gp", "seed": 1, "n_startup_trials": 1}, "pruner": {"name": "hyperband"}},
    "qmc": {"sampler": {"name": "qmc", "seed": 1, "qmc_type": "halton"}, "pruner": {"name": "none"}},
    "nsga2": {"sampler": {"name": "nsga2", "seed": 1, "population_size": 2}, "pruner": {"name": "none"},
              "objective": MULTI},
    "grid": {"sampler": {"name": "grid", "seed": 1}, "pruner": {"name": "median"}, "search_space": GRID},
}


def fingerprints(db: Database, study_id: str) -> tuple[set[str], set[str]]:
    """The system attributes each sampler leaves in Optuna's tables: trial keys and study keys."""
    with db.read_session() as session:
        optuna_name = session.scalar(select(Study.optuna_name).where(Study.id == study_id))
    storage = optuna_storage(db.url)
    ostudy = optuna.load_study(study_name=optuna_name, storage=storage)
    trial_keys = {k.split(":")[0] for t in ostudy.get_trials(deepcopy=False) for k in t.system_attrs}
    study_keys = {k.split(":")[0] for k in storage.get_study_system_attrs(ostudy._study_id)}
    return trial_keys, study_keys


# Random search leaves none; nor does the grid, whose trials hold their points as their parameters
# (workers/search.py; the points are checked below). TPE shares its relative parameters (constant liar).
EXPECTED_FINGERPRINTS = {"random": set(), "tpe": {"tpe"}, "cmaes": {"cma"}, "gp": {"gp"}, "qmc": {"qmc"},
                         "nsga2": {"NSGAIISampler"}, "grid": set()}
ALL_FINGERPRINTS = set().union(*EXPECTED_FINGERPRINTS.values()) | {"grid_id", "search_space"}


def test_every_sampler_and_pruner_runs_a_study(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    ids = {}
    for name, case in CASES.items():
        space = case.get("search_space", SPACE)
        base = study_spec(name=f"iris-{name}", dataset="builtin:iris", budget={"n_trials": 3, "epochs": 2})
        spec = {**base, **case, "search_space": space}
        response = client.post(f"{API}/studies", json=spec)
        assert response.status_code == 201, (name, response.text)
        ids[name] = response.json()["id"]
    with running_supervisor(settings, db, slots=2):
        studies = {name: wait_for_status(client, sid, {"completed", "failed"}, timeout_s=150)
                   for name, sid in ids.items()}
    for name, study in studies.items():
        assert study["status"] == "completed", (name, study)
        progress = study["progress"]
        assert progress["finished"] == progress["complete"] + progress["pruned"] == 3, name
        assert not progress["fail"], name
        trials = client.get(f"{API}/studies/{ids[name]}/trials").json()["data"]
        assert all("branch_merge" in t["params"] for t in trials), name  # iris declares feature groups
        trial_keys, study_keys = fingerprints(db, ids[name])
        assert (trial_keys | study_keys) & ALL_FINGERPRINTS == EXPECTED_FINGERPRINTS[name], name
    multi = client.get(f"{API}/studies/{ids['nsga2']}/trials").json()["data"]
    assert all(len(t["values"]) == 2 and t["values"][1] == t["metrics"]["param_count"] for t in multi)
    grid = client.get(f"{API}/studies/{ids['grid']}/trials").json()["data"]
    points = {(t["params"]["learning_rate"], t["params"]["branch_merge"]) for t in grid}
    assert len(points) == 3  # no grid point ran twice
    assert points <= {(lr, m) for lr in (1e-2, 3e-2) for m in ("concat", "add")}


PRUNING_SPACE = {**GRID, "learning_rate": {"type": "categorical", "choices": [5e-2, 1e-7]},
                 "branch_merge": "concat", "batch_size": 16,
                 "units": {"type": "categorical", "choices": [16, 32]}}


def test_a_pruner_stops_hopeless_trials_early(settings: Settings, db: Database) -> None:
    """Seed 4 orders this grid learning, learning, hopeless (lr 1e-7), hopeless: the median pruner stops each
    hopeless trial after its first epoch, and Optuna and our rows agree on every trial's state."""
    client = client_for(settings, db)
    spec = {**study_spec(name="pruned", dataset="builtin:iris",
                         budget={"n_trials": 4, "epochs": 4, "max_parallel": 1, "patience": None}),
            "objective": {"metric": "val_loss", "direction": "minimize"},
            "sampler": {"name": "grid", "seed": 4}, "search_space": PRUNING_SPACE,
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}}
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db, slots=1):
        assert wait_for_status(client, sid, {"completed", "failed"})["status"] == "completed"
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert [t["params"]["learning_rate"] for t in trials] == [5e-2, 5e-2, 1e-7, 1e-7]
    assert trials[0]["state"] == "complete" and trials[0]["epochs_run"] == 4
    for hopeless in trials[2:]:
        assert hopeless["state"] == "pruned" and hopeless["epochs_run"] == 1, hopeless
        curve = client.get(f"{API}/studies/{sid}/trials/{hopeless['number']}").json()["curve"]
        assert len(curve) == 1 and hopeless["value"] == curve[0]["val_metric"]
    with db.read_session() as session:
        optuna_name = session.scalar(select(Study.optuna_name).where(Study.id == sid))
    ostudy = optuna.load_study(study_name=optuna_name, storage=optuna_storage(db.url))
    states = {t.number: t.state.name.lower() for t in ostudy.get_trials(deepcopy=False)}
    assert states == {t["number"]: t["state"] for t in trials}
