"""A table of bad requests and the 4xx each one must get: never a 500 for anything a client sends."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import Database
from app.services.trials import cursor_kinds
from tests.conftest import fresh_database, make_settings
from tests.factories import API, client_for, study_spec

STUDY = "{study}"  # replaced by a real study of the caller


def _spec(**overrides: Any) -> dict[str, Any]:
    return study_spec(**overrides)


def _raw(spec_text: str) -> dict[str, Any]:
    """A JSON body sent byte for byte (to carry what json.dumps would not write)."""
    return {"content": spec_text.encode(), "headers": {"Content-Type": "application/json"}}


def _with(text_value: str, key: str = "validation_split") -> dict[str, Any]:
    body = json.dumps({**_spec(), key: "@@"}).replace('"@@"', text_value)
    return _raw(body)


@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    request: dict[str, Any] = field(default_factory=dict)  # a callable content is a fresh generator per run
    loc: list[Any] | None = None  # for 422: where the error is


def _chunks(total: int) -> Iterator[bytes]:
    chunk = b" " * 65536
    for _ in range(total // len(chunk)):
        yield chunk


def _chunked_upload(total: int) -> Iterator[bytes]:
    """A multipart CSV upload sent without Content-Length, so only counting what arrives can stop it."""
    yield b'--b0undary\r\nContent-Disposition: form-data; name="kind"\r\n\r\ncsv\r\n'
    yield b'--b0undary\r\nContent-Disposition: form-data; name="label_column"\r\n\r\ny\r\n'
    yield b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="x.csv"\r\n\r\ny\n'
    for _ in range(total // 65536):
        yield b"1\n" * 32768
    yield b"\r\n--b0undary--\r\n"


def _cursor(values: list[Any]) -> dict[str, Any]:
    text = base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")
    return {"params": {"cursor": text}}


# What a trials cursor holds (its sort keys, by number), each position a well-typed value; cases below put a
# wrong one in a single position, so they test element types, not the cursor's length.
_TRIAL_KINDS = cursor_kinds("number")


def _trial_cursor(position: int, value: Any) -> dict[str, Any]:
    good: dict[type, Any] = {int: 0, float: 0.5, str: "x"}
    values = [good[kind] for kind in _TRIAL_KINDS]
    values[position] = value
    return _cursor(values)


CASES = [
    # literals Python's json accepts but JSON does not
    Case("NaN literal", "POST", "/studies", 422, _with("NaN"), ["body"]),
    Case("Infinity literal", "POST", "/studies", 422, _with("Infinity"), ["body"]),
    Case("-Infinity nested", "POST", "/studies", 422, _with('{"timeout_s": -Infinity}', "budget"), ["body"]),
    Case("number overflowing to inf", "POST", "/studies", 422, _with("1e400"), ["body"]),
    Case("NaN in enqueued params", "POST", f"/studies/{STUDY}/trials", 422,
         _raw('{"params": {"learning_rate": NaN}}'), ["body"]),
    # size and media type, refused before parsing
    Case("body over the limit", "POST", "/studies", 413, {"json": {**_spec(), "name": "x" * (2 * 2**20)}}),
    Case("chunked body over the limit", "POST", "/studies", 413,
         {"content": lambda: _chunks(2 * 2**20), "headers": {"Content-Type": "application/json"}}),
    Case("text/plain body", "POST", "/studies", 415,
         {"content": json.dumps(_spec()).encode(), "headers": {"Content-Type": "text/plain"}}),
    Case("form body", "POST", "/studies", 415, {"data": {"name": "x"}}),
    Case("multipart to a JSON route", "POST", f"/studies/{STUDY}/trials", 415,
         {"files": {"params": ("p.json", b"{}", "application/json")}}),
    # malformed JSON
    Case("truncated JSON", "POST", "/studies", 422, _raw('{"name": "x", '), ["body"]),
    Case("a list instead of an object", "POST", "/studies", 422, _raw("[1, 2]"), ["body"]),
    Case("nested 100k deep", "POST", "/studies", 422, _raw("[" * 100_000 + "]" * 100_000), ["body"]),
    # the spec's rules
    Case("unknown field", "POST", "/studies", 422, {"json": {**_spec(), "colour": "red"}}, ["body", "colour"]),
    Case("unknown nested field", "POST", "/studies", 422,
         {"json": _spec(budget={"speed": 11})}, ["body", "budget", "speed"]),
    Case("n_trials 0", "POST", "/studies", 422, {"json": _spec(budget={"n_trials": 0})},
         ["body", "budget", "n_trials"]),
    Case("n_trials too many", "POST", "/studies", 422, {"json": _spec(budget={"n_trials": 10**6 + 1})},
         ["body", "budget", "n_trials"]),
    Case("epochs too many", "POST", "/studies", 422, {"json": _spec(budget={"epochs": 100_000})},
         ["body", "budget", "epochs"]),
    Case("negative timeout", "POST", "/studies", 422, {"json": _spec(budget={"timeout_s": -1})},
         ["body", "budget", "timeout_s"]),
    Case("validation split 0.9", "POST", "/studies", 422, {"json": _spec(validation_split=0.9)},
         ["body", "validation_split"]),
    Case("empty name", "POST", "/studies", 422, {"json": _spec(name="")}, ["body", "name"]),
    Case("name too long", "POST", "/studies", 422, {"json": _spec(name="n" * 201)}, ["body", "name"]),
    Case("unknown sampler", "POST", "/studies", 422, {"json": _spec(sampler={"name": "bayes"})},
         ["body", "sampler", "name"]),
    Case("unknown pruner", "POST", "/studies", 422, {"json": _spec(pruner={"name": "guess"})},
         ["body", "pruner", "name"]),
    Case("log range touching 0", "POST", "/studies", 422,
         {"json": _spec(search_space={"learning_rate": {"type": "float", "low": 0, "high": 0.1, "log": True}})},
         ["body", "search_space", "learning_rate", "low"]),
    Case("low above high", "POST", "/studies", 422,
         {"json": _spec(search_space={"units": {"type": "int", "low": 64, "high": 32}})},
         ["body", "search_space", "units"]),
    Case("undocumented hyperparameter", "POST", "/studies", 422,
         {"json": _spec(search_space={"wings": 2})}, ["body", "search_space", "wings"]),
    Case("too many search-space entries", "POST", "/studies", 422,
         {"json": _spec(search_space={f"p{i}": 1 for i in range(65)})}, ["body", "search_space"]),
    Case("metric of another task", "POST", "/studies", 422,
         {"json": _spec(objective={"metric": "val_mse"})}, ["body", "objective", "metric"]),
    Case("unknown metric", "POST", "/studies", 422,
         {"json": _spec(objective={"metric": "accuracy"})}, ["body", "objective", "metric"]),
    Case("unknown second metric", "POST", "/studies", 422,
         {"json": _spec(objective=[{"metric": "val_accuracy"}, {"metric": "flops"}], pruner={"name": "none"})},
         ["body", "objective", 1, "metric"]),
    Case("dataset that is a path", "POST", "/studies", 422, {"json": _spec(dataset="../../etc/passwd")},
         ["body", "dataset"]),
    Case("unknown built-in dataset", "POST", "/studies", 422, {"json": _spec(dataset="builtin:nope")},
         ["body", "dataset"]),
    Case("owner in the body", "POST", "/studies", 422, {"json": {**_spec(), "owner": "root"}}, ["body", "owner"]),
    Case("Idempotency-Key too long", "POST", "/studies", 422,
         {"json": _spec(), "headers": {"Idempotency-Key": "k" * 201}}, ["header", "idempotency-key"]),
    # queries and paths
    Case("cursor that is not ours", "GET", "/studies", 422, {"params": {"cursor": "bm90IGEgY3Vyc29y"}},
         ["query", "cursor"]),
    Case("cursor of the wrong shape", "GET", f"/studies/{STUDY}/trials", 422,
         {"params": {"cursor": "WzFd"}}, ["query", "cursor"]),
    Case("study cursor with a number for its date", "GET", "/studies", 422, _cursor([1, "x"]), ["query", "cursor"]),
    Case("study cursor with a date that is not ISO", "GET", "/studies", 422, _cursor(["yesterday", "x"]),
         ["query", "cursor"]),
    Case("study cursor with a naive date", "GET", "/studies", 422, _cursor(["2024-01-01T00:00:00", "x"]),
         ["query", "cursor"]),
    Case("study cursor with a date before year 1 in UTC", "GET", "/studies", 422,
         _cursor(["0001-01-01T00:00:00+05:00", "x"]), ["query", "cursor"]),
    Case("study cursor with nested values", "GET", "/studies", 422, _cursor([["2024"], {"id": "x"}]),
         ["query", "cursor"]),
    Case("study cursor with a number for its id", "GET", "/studies", 422,
         _cursor(["2024-01-01T00:00:00+00:00", 7]), ["query", "cursor"]),
    Case("study cursor with a NUL in its id", "GET", "/studies", 422,
         _cursor(["2024-01-01T00:00:00+00:00", "a\u0000b"]), ["query", "cursor"]),
    Case("trial cursor with a string for a number", "GET", f"/studies/{STUDY}/trials", 422,
         _trial_cursor(0, "zero"), ["query", "cursor"]),
    Case("trial cursor with a list for a number", "GET", f"/studies/{STUDY}/trials", 422,
         _trial_cursor(1, [1, 2]), ["query", "cursor"]),
    Case("trial cursor with an object for a number", "GET", f"/studies/{STUDY}/trials", 422,
         _trial_cursor(-1, {"n": 1}), ["query", "cursor"]),
    Case("trial cursor with a fraction for a trial number", "GET", f"/studies/{STUDY}/trials", 422,
         _trial_cursor(1, 0.5), ["query", "cursor"]),
    Case("trial cursor with an integer beyond 64 bits", "GET", f"/studies/{STUDY}/trials", 422,
         _trial_cursor(0, 10**30), ["query", "cursor"]),
    Case("trial cursor with true for a number", "GET", f"/studies/{STUDY}/trials", 422,
         _trial_cursor(0, True), ["query", "cursor"]),
    Case("trial cursor by value with NaN", "GET", f"/studies/{STUDY}/trials", 422,
         {"params": {**_trial_cursor(1, float("nan"))["params"], "sort": "value"}}, ["query", "cursor"]),
    Case("limit 0", "GET", "/studies", 422, {"params": {"limit": 0}}, ["query", "limit"]),
    Case("page too large", "GET", f"/studies/{STUDY}/trials", 422, {"params": {"limit": 100_000}},
         ["query", "limit"]),
    Case("unknown status filter", "GET", "/studies", 422, {"params": {"status": "exploded"}}, ["query", "status"]),
    Case("trial number not a number", "GET", f"/studies/{STUDY}/trials/first", 422, {},
         ["path", "number"]),
    Case("trial number beyond any integer column", "GET", f"/studies/{STUDY}/trials/{10**30}", 422, {},
         ["path", "number"]),
    Case("negative trial number", "GET", f"/studies/{STUDY}/trials/-1", 422, {}, ["path", "number"]),
    Case("model of a trial number beyond any integer column", "GET", f"/studies/{STUDY}/trials/{10**30}/model",
         422, {}, ["path", "number"]),
    Case("study id of 5000 characters", "GET", "/studies/" + "f" * 5000, 404),
    Case("enqueued value outside the space", "POST", f"/studies/{STUDY}/trials", 422,
         {"json": {"params": {"learning_rate": 5.0}}}, ["body", "params", "learning_rate"]),
    Case("enqueued unknown name", "POST", f"/studies/{STUDY}/trials", 422,
         {"json": {"params": {"wings": 2}}}, ["body", "params", "wings"]),
    Case("unknown dataset kind", "POST", "/datasets", 422,
         {"data": {"kind": "pickle"}, "files": {"file": ("x.pkl", b"\x80\x04K\x01.", "application/octet-stream")}},
         ["body", "kind"]),
    Case("upload over the limit", "POST", "/datasets", 413,
         {"data": {"kind": "csv", "label_column": "y"}, "files": {"file": ("x.csv", b"y\n" + b"1\n" * 40_000)}}),
    Case("chunked upload over the limit", "POST", "/datasets", 413,
         {"content": lambda: _chunked_upload(512 * 1024),
          "headers": {"Content-Type": "multipart/form-data; boundary=b0undary"}}),
]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        sqlite_template: Path) -> Iterator[tuple[TestClient, str]]:
    """The table runs on both databases: they fail differently on a badly typed value (PostgreSQL casts)."""
    home = tmp_path_factory.mktemp("bad-inputs")
    urls = fresh_database(request.param, home, sqlite_template)
    url = next(urls)
    settings = make_settings(url, home / "home").model_copy(update={"max_upload_bytes": 64 * 1024})
    db = Database(url)
    client = client_for(settings, db)
    created = client.post(f"{API}/studies", json=_spec())
    assert created.status_code == 201, created.text
    yield client, created.json()["id"]
    db.dispose()
    for _ in urls:  # drops the PostgreSQL database
        pass


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_4xx(api: tuple[TestClient, str], case: Case) -> None:
    client, study_id = api
    request = {k: v() if k == "content" and callable(v) else v for k, v in case.request.items()}
    response = client.request(case.method, API + case.path.replace(STUDY, study_id), **request)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    assert "detail" in body
    if case.loc is not None:
        assert body["detail"][0]["loc"][: len(case.loc)] == case.loc, body["detail"]
    if case.status == 413:
        assert "larger than" in body["detail"]


@pytest.mark.parametrize(("task", "metric", "allowed", "not_allowed"), [
    ("classification", "accuracy", ["val_accuracy", "val_loss"], "val_mse"),
    ("classification", "val_mae", ["val_accuracy", "val_loss"], "val_mse"),
    ("regression", "val_accuracy", ["val_mse", "val_mae", "val_loss"], "val_accuracy,"),
])
def test_a_wrong_metric_is_one_error_at_objective_metric_listing_the_tasks_metrics(
        api: tuple[TestClient, str], task: str, metric: str, allowed: list[str], not_allowed: str) -> None:
    client, _ = api
    dataset = "builtin:synthetic_regression" if task == "regression" else "builtin:digits"
    response = client.post(f"{API}/studies", json=_spec(dataset=dataset, task=task, objective={"metric": metric}))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "objective", "metric"]
    assert repr(metric) in error["msg"] and all(m in error["msg"] for m in allowed), error["msg"]
    assert not_allowed not in error["msg"] + ",", error["msg"]


def test_an_unknown_dataset_lists_the_names_the_caller_can_use(api: tuple[TestClient, str]) -> None:
    client, _ = api
    uploaded = client.post(f"{API}/datasets", data={"kind": "csv", "label_column": "y", "name": "mine"},
                           files={"file": ("m.csv", b"a,y\n" + b"".join(b"%d,%d\n" % (i, i % 2) for i in range(20)))})
    assert uploaded.status_code == 201, uploaded.text
    for wrong in ("iris", "builtin:irises", "dataset:0123456789abcdef"):
        response = client.post(f"{API}/studies", json=_spec(dataset=wrong))
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "dataset"], error
        if wrong == "iris":  # not a reference at all: the message says how to write one
            assert "did you mean builtin:iris?" in error["msg"] and "pattern" not in error["msg"], error["msg"]
        else:
            for name in ("builtin:iris", "builtin:digits", "builtin:synthetic_regression", uploaded.json()["id"]):
                assert name in error["msg"], error["msg"]
    own = client.get(f"{API}/datasets/builtin:nope")
    assert own.status_code == 404 and "builtin:iris" in own.json()["detail"]


def test_mnist_without_its_folder_says_which_folder_and_which_setting(sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    try:
        for mnist_dir, expected in ((None, "set HPSEARCH_MNIST_DIR"),
                                    (tmp_path / "no-such-folder", str(tmp_path / "no-such-folder")),
                                    (tmp_path, str(tmp_path))):  # a folder without IDX files
            settings = make_settings(sqlite_url, tmp_path / "home").model_copy(update={"mnist_dir": mnist_dir})
            response = client_for(settings, db).post(f"{API}/studies", json=_spec(dataset="builtin:mnist"))
            assert response.status_code == 422, response.text
            [error] = response.json()["detail"]
            assert error["loc"] == ["body", "dataset"] and expected in error["msg"], error["msg"]
            assert "HPSEARCH_MNIST_DIR" in error["msg"]
    finally:
        db.dispose()
