"""A table of bad requests and the 4xx each one must get: never a 500 for anything a client sends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import Database
from tests.conftest import make_settings
from tests.factories import client_for, study_spec

API = "/api/v1"
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
    request: dict[str, Any] = field(default_factory=dict)
    loc: list[Any] | None = None  # for 422: where the error is


def _chunks(total: int) -> Iterator[bytes]:
    chunk = b" " * 65536
    for _ in range(total // len(chunk)):
        yield chunk


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
         {"content": _chunks(2 * 2**20), "headers": {"Content-Type": "application/json"}}),
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
    Case("n_trials too many", "POST", "/studies", 422, {"json": _spec(budget={"n_trials": 10**6})},
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
         {"json": _spec(objective={"metric": "val_mse"})}, ["body"]),
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
    Case("limit 0", "GET", "/studies", 422, {"params": {"limit": 0}}, ["query", "limit"]),
    Case("page too large", "GET", f"/studies/{STUDY}/trials", 422, {"params": {"limit": 100_000}},
         ["query", "limit"]),
    Case("unknown status filter", "GET", "/studies", 422, {"params": {"status": "exploded"}}, ["query", "status"]),
    Case("trial number not a number", "GET", f"/studies/{STUDY}/trials/first", 422, {},
         ["path", "number"]),
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
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[tuple[TestClient, str]]:
    import shutil

    home = tmp_path_factory.mktemp("bad-inputs")
    shutil.copy(sqlite_template, home / "hpsearch.db")
    url = f"sqlite:///{home / 'hpsearch.db'}"
    settings = make_settings(url, home / "home").model_copy(update={"max_upload_bytes": 64 * 1024})
    db = Database(url)
    client = client_for(settings, db)
    created = client.post(f"{API}/studies", json=_spec())
    assert created.status_code == 201, created.text
    yield client, created.json()["id"]
    db.dispose()


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_4xx(api: tuple[TestClient, str], case: Case) -> None:
    client, study_id = api
    response = client.request(case.method, API + case.path.replace(STUDY, study_id), **case.request)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    assert "detail" in body
    if case.loc is not None:
        assert body["detail"][0]["loc"][: len(case.loc)] == case.loc, body["detail"]
    if case.status == 413:
        assert "larger than" in body["detail"]
