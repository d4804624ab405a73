"""The same spec and seed on CPU with one slot: the same parameters and the same results, trial by trial."""

from __future__ import annotations

from typing import Any

import torch

from app.core.config import Settings
from app.core.db import Database
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status

TIMING_METRICS = {"inference_ms"}  # wall-clock measurements, the only thing allowed to differ


def run_once(settings: Settings, db: Database, client: Any, spec: dict[str, Any]) -> list[dict[str, Any]]:
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db, slots=1):
        assert wait_for_status(client, sid, {"completed", "failed"})["status"] == "completed"
    trials = client.get(f"{API}/studies/{sid}/trials", params={"limit": 100}).json()["data"]
    return sorted(trials, key=lambda t: t["number"])


def outcome(trial: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in (trial["metrics"] or {}).items() if k not in TIMING_METRICS}
    kept = ("params", "state", "value", "values", "epochs_run", "best_epoch")
    return {**{k: trial[k] for k in kept}, "metrics": metrics}


def test_same_spec_and_seed_give_the_same_trials(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    # TPE after one random trial, over the documented default space (optimizers with and without momentum,
    # schedules, dropout, batch norm, branches); a pruner so that its decisions are reproduced too.
    spec = study_spec(name="repro", dataset="builtin:iris",
                      sampler={"name": "tpe", "seed": 7, "n_startup_trials": 1},
                      pruner={"name": "median", "n_startup_trials": 1},
                      budget={"n_trials": 4, "epochs": 3, "max_parallel": 1})
    spec["search_space"] = {"units": {"type": "int", "low": 8, "high": 32},
                            "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}
    first = run_once(settings, db, client, spec)
    # The supervisor process's own use of torch's RNG (GPSampler fits there, other libraries may draw)
    # must not reach the trials: each trial seeds itself.
    torch.manual_seed(12345)
    torch.rand(10)
    second = run_once(settings, db, client, spec)
    assert [t["number"] for t in first] == [t["number"] for t in second] == [0, 1, 2, 3]
    for a, b in zip(first, second, strict=True):
        assert outcome(a) == outcome(b), (a["number"], outcome(a), outcome(b))
    assert len({str(t["params"]) for t in first}) == 4  # the seed does not make every trial alike


def test_trials_with_equal_parameters_train_with_their_own_seeds(settings: Settings, db: Database) -> None:
    """Fixed hyperparameters: only each trial's seed (study seed + trial number) tells two trials apart."""
    client = client_for(settings, db)
    spec = study_spec(name="seeds", dataset="builtin:iris", sampler={"name": "random", "seed": 1},
                      pruner={"name": "none"}, budget={"n_trials": 2, "epochs": 1, "max_parallel": 1})
    spec["search_space"] = {"units": 8, "n_layers": 1, "optimizer": "adam", "learning_rate": 1e-2,
                            "dropout": 0.0, "weight_decay": 0.0, "batch_size": 16, "activation": "relu",
                            "batch_norm": "none", "weight_init": "he_normal", "lr_schedule": "constant",
                            "layer_shape": "constant",
                            "branch_merge": "concat"}
    one = run_once(settings, db, client, spec)
    assert one[0]["params"] == one[1]["params"]
    assert one[0]["metrics"]["val_loss"] != one[1]["metrics"]["val_loss"]
