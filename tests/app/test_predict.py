"""Predictions, model downloads and the ensemble endpoint of one finished study (SQLite)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from app.ml.artifacts import load_model_dir
from app.services import predictions
from tests.conftest import ROOT, fresh_database, make_settings
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status

DIGITS_SHAPE = (1, 8, 8)


@dataclass
class Finished:
    settings: Settings
    db: Database
    client: TestClient
    study: dict[str, Any]

    @property
    def url(self) -> str:
        return f"{API}/studies/{self.study['id']}"


def _service(home: Path, sqlite_template: Path) -> tuple[Settings, Database, TestClient]:
    """Settings, a fresh SQLite database and a signed-in client, for a module's one study."""
    url = next(fresh_database("sqlite", home, sqlite_template))
    settings = make_settings(url, home)
    db = Database(url)
    return settings, db, client_for(settings, db)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[Finished]:
    """One small digits study with a trees member, run once for every test here."""
    settings, db, client = _service(tmp_path_factory.mktemp("predict"), sqlite_template)
    sid = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 3, "epochs": 2},
                                                          ensemble={"top_k": 3, "trees": True})).json()["id"]
    with running_supervisor(settings, db):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study["error"]
    yield Finished(settings, db, client, study)
    db.dispose()


def _rows(n: int, seed: int = 0) -> list[Any]:
    return np.random.default_rng(seed).uniform(0, 16, size=(n, *DIGITS_SHAPE)).tolist()


def _detail(response: Any) -> str:
    assert response.status_code == 422, response.text
    return str(response.json()["detail"][0]["msg"])


