"""Security: every endpoint of the OpenAPI schema scoped to its owner, API keys, rate limits, safe binding.

The isolation matrix is built from `app.openapi()`: a new endpoint is covered the day it is added. Another
owner's study, trials, events, artifacts and datasets answer exactly as if they did not exist.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.db import Database
from app.main import create_app
from app.models import ApiKey
from app.services import keys
from tests.conftest import fresh_database, make_settings
from tests.factories import (
    API,
    auth_headers,
    client_for,
    create_study_via_api,
    running_supervisor,
    study_spec,
    wait_for_status,
)

DIGITS_INPUT = [[0.0] * 64]
# A valid body for each operation that takes one and works on an existing resource: with a valid body the
# answer comes from the owner check, not from validation. A new operation with a body must be added here.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", f"{API}/studies/{{study_id}}/trials"): {"params": {"learning_rate": 0.01}},
    ("post", f"{API}/studies/{{study_id}}/predict"): {"inputs": DIGITS_INPUT},
    ("post", f"{API}/studies/{{study_id}}/trials/{{number}}/extend"): {"epochs": 1},
}


@dataclass
class World:
    """Alice's finished study (trials, weights, ensemble) and uploaded dataset; Bob owns nothing of it."""

    alice: TestClient
    bob: TestClient
    db: Database
    study_id: str
    trial_number: int
    dataset_id: str  # "dataset:<hex>"

    def path_values(self) -> dict[str, str]:
        return {"study_id": self.study_id, "number": str(self.trial_number),
                "dataset_id": self.dataset_id.removeprefix("dataset:")}

    def missing_values(self) -> dict[str, str]:
        """The same shapes, naming nothing that exists."""
        return {"study_id": uuid.uuid4().hex, "number": "987654",
                "dataset_id": hashlib.sha256(b"nothing").hexdigest()[:24]}

    def secrets(self) -> list[str]:
        return [self.study_id, self.dataset_id.removeprefix("dataset:")]


def _csv(n: int = 40) -> bytes:
    rows = ["a,b,label"] + [f"{i % 7}.5,{(i * 3) % 5}.25,{'yes' if i % 2 else 'no'}" for i in range(n)]
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          sqlite_template: Path) -> Iterator[World]:
    home = tmp_path_factory.mktemp("security")
    urls = fresh_database(request.param, home, sqlite_template)
    url = next(urls)
    settings = make_settings(url, home / "home")
    db = Database(url)
    alice, bob = client_for(settings, db, "alice"), client_for(settings, db, "bob")
    uploaded = alice.post(f"{API}/datasets", data={"kind": "csv", "name": "secret", "label_column": "label"},
                          files={"file": ("s.csv", _csv(), "text/csv")})
    assert uploaded.status_code == 201, uploaded.text
    sid = create_study_via_api(alice, budget={"n_trials": 2, "epochs": 1})
    with running_supervisor(settings, db, slots=1):
        assert wait_for_status(alice, sid, {"completed", "failed"})["status"] == "completed"
    number = alice.get(f"{API}/studies/{sid}").json()["best_trial"]["number"]
    yield World(alice, bob, db, sid, number, uploaded.json()["id"])
    db.dispose()
    for _ in urls:  # drops the PostgreSQL database
        pass


def _operations(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    schema = client.app.openapi()  # type: ignore[attr-defined]
    return [(method, path, op) for path, ops in schema["paths"].items() for method, op in ops.items()
            if path.startswith(API)]


def _fill(path: str, values: dict[str, str]) -> str:
    names = re.findall(r"{(\w+)}", path)
    unknown = [n for n in names if n not in values]
    assert not unknown, f"{path}: add a value for {unknown} to World.path_values()"
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], path)


def _call(client: TestClient, method: str, path: str, template: str, op: dict[str, Any]) -> Any:
    body = None
    if "requestBody" in op:
        assert (method, template) in BODIES, f"add a valid body for {method.upper()} {template} to BODIES"
        body = BODIES[(method, template)]
    return client.request(method.upper(), path, json=body)


def _scoped(op: tuple[str, str, dict[str, Any]]) -> bool:
    return "{" in op[1]


