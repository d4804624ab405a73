"""Out of memory is retried, never the end of a whole group: real runners under the worker's memory limit.

One hidden layer of 4096 units on 64 features: the weights are small (1 MB), so a batch's activations decide
what a trial needs. Measured as the smallest limit a runner trains under: 210-230 MiB at 4096 samples a batch,
110-125 MiB at 2048; the limit of 175 MiB lies between, some 50 MiB from either. Every choice that adds
activations per batch is pinned (no batch norm, no dropout, relu): left to the sampler, a batch of 2048 with
both needed 160 MiB and at times over 175.

The trials run in a worker process of their own, as in production: a runner forked from this test process
would inherit what earlier tests left mapped in it (free memory of torch's and the C library's, reused
without new address space), and after the API tests a batch of 4096 trained within the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from app.core.db import Database
from app.models import TrialState
from tests.conftest import make_settings
from tests.factories import (
    API,
    client_for,
    create_study_via_api,
    npz_bytes,
    start_worker,
    study_spec,
    wait_for_status,
)
from tests.integration.processes import assert_study_settled, optuna_trials, processes

MEMORY_MB = 175  # per trial: a batch of 2048 fits, one of 4096 does not
MEMORY_ENV = {"HPSEARCH_TRIAL_MEMORY_MB": str(MEMORY_MB)}
BIG = {"units": 4096, "n_layers": 1, "batch_size": 4096}


def _study(db_url: str, tmp_path: Path, n_trials: int) -> tuple[Database, TestClient, Any, str]:
    settings = make_settings(db_url, tmp_path / "home")
    db = Database(db_url)
    client = client_for(settings, db)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10_000, 64)).astype(np.float32)
    upload = client.post(f"{API}/datasets", data={"kind": "npz", "name": "wide"},
                         files={"file": ("wide.npz", npz_bytes(X=x, y=(x[:, 0] > 0).astype(np.int64)))})
    assert upload.status_code == 201, upload.text
    spec = study_spec(dataset=upload.json()["id"], validation_split=0.05,
                      budget={"n_trials": n_trials, "epochs": 1, "max_parallel": n_trials, "max_attempts": 1},
                      search_space={"learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                                    "optimizer": "adam", "units": {"type": "int", "low": 32, "high": 4096},
                                    "n_layers": 1, "batch_norm": "none", "dropout": 0.0, "activation": "relu",
                                    "layer_shape": "constant", "batch_size": {"type": "categorical",
                                                                  "choices": [1024, 4096]}})
    sid = create_study_via_api(client, spec)
    for lr in (1e-3, 2e-3)[:n_trials]:
        params = {**BIG, "learning_rate": lr}
        assert client.post(f"{API}/studies/{sid}/trials", json={"params": params}).status_code == 201
    return db, client, settings, sid


def test_a_solo_trial_out_of_memory_runs_again_at_half_its_batch_size(db_url: str, tmp_path: Path) -> None:
    db, client, settings, sid = _study(db_url, tmp_path, 1)
    with processes() as procs:
        procs.append(start_worker(settings, tmp_path / "w.log", extra_env=MEMORY_ENV))
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=120)
    assert study["status"] == "completed", study
    trial = client.get(f"{API}/studies/{sid}/trials/0").json()
    # max_attempts is 1: the retry at a smaller batch is not counted against it.
    assert (trial["state"], trial["attempt"], trial["params"]["batch_size"]) == ("complete", 2, 2048)
    assert trial["error"] == "attempt 1: out_of_memory at batch size 4096; retried at batch size 2048"
    # Optuna: the first attempt failed; the retry is a fresh trial with the proposed parameters, complete,
    # carrying the batch size it ran at.
    first, retry = sorted(optuna_trials(db, sid), key=lambda t: t.number)
    assert first.state.name == "FAIL" and first.params["batch_size"] == 4096
    assert retry.state.name == "COMPLETE" and retry.params == first.params
    assert retry.user_attrs["oom_retry"] == {"batch_size": 2048, "out_of_memory_at": 4096}
    assert_study_settled(db, sid, 1)
    db.dispose()


def test_a_fused_group_out_of_memory_retries_its_members_solo(db_url: str, tmp_path: Path) -> None:
    db, client, settings, sid = _study(db_url, tmp_path, 2)
    with processes() as procs:
        procs.append(start_worker(settings, tmp_path / "w.log", extra_env=MEMORY_ENV, args=("--fuse", "2")))
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=180)
    assert study["status"] == "completed", study
    trials = [client.get(f"{API}/studies/{sid}/trials/{n}").json() for n in (0, 1)]
    for trial in trials:
        # The group ran out of memory (attempt 1), each member then alone at 4096 (attempt 2), then at 2048.
        assert (trial["state"], trial["attempt"], trial["params"]["batch_size"]) == ("complete", 3, 2048), trial
        assert trial["error"] == "attempt 2: out_of_memory at batch size 4096; retried at batch size 2048"
    states = [t.state.name for t in optuna_trials(db, sid)]
    assert sorted(states) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "FAIL", "FAIL"]
    assert [r.state for r in assert_study_settled(db, sid, 2)] == [TrialState.COMPLETE.value] * 2
    db.dispose()
