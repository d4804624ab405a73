"""The OpenAPI document lists every status each operation answers; requests that provoke each error agree.

Schemathesis (test_schemathesis.py) checks generated requests against the document; it cannot send a broken
multipart form, a body over the size limit or a body of the wrong media type, which the middleware and
FastAPI's body parser answer before any route runs. This walks every operation with those.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from tests.factories import client_for

MUTATIONS = ("post", "put", "patch")
UNKNOWN = {"study_id": "0" * 32, "dataset_id": "0" * 24, "number": "999999"}


def _operations(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    document = client.get("/openapi.json").json()
    return [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: UNKNOWN[m.group(1)], path)


@pytest.fixture
def client(settings: Settings, db: Database) -> TestClient:
    return client_for(settings, db)


def test_each_operation_documents_the_errors_it_can_answer(client: TestClient) -> None:
    missing: dict[str, set[str]] = {}
    for path, method, op in _operations(client):
        listed = set(op["responses"])
        due = set()
        if path.startswith("/api/"):
            due |= {"401", "429", "503"}
            if "{" in path:
                due.add("404")
            if method in MUTATIONS:
                due |= {"413", "415", "422"}
            if op.get("parameters") or op.get("requestBody"):
                due.add("422")
        if path in ("/readyz", "/metrics"):
            due.add("503")
        assert "400" not in listed, f"{method} {path}"
        if due - listed:
            missing[f"{method.upper()} {path}"] = due - listed
    assert missing == {}


def _documented(client: TestClient, method: str, path: str, response: Any) -> None:
    document = client.get("/openapi.json").json()
    listed = document["paths"][path][method]["responses"]
    assert str(response.status_code) in listed, (method, path, response.status_code, response.text)


def test_every_error_provoked_is_documented_for_its_operation(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    seen: set[int] = set()
    for path, method, _op in _operations(client):
        if not path.startswith("/api/"):
            continue
        url = _url(path)
        probes = [anonymous.request(method, url)]  # no key
        if "{" in path:
            probes.append(client.request(method, url, json={} if method in MUTATIONS else None))
        if method in MUTATIONS:
            probes += [
                client.request(method, url, content=b"x" * 10, headers={"content-type": "text/plain"}),
                client.request(method, url, content=b'{"a": NaN}', headers={"content-type": "application/json"}),
                client.request(method, url, content=b"{}", headers={"content-length": str(10**10),
                                                                     "content-type": "application/json"}),
            ]
        for response in probes:
            assert response.status_code < 500, (method, path, response.text)
            _documented(client, method, path, response)
            seen.add(response.status_code)
    assert {401, 404, 413, 415, 422} <= seen


@pytest.mark.parametrize("body, content_type", [
    (b"--x\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\ncsv", "multipart/form-data; boundary=x"),
    (b"garbage", "multipart/form-data"),  # no boundary
    (b"--x\r\nContent-Disposition: form-data\r\n\r\ncsv\r\n--x--\r\n", "multipart/form-data; boundary=x"),
])
def test_a_malformed_multipart_body_is_a_documented_422(client: TestClient, body: bytes,
                                                        content_type: str) -> None:
    response = client.post("/api/v1/datasets", content=body, headers={"content-type": content_type})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"
    _documented(client, "post", "/api/v1/datasets", response)