def test_the_matrix_covers_every_owned_endpoint(world: World) -> None:
    scoped = [op for op in _operations(world.alice) if _scoped(op)]
    assert len(scoped) >= 10  # studies, trials, datasets, models, events, ... all reached below
    assert {p for _m, p, _o in scoped} >= {f"{API}/studies/{{study_id}}", f"{API}/studies/{{study_id}}/events",
                                           f"{API}/studies/{{study_id}}/trials/{{number}}",
                                           f"{API}/datasets/{{dataset_id}}"}


def test_another_owners_resources_answer_exactly_like_missing_ones(world: World) -> None:
    """For every operation on an owned resource: Bob gets 404, the same answer a nonexistent id gets."""
    checked = []
    for method, template, op in _operations(world.alice):
        if not _scoped((method, template, op)):
            continue
        theirs = _call(world.bob, method, _fill(template, world.path_values()), template, op)
        missing = _call(world.bob, method, _fill(template, world.missing_values()), template, op)
        assert theirs.status_code == 404, (method, template, theirs.status_code, theirs.text)
        assert missing.status_code == 404, (method, template, missing.status_code, missing.text)
        shown = theirs.text
        for secret in world.secrets():
            shown = shown.replace(secret, "<id>")
        hidden = missing.text
        for value in world.missing_values().values():
            hidden = hidden.replace(value, "<id>")
        assert shown == hidden, (method, template, shown, hidden)  # not even the wording tells them apart
        checked.append((method, template))
    assert len(checked) >= 10


def test_the_owner_reaches_every_endpoint_the_matrix_refuses_to_others(world: World) -> None:
    """The same requests from Alice reach her resources: the 404s above come from ownership alone."""
    # Extending her trial sets her study running again, and its event stream would then never end: last.
    for method, template, op in sorted(_operations(world.alice), key=lambda o: o[1].endswith("/extend")):
        if not _scoped((method, template, op)) or method == "delete":
            continue
        mine = _call(world.alice, method, _fill(template, world.path_values()), template, op)
        assert mine.status_code != 404 and mine.status_code < 500, (method, template, mine.status_code, mine.text)
    # Her study ends again (the extension with it, leaving the trial as it was) for the tests after this one.
    assert world.alice.post(f"{API}/studies/{world.study_id}/cancel").status_code == 200


def test_another_owners_things_are_never_listed(world: World) -> None:
    for method, template, _op in _operations(world.bob):
        if method != "get" or "{" in template:
            continue
        response = world.bob.get(template)
        assert response.status_code == 200, (template, response.text)
        assert not [s for s in world.secrets() if s in response.text], template
    assert world.bob.get(f"{API}/studies", params={"status": "completed"}).json()["count"] == 0
    assert world.alice.get(f"{API}/studies").json()["count"] >= 1


def test_another_owner_cannot_build_on_my_study_or_dataset(world: World) -> None:
    def create(**overrides: Any) -> Any:
        return world.bob.post(f"{API}/studies", json=study_spec(**overrides))

    theirs, missing = create(dataset=world.dataset_id), create(dataset="dataset:" + "0" * 24)
    assert theirs.status_code == missing.status_code == 422
    assert theirs.json()["detail"][0]["loc"] == missing.json()["detail"][0]["loc"] == ["body", "dataset"]
    assert create(warm_start={"studies": [world.study_id]}).status_code == 404


def test_the_same_upload_by_two_owners_gives_each_their_own_dataset(world: World) -> None:
    mine = world.bob.post(f"{API}/datasets", data={"kind": "csv", "name": "mine", "label_column": "label"},
                          files={"file": ("s.csv", _csv(), "text/csv")})
    assert mine.status_code == 201, mine.text
    assert mine.json()["id"] != world.dataset_id and mine.json()["name"] == "mine"
    assert world.alice.get(f"{API}/datasets/{world.dataset_id}").json()["name"] == "secret"


def test_every_deletion_by_another_owner_leaves_the_study_whole(world: World) -> None:
    before = world.alice.get(f"{API}/studies/{world.study_id}").json()
    for action in ("pause", "cancel"):
        assert world.bob.post(f"{API}/studies/{world.study_id}/{action}").status_code == 404
    assert world.bob.delete(f"{API}/studies/{world.study_id}").status_code == 404
    after = world.alice.get(f"{API}/studies/{world.study_id}").json()
    assert after == before


