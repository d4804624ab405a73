"""Dataset uploads through the REST API: every format, every rejection, and a study on an upload."""

from __future__ import annotations

import gzip
import io
import pickle
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.config import Settings
from app.core.db import Database
from app.services import datasets as datasets_service
from tests.conftest import make_settings
from tests.factories import (
    API,
    client_for,
    idx_images,
    idx_labels,
    npz_bytes,
    running_supervisor,
    study_spec,
    wait_for_status,
)

GROUPS = '{"sepal": ["sepal_l", "sepal_w"], "petal": ["petal_l", "petal_w"]}'


class Trap:
    """Unpickling this creates `path`: a test can tell whether a client's pickle was ever opened."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.path,))


def flowers_csv(n: int = 60, seed: int = 0) -> bytes:
    """Two well separated species over four measurements."""
    rng = np.random.default_rng(seed)
    lines = ["sepal_l,sepal_w,petal_l,petal_w,species"]
    for i in range(n):
        species = ("setosa", "virginica")[i % 2]
        base = 1.0 if i % 2 == 0 else 4.0
        row = base + rng.normal(0, 0.3, size=4)
        lines.append(",".join(f"{v:.3f}" for v in row) + f",{species}")
    return ("\n".join(lines) + "\n").encode()


def upload(client: Any, kind: str, files: dict[str, Any], **form: str) -> Any:
    return client.post(f"{API}/datasets", data={"kind": kind, **form}, files=files)


def detail_text(response: Any) -> str:
    return str(response.json()["detail"])


# ---- each format ---------------------------------------------------------------------------------------


def test_csv_upload_is_validated_stored_once_and_described(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    response = upload(client, "csv", {"file": ("flowers.csv", flowers_csv(), "text/csv")}, name="flowers",
                      label_column="species", feature_groups=GROUPS)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("dataset:") and body["name"] == "flowers" and body["kind"] == "csv"
    assert (body["samples"], body["features"], body["task"]) == (60, 4, "classification")
    assert body["classes"] == ["setosa", "virginica"]
    assert body["class_counts"] == {"setosa": 30, "virginica": 30}
    assert body["groups"] == {"sepal": [0, 1], "petal": [2, 3]} and body["image_shape"] is None
    assert body["size_bytes"] == len(flowers_csv())  # the bytes received, not the stored file's
    again = upload(client, "csv", {"file": ("copy.csv", flowers_csv(), "text/csv")}, name="flowers",
                   label_column="species", feature_groups=GROUPS)
    assert again.status_code == 200 and again.json() == body  # stored by content hash, once
    renamed = upload(client, "csv", {"file": ("copy.csv", flowers_csv(), "text/csv")}, name="copy",
                     label_column="species", feature_groups=GROUPS)
    assert renamed.status_code == 409  # a second name would silently alias the first
    assert body["id"] in renamed.json()["detail"] and "'flowers'" in renamed.json()["detail"]
    assert client.get(f"{API}/datasets/{body['id']}").json() == body
    listed = [d["id"] for d in client.get(f"{API}/datasets").json()["data"]]
    assert listed.count(body["id"]) == 1
    assert client_for(settings, db, owner="mallory").get(f"{API}/datasets/{body['id']}").status_code == 404


def test_npz_classification_and_regression_uploads(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    response = upload(client, "npz", {"file": ("d.npz", npz_bytes(X=x, y=np.arange(20) % 2))})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["samples"], body["features"], body["classes"]) == (20, 3, ["0", "1"])
    regression = upload(client, "npz", {"file": ("r.npz", npz_bytes(X=x, y=x.sum(axis=1)))},
                        task="regression")
    assert regression.status_code == 201, regression.text
    body = regression.json()
    assert body["task"] == "regression" and body["classes"] is None and body["target_stats"]["std"] > 0


@pytest.mark.parametrize("gz", [False, True])
def test_idx_image_and_label_pair(settings: Settings, db: Database, gz: bool) -> None:
    client = client_for(settings, db)
    rng = np.random.default_rng(1)
    images, labels = idx_images(rng.integers(0, 256, size=(12, 5, 4))), idx_labels(np.arange(12) % 3)
    if gz:
        images, labels = gzip.compress(images), gzip.compress(labels)
    response = upload(client, "idx", {"images": ("train-images-idx3-ubyte.gz", images),
                                      "labels": ("train-labels-idx1-ubyte.gz", labels)})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["image_shape"] == [1, 5, 4] and body["samples"] == 12 and body["classes"] == ["0", "1", "2"]


# ---- rejections ----------------------------------------------------------------------------------------


def test_client_pickles_are_refused_and_never_opened(settings: Settings, db: Database,
                                                      tmp_path: Path) -> None:
    client = client_for(settings, db)
    marker = tmp_path / "unpickled"
    raw = pickle.dumps(Trap(marker))
    objects = np.empty(12, dtype=object)
    objects[:] = Trap(marker)
    with_objects = npz_bytes(X=objects, y=np.arange(12) % 2)  # numpy pickles object arrays into the .npy
    for kind, files in [("npz", {"file": ("d.npz", raw)}), ("csv", {"file": ("d.csv", raw)}),
                        ("npz", {"file": ("d.npz", with_objects)}),
                        ("idx", {"images": ("i", gzip.compress(raw)), "labels": ("l", raw)})]:
        response = upload(client, kind, files, label_column="y")
        assert response.status_code == 422, (kind, response.text)
        assert "pickled objects are not accepted" in detail_text(response)
    assert not marker.exists()


def test_a_path_in_a_file_name_is_refused(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    for filename in ["../../etc/passwd", "/etc/passwd", "..\\boot.ini", "C:evil.csv", ".."]:
        response = upload(client, "csv", {"file": (filename, flowers_csv())}, label_column="species")
        assert response.status_code == 422, (filename, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", "file"]
    images, labels = idx_images(np.zeros((12, 5, 4))), idx_labels(np.arange(12) % 3)
    response = upload(client, "idx", {"images": ("ok", images), "labels": ("../labels", labels)})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "labels"]
    assert not [d for d in client.get(f"{API}/datasets").json()["data"] if not d["builtin"]]


def test_wrong_signatures_missing_files_and_bad_values_are_422(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    images, labels = idx_images(np.zeros((12, 5, 4))), idx_labels(np.arange(12) % 3)
    nan_csv = flowers_csv().replace(b"\n", b"\nnan,1,1,1,setosa\n", 1)
    cases = [
        ("npz", {"file": ("d.npz", png)}, {}, "not an NPZ"),
        ("csv", {"file": ("d.csv", npz_bytes(X=np.zeros((12, 2)), y=np.arange(12)))}, {"label_column": "y"},
         "not CSV"),
        ("idx", {"images": ("i", png), "labels": ("l", labels)}, {}, "not an IDX file"),
        ("idx", {"images": ("i", images), "labels": ("l", images)}, {}, "2049"),  # images where labels belong
        ("idx", {"images": ("i", images)}, {}, "images and labels"),
        ("csv", {"file": ("d.csv", nan_csv)}, {"label_column": "species"}, "line 2"),
        ("npz", {"file": ("d.npz", npz_bytes(X=np.full((12, 2), np.nan), y=np.arange(12) % 2))}, {}, "NaN"),
        ("csv", {"file": ("d.csv", flowers_csv())}, {"label_column": "colour"}, "not in the header"),
        ("csv", {"file": ("d.csv", flowers_csv())}, {"label_column": "species", "feature_groups": "{oops"},
         "must be JSON"),
        ("csv", {"file": ("d.csv", flowers_csv())},
         {"label_column": "species", "feature_groups": '{"a": ["x"]}'}, "unknown column 'x'"),
    ]
    for kind, files, form, message in cases:
        response = upload(client, kind, files, **form)
        assert response.status_code == 422, (kind, message, response.text)
        assert message in detail_text(response), (message, response.text)
    assert upload(client, "parquet", {"file": ("d", b"PAR1")}).status_code == 422


def test_too_large_uploads_and_zip_bombs_are_413(settings: Settings, db: Database, tmp_path: Path) -> None:
    small = make_settings(settings.database_url, tmp_path / "small", max_upload_bytes=100_000)
    client = client_for(small, db)
    data = flowers_csv(4000)
    assert len(data) > 100_000
    response = upload(client, "csv", {"file": ("big.csv", data)}, label_column="species")
    assert response.status_code == 413, response.text
    huge = upload(client, "csv", {"file": ("huge.csv", data * 20)}, label_column="species")
    assert huge.status_code == 413  # refused by the body limit before the form is parsed
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        npy = io.BytesIO()
        np.save(npy, np.zeros((1000, 1000), dtype=np.float32))  # 4 MB of zeros
        zf.writestr("X.npy", npy.getvalue())
        labels = io.BytesIO()
        np.save(labels, np.arange(1000) % 2)
        zf.writestr("y.npy", labels.getvalue())
    assert len(bomb.getvalue()) < 20_000
    response = upload(client, "npz", {"file": ("bomb.npz", bomb.getvalue())})
    assert response.status_code == 413 and "expands" in detail_text(response)
    gz_images = gzip.compress(idx_images(np.zeros((2000, 28, 28))))
    gz_labels = idx_labels(np.arange(2000) % 2)
    response = upload(client, "idx", {"images": ("i.gz", gz_images), "labels": ("l", gz_labels)})
    assert response.status_code == 413, response.text
    assert not [d for d in client.get(f"{API}/datasets").json()["data"] if not d["builtin"]]


# ---- a study on an upload ------------------------------------------------------------------------------


def test_a_study_on_an_uploaded_csv_with_feature_groups(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    dataset = upload(client, "csv", {"file": ("flowers.csv", flowers_csv(80))}, name="flowers",
                     label_column="species", feature_groups=GROUPS).json()
    spec = study_spec(name="on-upload", dataset=dataset["id"], sampler={"name": "grid", "seed": 0},
                      budget={"n_trials": 2, "epochs": 3})
    spec["search_space"] = {"branch_merge": {"type": "categorical", "choices": ["concat", "add"]},
                            "optimizer": "adam", "learning_rate": 3e-2, "units": 8, "n_layers": 1,
                            "dropout": 0.0, "weight_decay": 0.0, "batch_size": 16, "activation": "relu",
                            "batch_norm": "none", "weight_init": "he_normal", "lr_schedule": "constant",
                            "layer_shape": "constant"}
    created = client.post(f"{API}/studies", json=spec)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    with running_supervisor(settings, db, slots=2):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert sorted(t["params"]["branch_merge"] for t in trials) == ["add", "concat"]
    assert study["best_trial"]["value"] > 0.9  # two well separated species
    assert study["test_metrics"]["test_accuracy"] > 0.9


# ---- concurrency ---------------------------------------------------------------------------------------


def test_other_requests_are_answered_while_an_upload_parses(settings: Settings, db: Database,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The parse runs in a worker thread: it is held mid-parse until another request has been answered."""
    parsing, release = threading.Event(), threading.Event()
    order: list[str] = []
    real_parse = datasets_service.parse_upload

    def held_parse(*args: Any, **kwargs: Any) -> Any:
        parsing.set()
        release.wait(60)  # the real parse, held until the test lets it go
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(datasets_service, "parse_upload", held_parse)
    with client_for(settings, db) as client:  # one event loop serves every request, as in a server
        uploaded: list[Any] = []
        uploader = threading.Thread(target=lambda: uploaded.append(
            upload(client, "csv", {"file": ("f.csv", flowers_csv(), "text/csv")}, label_column="species")))
        uploader.start()
        assert parsing.wait(60)
        answered = threading.Event()

        def other_request() -> None:
            assert client.get(f"{API}/datasets").status_code == 200
            order.append("other request answered")
            answered.set()

        threading.Thread(target=other_request).start()
        answered.wait(60)  # a parse on the event loop would hold this request until the release below
        order.append("parse released")
        release.set()
        uploader.join()
    assert uploaded[0].status_code == 201, uploaded[0].text
    assert order == ["other request answered", "parse released"]
