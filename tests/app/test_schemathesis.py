"""Schemathesis against the OpenAPI schema, in process: no server error for any generated request, and every
response (status, headers, body) conforms to the schema, errors included."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.core.db import Database
from app.main import create_app
from app.services import keys
from tests.conftest import make_settings
from tests.factories import API, study_spec

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = 25  # per operation: enough to reach every error path, short enough for CI


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[tuple[Any, str]]:
    home = tmp_path_factory.mktemp("schemathesis")
    shutil.copy(sqlite_template, home / "hpsearch.db")
    url = f"sqlite:///{home / 'hpsearch.db'}"
    db = Database(url)
    app = create_app(make_settings(url, home / "home"), db)
    key = keys.create_key(db, owner="fuzz")
    yield app, key
    db.dispose()


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_api_conforms_to_its_schema(served: tuple[Any, str], mode: GenerationMode) -> None:
    """Every operation, with generated valid and invalid requests; failures are collected per operation."""
    app, key = served
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    # One real study, so that generated ids sometimes meet data rather than only 404s.
    assert client.post(f"{API}/studies", json=study_spec()).status_code in (200, 201)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = _operations(schema)
    assert len(operations) >= 20
    failures: dict[str, str] = {}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def check(case: Any) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to get wrong: no parameters
        except (Exception, BaseExceptionGroup) as exc:  # gathered: one run names every failing operation
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert failures == {}, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