def test_clients_cannot_set_owner_state_or_optuna_attributes(world: World) -> None:
    for field, value in (("owner", "alice"), ("status", "completed"), ("id", "0" * 32),
                         ("system_attrs", {"cma:restart": 1}), ("user_attrs", {"a": 1})):
        response = world.bob.post(f"{API}/studies", json={**study_spec(), field: value})
        assert response.status_code == 422, (field, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", field]
    enqueued = world.alice.post(f"{API}/studies/{world.study_id}/trials",
                                json={"params": {"learning_rate": 0.01}, "system_attrs": {"x": 1}})
    assert enqueued.status_code == 422


# ---- API keys ------------------------------------------------------------------------------------------


def _cli(*args: str, url: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HPSEARCH_DATABASE_URL": url, "HPSEARCH_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_keys_are_random_256_bit_shown_once_hashed_at_rest_and_revocable(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    created = _cli("keys", "create", "--owner", "carol", url=sqlite_url, home=tmp_path / "home")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert created.stdout.strip() == key  # the key alone on stdout; the notice goes to stderr
    secret = key.removeprefix(keys.KEY_PREFIX)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)  # 32 random bytes, base64url: 256 bits
    with db.read_session() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.owner == "carol")).all()
    assert [r.key_hash for r in rows] == [hashlib.sha256(key.encode()).hexdigest()]
    assert not any(secret in str(v) for r in rows for v in vars(r).values())  # the key itself is not stored
    files = Path(sqlite_url.removeprefix("sqlite:///")).parent.glob("hpsearch.db*")  # with the WAL
    assert not [f for f in files if secret.encode() in f.read_bytes()]
    assert key != keys.create_key(db, owner="carol")

    client = TestClient(create_app(settings, db))
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get(f"{API}/studies", headers=auth).status_code == 200
    for wrong in ({"Authorization": f"Bearer {key[:-1]}"}, {"Authorization": f"Basic {key}"},
                  {"Authorization": key}, {"X-API-Key": key}, {}):
        response = client.get(f"{API}/studies", headers=wrong)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", wrong
    # keys only in the header: never from the query string or a cookie
    assert client.get(f"{API}/studies", params={"api_key": key}).status_code == 401
    client.cookies.set("api_key", key)
    assert client.get(f"{API}/studies").status_code == 401
    client.cookies.clear()

    revoked = _cli("keys", "revoke", key[:10], url=sqlite_url, home=tmp_path / "home")
    assert revoked.returncode == 0 and "revoked 1 key" in revoked.stdout, revoked.stderr
    response = client.get(f"{API}/studies", headers=auth)
    assert response.status_code == 401 and "revoked" in response.json()["detail"]
    db.dispose()


def _limited(sqlite_url: str, tmp_path: Path) -> tuple[TestClient, Database]:
    settings = make_settings(sqlite_url, tmp_path / "home").model_copy(
        update={"rate_limit_per_s": 0.5, "rate_limit_burst": 3})
    db = Database(sqlite_url)
    return client_for(settings, db, "alice"), db


def test_rate_limit_answers_429_with_retry_after(sqlite_url: str, tmp_path: Path) -> None:
    client, db = _limited(sqlite_url, tmp_path)
    codes = [client.get(f"{API}/studies").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    limited = client.get(f"{API}/studies")
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 2
    db.dispose()


def test_two_keys_of_one_owner_have_separate_buckets(sqlite_url: str, tmp_path: Path) -> None:
    """The limit is per key, as promised: a second key of the same owner starts with its own full burst."""
    client, db = _limited(sqlite_url, tmp_path)
    other = TestClient(client.app, headers=auth_headers(db, 'alice'))
    assert [client.get(f"{API}/studies").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert [other.get(f"{API}/studies").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert client.get(f"{API}/studies").status_code == 429  # the first key's bucket was left empty
    db.dispose()


def test_serve_refuses_a_public_address_without_authentication(tmp_path: Path) -> None:
    env = {**os.environ, "HPSEARCH_AUTH_ENABLED": "false", "HPSEARCH_HOME": str(tmp_path)}
    for host in ("0.0.0.0", "::"):
        done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", host, "--workers", "0"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, host
        assert "refusing to bind" in done.stderr and "HPSEARCH_AUTH_ENABLED" in done.stderr
    assert not (tmp_path / "hpsearch.db").exists()  # refused before touching anything
