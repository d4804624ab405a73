"""Model and dataset plugins end to end: the example package over REST with real worker processes."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pytest import MonkeyPatch

from app.client import Client
from app.core.config import Settings
from app.core.db import Database
from app.ml.artifacts import load_model_dir
from tests.conftest import make_settings
from tests.factories import API, client_for, start_worker, study_spec, wait_for_status
from tests.integration.processes import processes, trials_of
from tests.integration.resumes import assert_same_weights_and_curve

SITE = Path(__file__).resolve().parents[1] / "plugin_site"  # test plugins, registered by their .dist-info
EXAMPLE = "seqconv,waveforms"


@pytest.fixture
def sqlite_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    """For what a plugin's runner does, not how a database stores it: one database is enough."""
    return make_settings(sqlite_url, tmp_path / "home")


@pytest.fixture
def sqlite_db(sqlite_settings: Settings) -> Iterator[Database]:
    database = Database(sqlite_settings.database_url)
    yield database
    database.dispose()


def _client(settings: Settings, db: Database, enabled: str, monkeypatch: MonkeyPatch) -> TestClient:
    monkeypatch.syspath_prepend(str(SITE))
    return client_for(settings.model_copy(update={"plugins": enabled.split(",")}), db)


def _worker_env(enabled: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {"HPSEARCH_PLUGINS": enabled, "PYTHONPATH": path}


def _worker(settings: Settings, enabled: str, log_path: Path) -> Any:
    """A worker with these plugins enabled, on the settings' lease grace (these tests kill no worker)."""
    leases = {"HPSEARCH_HEARTBEAT_INTERVAL_S": "0.5", "HPSEARCH_LEASE_GRACE_S": str(settings.lease_grace_s)}
    return start_worker(settings, log_path, extra_env={**leases, **_worker_env(enabled)})


def _spec(**overrides: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "name": "waveforms-seqconv", "dataset": "plugin:waveforms", "model": "seqconv",
        "search_space": {"channels": {"type": "int", "low": 8, "high": 16}, "blocks": 1, "optimizer": "adam",
                         "learning_rate": {"type": "categorical", "choices": [3e-2, 1e-7]}, "batch_size": 64,
                         "lr_schedule": "constant", "weight_decay": 0.0},
        "sampler": {"name": "random", "seed": 3}, "pruner": {"name": "median", "n_startup_trials": 1,
                                                              "n_warmup_steps": 0},
        "budget": {"n_trials": 3, "epochs": 2, "max_parallel": 1, "patience": None},
    }
    spec.update(overrides)
    return spec


def test_example_plugin_trains_prunes_finalizes_downloads_and_predicts(
        settings: Settings, db: Database, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    client = _client(settings, db, EXAMPLE, monkeypatch)
    space = client.get(f"{API}/search-space", params={"model": "seqconv"}).json()["hyperparameters"]
    assert [h["name"] for h in space][:3] == ["channels", "blocks", "kernel"]
    assert {"optimizer", "learning_rate"} <= {h["name"] for h in space}  # the service's trainer trains it
    refused = client.post(f"{API}/studies", json=_spec(search_space={"channels": 4096}))
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "search_space", "channels"]
    sid = client.post(f"{API}/studies", json=_spec()).json()["id"]
    # A good configuration first, then one that cannot learn: the median pruner stops it after an epoch.
    for params in ({"channels": 16, "kernel": 5, "learning_rate": 3e-2},
                   {"channels": 8, "kernel": 3, "learning_rate": 1e-7}):
        assert client.post(f"{API}/studies/{sid}/trials", json={"params": params}).status_code == 201
    with processes() as procs:
        procs.append(_worker(settings, EXAMPLE, tmp_path / "w.log"))
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=240)
        workers = client.get(f"{API}/workers").json()["data"]
    assert study["status"] == "completed", (study, (tmp_path / "w.log").read_text()[-3000:])
    assert {(p["name"], p["kind"], p["version"]) for p in workers[0]["plugins"]} == {
        ("seqconv", "model", "0.1.0"), ("waveforms", "dataset", "0.1.0")}
    trials = client.get(f"{API}/studies/{sid}/trials", params={"limit": 10}).json()["data"]
    by_number = {t["number"]: t for t in trials}
    assert study["progress"]["finished"] == 3 and by_number[0]["state"] == "complete"
    assert by_number[1]["state"] == "pruned" and by_number[1]["epochs_run"] == 1
    assert study["test_metrics"]["test_accuracy"] > 0.5
    best = study["best_trial"]["number"]
    body = client.get(f"{API}/studies/{sid}/trials/{best}/model").content
    folder = tmp_path / "model"
    zipfile.ZipFile(io.BytesIO(body)).extractall(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "seqconv"
    assert config["plugin"] == {"name": "seqconv", "version": "0.1.0", "distribution": "hpsearch-seqconv"}
    x = [[[float(i % 7) for i in range(64)]], [[1.0 if i % 16 < 8 else -1.0 for i in range(64)]]]
    predicted = client.post(f"{API}/studies/{sid}/predict", json={"inputs": x}).json()
    assert len(predicted["probabilities"]) == 2
    local = load_model_dir(folder).predict(np.asarray(x, dtype=np.float32))
    assert np.allclose(local, predicted["probabilities"], atol=1e-5)
    ensemble = client.post(f"{API}/studies/{sid}/predict", params={"use": "ensemble"}, json={"inputs": x})
    assert ensemble.status_code == 200, ensemble.text
    # The Python client reads the plugin's study exactly as a built-in one.
    api = Client("http://testserver", client.headers["Authorization"].removeprefix("Bearer "), http=client)
    assert api.studies.get(sid).best_trial.number == best  # type: ignore[union-attr]
    assert api.trials.get(sid, 1).state == "pruned"
    assert np.allclose(api.predict(sid, x).probabilities, predicted["probabilities"])  # type: ignore[arg-type]


def test_a_plugin_installed_but_not_enabled_is_a_422_naming_the_enabled(
        settings: Settings, db: Database, monkeypatch: MonkeyPatch) -> None:
    client = _client(settings, db, "waveforms", monkeypatch)  # seqconv is installed, not enabled
    answer = client.post(f"{API}/studies", json=_spec())
    assert answer.status_code == 422
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", "model"] and "mlp, cnn" in detail["msg"] and "seqconv" in detail["msg"]
    answer = client.post(f"{API}/studies", json=_spec(model="mlp", dataset="plugin:elsewhere"))
    detail = answer.json()["detail"][0]
    assert answer.status_code == 422 and detail["loc"] == ["body", "dataset"]
    assert "plugin:waveforms" in detail["msg"]
    assert client.get(f"{API}/search-space", params={"model": "seqconv"}).status_code == 422


def test_a_plugin_whose_build_fails_fails_its_trials_and_the_study(
        sqlite_settings: Settings, sqlite_db: Database, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    settings, db = sqlite_settings, sqlite_db
    client = _client(settings, db, "brokenbuild,waveforms", monkeypatch)
    spec = _spec(model="brokenbuild", search_space={"hidden": 8, "optimizer": "adam"},
                 budget={"n_trials": 2, "epochs": 2, "max_parallel": 1, "max_attempts": 1})
    sid = client.post(f"{API}/studies", json=spec).json()["id"]
    with processes() as procs:
        procs.append(_worker(settings, "brokenbuild,waveforms", tmp_path / "w.log"))
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=120)
        assert procs[0].poll() is None  # the worker keeps serving
    assert study["status"] == "failed" and study["progress"]["fail"] == 2
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert all("this network cannot be built" in t["error"] for t in trials), trials


def test_an_own_training_loop_runs_in_the_runner(
        sqlite_settings: Settings, sqlite_db: Database, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    settings, db = sqlite_settings, sqlite_db
    client = _client(settings, db, "ownloop,waveforms", monkeypatch)
    spec = _spec(model="ownloop", search_space={"hidden": 8, "lr": {"type": "float", "low": 0.01, "high": 0.05}},
                 pruner={"name": "none"}, budget={"n_trials": 2, "epochs": 3, "max_parallel": 1})
    asha = {"name": "asha", "min_epochs": 1, "reduction_factor": 3, "max_epochs": 3}
    refused = client.post(f"{API}/studies", json={**spec, "scheduler": asha})  # it could not pause at a rung
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "scheduler", "name"]
    assert "takes no resume" in refused.json()["detail"][0]["msg"]
    sid = client.post(f"{API}/studies", json=spec).json()["id"]
    with processes() as procs:
        procs.append(_worker(settings, "ownloop,waveforms", tmp_path / "w.log"))
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=120)
    assert study["status"] == "completed", (study, (tmp_path / "w.log").read_text()[-3000:])
    detail = client.get(f"{API}/studies/{sid}/trials/0").json()
    assert detail["epochs_run"] == 3 and len(detail["curve"]) == 3  # every report relayed, budget respected
    assert client.post(f"{API}/studies/{sid}/predict", json={"inputs": [[[0.0] * 64]]}).status_code == 200


