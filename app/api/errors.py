"""Domain errors to HTTP statuses, in one place; every 4xx body has a `detail`.

The same place documents them: every operation of the OpenAPI schema lists the errors it can answer with,
so clients (and schema-driven tests) know a 404 or a 429 is part of the contract, not an accident.
"""

from __future__ import annotations

from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.db import is_transient
from app.schemas.common import did_you_mean
from app.services import errors

DB_RETRY_AFTER_S = 1

_STATUS = {
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.UnsupportedMedia: 415,
    errors.Unauthorized: 401,
}


class ErrorMessage(BaseModel):
    """The body of every error but 422: what went wrong, in words."""

    detail: str


_DESCRIPTIONS = {
    401: "Missing, invalid or revoked API key (send `Authorization: Bearer <key>`).",
    404: "No such resource for this owner (another owner's resources do not exist for you).",
    409: "The request does not apply in the resource's current state.",
    413: "Request body or upload larger than the server's limit.",
    415: "Request body of the wrong media type (send `application/json`; uploads `multipart/form-data`).",
    422: "Invalid request: each item of `detail` names the field (`loc`) and the rule it broke (`msg`); a "
         "malformed body (JSON, NaN or Infinity, a broken multipart form) is reported at `loc` [\"body\"].",
    429: "Rate limit of this key exceeded, or as many event streams open as the key may hold; retry after "
         "`Retry-After` seconds.",
    503: "The database is unavailable for a moment; retry after `Retry-After` seconds.",
}


def domain_error_response(exc: errors.DomainError) -> JSONResponse:
    if isinstance(exc, errors.InvalidInput):
        detail = [{"loc": list(e.loc), "msg": e.message, "type": "value_error"} for e in exc.all]
        return JSONResponse({"detail": detail}, status_code=422)
    if isinstance(exc, errors.RateLimited):
        return JSONResponse({"detail": exc.message}, status_code=429,
                            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})
    status = next(code for cls, code in _STATUS.items() if isinstance(exc, cls))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.DomainError)
        return domain_error_response(exc)

    async def database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        # A dropped connection or a restarting server is the service's trouble, not the client's: 503, and
        # the next request gets a fresh connection (pool_pre_ping). Anything else stays a server error.
        if not is_transient(exc):
            raise exc
        return JSONResponse({"detail": "the database is unavailable for a moment; retry"}, status_code=503,
                            headers={"Retry-After": str(DB_RETRY_AFTER_S)})

    async def malformed_body(request: Request, exc: Exception) -> Response:
        # FastAPI answers a body it cannot parse (a broken multipart form: no boundary, truncated parts)
        # with a bare 400. Malformed JSON is a 422 at loc ["body"]; so is this, with the parser's reason.
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code != 400:
            return await http_exception_handler(request, exc)
        reason = str(exc.__cause__ or exc.detail)[:300]
        detail = [{"loc": ["body"], "msg": f"malformed request body: {reason}", "type": "body_invalid"}]
        return JSONResponse({"detail": detail}, status_code=422)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        body = _body_model(request)
        detail = [_explained(error, body) for error in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)

    app.add_exception_handler(errors.DomainError, handle)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(DBAPIError, database_unavailable)
    app.add_exception_handler(StarletteHTTPException, malformed_body)
    document_error_responses(app)


def _body_model(request: Request) -> type[BaseModel] | None:
    """The pydantic model of the route's JSON body, when it has exactly one."""
    route = request.scope.get("route")
    params = route.dependant.body_params if isinstance(route, APIRoute) else []
    models = _models_in(params[0].field_info.annotation) if len(params) == 1 else []
    return models[0] if len(models) == 1 else None


def _explained(error: dict[str, Any], body: type[BaseModel] | None) -> dict[str, Any]:
    """Pydantic's error in the user's words: an unknown field names the closest field and every one that
    exists there; a validator's own message loses pydantic's "Value error, " prefix."""
    out = dict(error)
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "extra_forbidden" and body is not None and len(loc) >= 2 and loc[0] == "body":
        fields = _fields_at(body, loc[1:-1])
        if fields:
            where = ".".join(str(p) for p in loc[1:-1]) or "the spec"
            out["msg"] = f"unknown field {loc[-1]!r}{did_you_mean(str(loc[-1]), fields)}; {where} takes " \
                         f"{', '.join(fields)}"
    elif error.get("type") == "value_error":
        out["msg"] = str(error.get("msg", "")).removeprefix("Value error, ")
    return out


def _fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """The field names of the model found at `path` inside `model`; list indexes, dict keys and union tags
    (pydantic puts them in locations) are stepped over."""
    candidates = [model]
    for part in path:
        inner = [m for c in candidates if part in c.model_fields
                 for m in _models_in(c.model_fields[part].annotation)]
        candidates = inner or candidates
    names: list[str] = []
    for c in candidates:
        names += [n for n in c.model_fields if n not in names]
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, or inside Optional, unions, lists and dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found += [m for m in _models_in(arg) if m not in found]
    return found


def document_error_responses(app: FastAPI) -> None:
    """Add the error responses each API operation can give to the OpenAPI schema FastAPI generates."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorMessage"] = ErrorMessage.model_json_schema()
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                for status in _statuses(path, method, operation):
                    operation.setdefault("responses", {}).setdefault(str(status), _response(status))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _statuses(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    """Every error status the operation can answer: its dependencies', its services' and the middleware's."""
    if not path.startswith("/api/"):
        return []
    out = [503]
    if operation.get("security"):
        out += [401, 429]
    if "{" in path:
        out += [404, 409]
    if method in ("post", "put", "patch", "delete"):
        out.append(409)
    if method in ("post", "put", "patch"):
        # BodyLimitMiddleware answers any body sent here, before the route: too large, not JSON, NaN.
        out += [413, 415, 422]
    if "requestBody" in operation or operation.get("parameters"):
        out.append(422)
    return sorted(set(out))


def _response(status: int) -> dict[str, Any]:
    body = "HTTPValidationError" if status == 422 else "ErrorMessage"  # FastAPI's own 422 schema
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
    }
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                               "schema": {"type": "integer"}}}
    return response