def test_predict_uses_the_best_trial_by_default(finished: Finished, tmp_path: Path) -> None:
    response = finished.client.post(f"{finished.url}/predict", json={"inputs": _rows(4)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["use"] == "best" and body["trial_number"] == finished.study["best_trial"]["number"]
    assert body["classes"] == [str(i) for i in range(10)]
    probs = np.asarray(body["probabilities"])
    assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1.0)
    assert body["predictions"] == [body["classes"][i] for i in probs.argmax(axis=1)]
    assert finished.settings.artifact_dir is not None
    stem = finished.settings.artifact_dir / finished.study["id"] / f"trial-{body['trial_number']}"
    model_dir = tmp_path
    (model_dir / "model.safetensors").write_bytes(stem.with_name(stem.name + ".safetensors").read_bytes())
    (model_dir / "config.json").write_bytes(stem.with_name(stem.name + ".json").read_bytes())
    direct = load_model_dir(model_dir).predict(np.asarray(_rows(4), dtype=np.float32))
    np.testing.assert_allclose(probs, direct, atol=1e-7)


def test_predict_with_the_ensemble(finished: Finished) -> None:
    ensemble = finished.client.get(f"{finished.url}/ensemble").json()
    response = finished.client.post(f"{finished.url}/predict", params={"use": "ensemble"},
                                    json={"inputs": _rows(3)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["use"] == "ensemble" and body["trial_number"] is None
    assert np.allclose(np.asarray(body["probabilities"]).sum(axis=1), 1.0)
    assert any(m["kind"] == "trees" for m in ensemble["members"])


def test_models_are_loaded_once_and_cached(finished: Finished) -> None:
    finished.client.post(f"{finished.url}/predict", json={"inputs": _rows(1)})
    before = predictions.cache_info()["networks"]
    for _ in range(3):
        assert finished.client.post(f"{finished.url}/predict", json={"inputs": _rows(1)}).status_code == 200
    after = predictions.cache_info()["networks"]
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 3


@pytest.mark.parametrize(("inputs", "message"), [
    (np.zeros((2, 64)).tolist(), "[N, 1, 8, 8]"),  # flattened rows
    (np.zeros((2, 1, 8, 7)).tolist(), "[N, 1, 8, 8]"),
    ([np.zeros(DIGITS_SHAPE).tolist(), [[[0.0]]]], "unequal shapes"),
    ([[[["a"] * 8] * 8]], "numbers"),
    ([], "at least one row"),
    (np.zeros((predictions.MAX_ROWS + 1, *DIGITS_SHAPE)).tolist(), f"at most {predictions.MAX_ROWS} rows"),
    (np.full((1, *DIGITS_SHAPE), 1e39).tolist(), "finite"),  # beyond float32
])
def test_bad_inputs_are_422_with_the_rule(finished: Finished, inputs: list[Any], message: str) -> None:
    for use in ("best", "ensemble"):
        response = finished.client.post(f"{finished.url}/predict", params={"use": use},
                                        json={"inputs": inputs})
        assert message in _detail(response)


def test_nan_and_infinity_are_422(finished: Finished) -> None:
    for token in ("NaN", "Infinity", "-Infinity"):
        row = json.dumps(np.zeros(DIGITS_SHAPE).tolist()).replace("0.0", token, 1)
        response = finished.client.post(f"{finished.url}/predict", content=f'{{"inputs": [{row}]}}',
                                        headers={"Content-Type": "application/json"})
        assert "not JSON" in _detail(response)  # refused when parsed, before any model sees it


def test_download_a_trial_model(finished: Finished) -> None:
    from safetensors.numpy import load

    number = finished.study["best_trial"]["number"]
    response = finished.client.get(f"{finished.url}/trials/{number}/model")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["config.json", "model.safetensors"]
    config = json.loads(archive.read("config.json"))
    assert config["params"] == finished.study["best_trial"]["params"] and config["input_shape"] == [1, 8, 8]
    assert config["layers"][0]["type"] == "Standardize"
    weights = load(archive.read("model.safetensors"))
    assert "0.mean" in weights and weights["0.mean"].shape == DIGITS_SHAPE
    alone = finished.client.get(f"{finished.url}/trials/{number}/model", params={"file": "weights"})
    assert alone.content == archive.read("model.safetensors")
    alone = finished.client.get(f"{finished.url}/trials/{number}/model", params={"file": "config"})
    assert alone.json() == config
    assert finished.client.get(f"{finished.url}/trials/99/model").status_code == 404


def test_download_the_ensemble(finished: Finished) -> None:
    record = finished.client.get(f"{finished.url}/ensemble").json()
    response = finished.client.get(f"{finished.url}/ensemble/model")
    assert response.status_code == 200
    names = set(zipfile.ZipFile(io.BytesIO(response.content)).namelist())
    expected = {"ensemble.json"}
    assert all(m["weight"] > 0 for m in record["members"])  # members are the models the export holds
    for m in record["members"]:
        expected |= {"trees/trees.npz"} if m["kind"] == "trees" else \
            {f"{m['name']}/model.safetensors", f"{m['name']}/config.json"}
    assert names == expected


def test_a_study_without_a_finished_model(finished: Finished) -> None:
    queued = create_study_via_api(finished.client, name="not-started")
    url = f"{API}/studies/{queued}"
    for use in ("best", "ensemble"):
        response = finished.client.post(f"{url}/predict", params={"use": use}, json={"inputs": _rows(1)})
        assert response.status_code == 409, response.text
    assert finished.client.get(f"{url}/ensemble").status_code == 404
    assert finished.client.get(f"{url}/ensemble/model").status_code == 404
    assert finished.client.get(f"{url}/trials/0/model").status_code == 404


def test_another_owner_gets_404_on_every_model_endpoint(finished: Finished) -> None:
    bob = client_for(finished.settings, finished.db, owner="bob")
    number = finished.study["best_trial"]["number"]
    for method, path, kwargs in [
        ("GET", f"{finished.url}/ensemble", {}),
        ("GET", f"{finished.url}/ensemble/model", {}),
        ("GET", f"{finished.url}/trials/{number}/model", {}),
        ("GET", f"{finished.url}/trials/{number}/model?file=weights", {}),
        ("POST", f"{finished.url}/predict", {"json": {"inputs": _rows(1)}}),
        ("POST", f"{finished.url}/predict?use=ensemble", {"json": {"inputs": _rows(1)}}),
    ]:
        response = bob.request(method, path, **kwargs)
        assert response.status_code == 404, (path, response.text)
        assert finished.client.request(method, path, **kwargs).status_code == 200, path


def test_the_api_imports_neither_torch_nor_the_workers() -> None:
    code = "import sys, app.main; print([m for m in sys.modules if m == 'torch' or m.startswith('workers')])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_regression_study_predicts_values(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    spec = study_spec(dataset="builtin:synthetic_regression", task="regression",
                      objective={"metric": "val_mse", "direction": "minimize"},
                      budget={"n_trials": 2, "epochs": 2})
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study["error"]
    rows = np.random.default_rng(0).normal(size=(2, 10)).tolist()
    for use in ("best", "ensemble"):
        body = client.post(f"{API}/studies/{sid}/predict", params={"use": use}, json={"inputs": rows}).json()
        assert body["task"] == "regression" and body["probabilities"] is None and body["classes"] is None
        assert len(body["predictions"]) == 2 and all(isinstance(v, float) for v in body["predictions"])
    ensemble = client.get(f"{API}/studies/{sid}/ensemble").json()
    assert ensemble["objective"] == "val_mse" and ensemble["ensemble"]["val"]["mse"] <= min(
        m["val"]["mse"] for m in ensemble["members"])
    db.dispose()


# ---- image inputs: the body limit fits the row limit -------------------------------------------------------

IMAGE_SIDE = 28


def _idx(magic: int, data: np.ndarray) -> bytes:
    """IDX bytes (as MNIST ships them) of unsigned-byte data."""
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in data.shape)
    return header + data.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[Finished]:
    """A finished study on a small uploaded 28x28 image dataset (MNIST's shape, seconds to train)."""
    settings, db, client = _service(tmp_path_factory.mktemp("predict-images"), sqlite_template)
    labels = np.arange(200) % 2
    pixels = np.random.default_rng(0).integers(0, 100, size=(200, IMAGE_SIDE, IMAGE_SIDE)) + 150 * labels[:, None, None]
    uploaded = client.post(f"{API}/datasets", data={"kind": "idx", "name": "images"},
                           files={"images": ("i.idx", _idx(2051, pixels)), "labels": ("l.idx", _idx(2049, labels))})
    assert uploaded.status_code == 201, uploaded.text
    spec = study_spec(dataset=uploaded.json()["id"], budget={"n_trials": 1, "epochs": 1})
    sid = create_study_via_api(client, spec)
    with running_supervisor(settings, db, slots=1):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study["error"]
    yield Finished(settings, db, client, study)
    db.dispose()


def _images(n: int) -> list[Any]:
    # Full-precision floats in [0, 1]: about 19 bytes a pixel, the largest a realistic client sends.
    return np.random.default_rng(1).random((n, 1, IMAGE_SIDE, IMAGE_SIDE)).tolist()


def test_too_many_image_rows_get_the_row_rule_not_413(images: Finished) -> None:
    """Bodies far over the JSON limit (1 MiB) are fine here: the row limit answers, before any size limit."""
    full = images.client.post(f"{images.url}/predict", json={"inputs": _images(predictions.MAX_ROWS)})
    assert full.status_code == 200, full.text[:300]
    assert len(full.json()["predictions"]) == predictions.MAX_ROWS
    too_many = images.client.post(f"{images.url}/predict", json={"inputs": _images(predictions.MAX_ROWS + 1)})
    assert f"at most {predictions.MAX_ROWS} rows" in _detail(too_many)


def test_predict_has_its_own_body_limit(images: Finished) -> None:
    settings = images.settings.model_copy(update={"max_predict_body_bytes": 64 * 1024})
    client = client_for(settings, images.db)
    small = client.post(f"{images.url}/predict", json={"inputs": _images(1)})  # about 15 kB
    assert small.status_code == 200, small.text
    large = client.post(f"{images.url}/predict", json={"inputs": _images(8)})
    assert large.status_code == 413 and "larger than 65536 bytes" in large.json()["detail"]
    # other JSON bodies keep max_body_bytes
    assert client.post(f"{API}/studies", json={**study_spec(), "name": "x" * 2**20}).status_code == 413