def test_an_own_loop_that_takes_resume_continues_from_its_checkpoints_as_if_never_stopped(
        sqlite_settings: Settings, sqlite_db: Database, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    """ASHA pauses the trial at rungs 1 and 3 and resumes it from its checkpoint each time (shuffled batches
    and dropout drawn from the restored generators), then the client extends it by 2 epochs: it ends as the
    same trial trained 11 epochs without a pause."""
    settings, db = sqlite_settings, sqlite_db
    client = _client(settings, db, "resumableloop,waveforms", monkeypatch)

    def spec(epochs: int) -> dict[str, Any]:
        return _spec(model="resumableloop", search_space={"hidden": 8, "lr": {"type": "float", "low": 0.01,
                                                                               "high": 0.05}},
                     pruner={"name": "none"}, budget={"n_trials": 1, "epochs": epochs, "max_parallel": 1,
                                                      "patience": None})
    reference = client.post(f"{API}/studies", json=spec(11)).json()["id"]
    paused = client.post(f"{API}/studies", json={**spec(9), "scheduler": {
        "name": "asha", "min_epochs": 1, "reduction_factor": 3, "max_epochs": 9}}).json()["id"]
    log = tmp_path / "w.log"
    with processes() as procs:
        procs.append(_worker(settings, "resumableloop,waveforms", log))
        for sid in (reference, paused):
            assert wait_for_status(client, sid, {"completed", "failed"}, timeout_s=180)["status"] == "completed", \
                log.read_text()[-3000:]
        assert client.post(f"{API}/studies/{paused}/trials/0/extend", json={"epochs": 2}).status_code == 200
        assert wait_for_status(client, paused, {"completed", "failed"}, timeout_s=180)["status"] == "completed"
    resumes = [json.loads(line)["msg"] for line in log.read_text().splitlines()
               if line.startswith("{") and "resumed after" in line]
    assert resumes == [f"resumed after epoch {e}" for e in (1, 3, 9)], resumes  # never started over
    (resumed,), (uninterrupted,) = (trials_of(db, sid) for sid in (paused, reference))
    assert_same_weights_and_curve(db, resumed, uninterrupted, 11)


def test_a_worker_without_the_plugin_does_not_claim_its_study(
        settings: Settings, db: Database, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    client = _client(settings, db, EXAMPLE, monkeypatch)
    sid = client.post(f"{API}/studies", json=_spec()).json()["id"]
    with processes() as procs:
        procs.append(_worker(settings, "", tmp_path / "w.log"))
        deadline = time.monotonic() + 60
        while not client.get(f"{API}/workers").json()["data"] and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = client.get(f"{API}/workers").json()["data"]
        assert workers and workers[0]["plugins"] == []
        # Claims take the oldest study first: a newer study the worker can run, done, shows the plugin's
        # study was considered and passed over, which waiting for a while could not show.
        plain = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 1, "epochs": 1})).json()["id"]
        assert wait_for_status(client, plain, {"completed", "failed"}, timeout_s=120)["status"] == "completed"
        assert client.get(f"{API}/studies/{sid}").json()["status"] == "queued"


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
