"""Real studies of each model family through the API and a supervisor with forked trial runners.

Each trained model is rebuilt from its saved artifact (the JSON config and the safetensors weights), so the
assertions see what was trained, not what was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from torch import nn

from app.core.config import Settings
from app.core.db import Database
from app.ml.artifacts import ModelSpec, load_module, read_config, trial_files, trial_stem
from app.ml.networks import Branches
from tests.conftest import make_settings
from tests.factories import API, client_for, running_supervisor, study_spec, wait_for_status

# Everything a family does not vary is fixed, so each study runs only what it tests.
COMMON = {"optimizer": "adam", "learning_rate": 3e-3, "weight_decay": 0.0, "dropout": 0.0,
          "batch_norm": "none", "activation": "relu", "weight_init": "he_normal", "lr_schedule": "constant"}


@pytest.fixture
def sqlite_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    """The model families are about training, not storage: one database is enough for them."""
    return make_settings(sqlite_url, tmp_path / "home")


def run_study(settings: Settings, client: Any, db: Database, spec: dict[str, Any],
              slots: int = 2) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    response = client.post(f"{API}/studies", json=spec)
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    with running_supervisor(settings, db, slots=slots):
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=180)
    assert study["status"] == "completed", study
    trials = client.get(f"{API}/studies/{sid}/trials", params={"limit": 100}).json()["data"]
    assert trials and all(t["state"] == "complete" for t in trials), trials
    return sid, study, trials


def artifact(settings: Settings, sid: str, number: int) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """(saved config, the module rebuilt from it with the saved weights, the raw weights)."""
    assert settings.artifact_dir is not None
    stem = trial_stem(settings.artifact_dir / sid, number)
    weights, config_path = trial_files(stem)
    config = read_config(config_path)
    return config, load_module(stem, ModelSpec.from_config(config)), load_file(str(weights))


def test_separable_cnn_on_mnist_trains_depthwise_convolutions(sqlite_settings: Settings) -> None:
    db = Database(sqlite_settings.database_url)
    client = client_for(sqlite_settings, db)
    space = {**COMMON, "n_layers": 2, "filters": 8, "kernel_size": 3, "units": 32, "batch_size": 128,
             "augmentation": "light", "separable": {"type": "categorical", "choices": [True, False]}}
    spec = study_spec(name="mnist-separable", dataset="builtin:mnist", model="cnn",
                      sampler={"name": "grid", "seed": 0},
                      budget={"n_trials": 2, "epochs": 1, "max_parallel": 2})
    spec["search_space"] = space
    sid, study, trials = run_study(sqlite_settings, client, db, spec)
    by_kind = {t["params"]["separable"]: t for t in trials}
    assert set(by_kind) == {True, False}
    config, module, weights = artifact(sqlite_settings, sid, by_kind[True]["number"])
    assert config["params"]["separable"] is True and config["input_shape"] == [1, 28, 28]
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    # Block 1 reads 1 channel, block 2 reads 8: each a per-channel k x k conv, then a 1x1 pointwise conv.
    assert [(c.in_channels, c.out_channels, c.groups, c.kernel_size) for c in convs] == [
        (1, 1, 1, (3, 3)), (1, 8, 1, (1, 1)), (8, 8, 8, (3, 3)), (8, 16, 1, (1, 1))]
    depthwise = [k for k, v in weights.items() if v.shape == (8, 1, 3, 3)]
    assert len(depthwise) == 1  # the trained weights hold one 3x3 filter per channel
    assert np.array_equal(weights[depthwise[0]], convs[2].weight.detach().numpy())
    conv_layers = [layer["args"] for layer in config["layers"] if layer["type"] == "Conv2d"]
    assert [a["groups"] for a in conv_layers] == [1, 1, 8, 1]
    plain = [m for m in artifact(sqlite_settings, sid, by_kind[False]["number"])[1].modules()
             if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in plain] == [1, 1] and plain[1].kernel_size == (3, 3)
    assert by_kind[True]["metrics"]["param_count"] < by_kind[False]["metrics"]["param_count"]
    assert by_kind[True]["value"] > 0.5  # learns MNIST in one epoch, well above chance
    assert study["test_metrics"]["test_accuracy"] > 0.5
    db.dispose()


def test_iris_feature_group_branches_concat_and_add(sqlite_settings: Settings) -> None:
    db = Database(sqlite_settings.database_url)
    client = client_for(sqlite_settings, db)
    space = {**COMMON, "learning_rate": 3e-2, "n_layers": 1, "units": 8, "layer_shape": "constant",
             "batch_size": 16, "branch_merge": {"type": "categorical", "choices": ["concat", "add"]}}
    spec = study_spec(name="iris-branches", dataset="builtin:iris",
                      sampler={"name": "grid", "seed": 0}, budget={"n_trials": 2, "epochs": 5})
    spec["search_space"] = space
    sid, study, trials = run_study(sqlite_settings, client, db, spec)
    assert {t["params"]["branch_merge"] for t in trials} == {"concat", "add"}
    for t in trials:
        config, module, _ = artifact(sqlite_settings, sid, t["number"])
        assert config["feature_groups"] == [[0, 1], [2, 3]]  # sepal, petal
        branches = [m for m in module.modules() if isinstance(m, Branches)]
        assert len(branches) == 1 and branches[0].merge == t["params"]["branch_merge"]
        assert [b[0].in_features for b in branches[0].branches] == [2, 2]
        head = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
        assert head.in_features == (16 if t["params"]["branch_merge"] == "concat" else 8)
    assert study["best_trial"]["value"] > 0.6
    db.dispose()


def test_regression_study_minimizes_val_mse(sqlite_settings: Settings) -> None:
    db = Database(sqlite_settings.database_url)
    client = client_for(sqlite_settings, db)
    space = {**COMMON, "learning_rate": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
             "n_layers": 1, "units": 32, "batch_size": 32}
    spec = study_spec(name="regression", dataset="builtin:synthetic_regression", task="regression",
                      objective={"metric": "val_mse", "direction": "minimize"},
                      sampler={"name": "random", "seed": 0}, budget={"n_trials": 2, "epochs": 3})
    spec["search_space"] = space
    sid, study, trials = run_study(sqlite_settings, client, db, spec)
    for t in trials:
        assert t["value"] == t["metrics"]["val_mse"] > 0 and t["metrics"]["val_mae"] > 0
        config, module, _ = artifact(sqlite_settings, sid, t["number"])
        assert config["task"] == "regression" and config["n_outputs"] == 1
        assert [m for m in module.modules() if isinstance(m, nn.Linear)][-1].out_features == 1
    assert study["best_trial"]["value"] == min(t["value"] for t in trials)
    assert study["test_metrics"]["test_mse"] > 0 and "test_mae" in study["test_metrics"]
    detail = client.get(f"{API}/studies/{sid}/trials/{trials[0]['number']}").json()
    assert [p["val_metric"] for p in detail["curve"]] and min(p["val_metric"] for p in detail["curve"]) == \
        trials[0]["value"]  # the best epoch by val_mse was kept
    db.dispose()


MULTI = [{"metric": "val_accuracy", "direction": "maximize"},
         {"metric": "param_count", "direction": "minimize"}]


def test_multi_objective_study_exposes_its_pareto_front(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    space = {**COMMON, "learning_rate": 3e-2, "batch_size": 16, "branch_merge": "concat",
             "units": {"type": "categorical", "choices": [2, 8, 32]},
             "n_layers": {"type": "int", "low": 1, "high": 2}}
    spec = study_spec(name="multi", dataset="builtin:iris", objective=MULTI,
                      sampler={"name": "nsga2", "seed": 0, "population_size": 3}, pruner={"name": "none"},
                      budget={"n_trials": 6, "epochs": 3})
    spec["search_space"] = space
    sid, study, trials = run_study(settings, client, db, spec)
    assert all(t["values"] == [t["metrics"]["val_accuracy"], t["metrics"]["param_count"]] for t in trials)
    front = client.get(f"{API}/studies/{sid}/pareto")
    assert front.status_code == 200, front.text
    body = front.json()
    assert body["objectives"] == MULTI and body["n_complete"] == len(trials) == 6
    numbers = [t["number"] for t in body["data"]]
    assert body["count"] == len(numbers) >= 1
    # Brute force over every complete trial: on the front exactly when nothing dominates it.
    def dominates(a: list[float], b: list[float]) -> bool:
        better_or_equal = a[0] >= b[0] and a[1] <= b[1]
        return better_or_equal and (a[0] > b[0] or a[1] < b[1])

    expected = {t["number"] for t in trials if not any(dominates(o["values"], t["values"]) for o in trials)}
    assert set(numbers) == expected
    accuracies = [t["values"][0] for t in body["data"]]
    assert accuracies == sorted(accuracies, reverse=True)  # best first by the first objective
    assert all(t["params"] and t["state"] == "complete" for t in body["data"])
