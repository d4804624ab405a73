"""ASGI middleware: body limits (413 before parsing), media types (415), JSON without NaN (422), latency."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import API_PREFIX
from app.core.metrics import REQUEST_LATENCY

JSON_TYPES = ("application/json",)
MULTIPART_PATHS = ("/api/v1/datasets",)
PREDICT_PATH = re.compile(rf"^{API_PREFIX}/studies/[^/]+/predict$")
NON_JSON_CONSTANTS = "NaN, Infinity and numbers too large for a double are not JSON: send finite numbers"
TOO_DEEP = "JSON nested too deeply"


async def _reply(send: Send, status: int, detail: Any) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised from receive() while the app reads the body. An HTTPException because FastAPI passes those
    through its body parsing (any other exception there becomes a 400 "error parsing the body")."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class _NonJsonConstant(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonJsonConstant(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise _NonJsonConstant(text)
    return value


def json_body_problem(body: bytes) -> str | None:
    """What makes body unacceptable beyond plain syntax: NaN/Infinity (Python's extension of JSON), a
    number that overflows to infinity, or nesting deep enough to exhaust the parser's recursion.

    Other malformed JSON is left for the route to report with the position of the error.
    """
    try:
        json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NonJsonConstant:
        return NON_JSON_CONSTANTS
    except RecursionError:
        return TOO_DEEP
    except json.JSONDecodeError:
        return None
    except ValueError as exc:  # not UTF-8, or an integer of thousands of digits
        return f"not valid JSON: {exc}"[:300]
    return None


class BodyLimitMiddleware:
    """Refuse bodies over the limit (413), non-JSON bodies where JSON is expected (415) and JSON that
    carries NaN or Infinity (422), all before a route parses anything."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_upload = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"].rstrip("/")
        upload = path in MULTIPART_PATHS
        limit = self.max_upload + 64 * 1024 if upload else self.max_body
        if PREDICT_PATH.match(path):
            # Up to predictions.MAX_ROWS rows of images is far more than any other JSON body. The limit is
            # read from the app's settings (create_app puts them on app.state) like every route reads them.
            limit = scope["app"].state.settings.max_predict_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _reply(send, 413, f"request body larger than {limit} bytes")
            return
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        has_body = length not in (None, "0") or "transfer-encoding" in headers
        api = scope["path"].startswith("/api/")
        if has_body and api and not upload and media not in JSON_TYPES:
            await _reply(send, 415, "send JSON with Content-Type: application/json")
            return
        if has_body and api and not upload:
            await self._json(scope, receive, send, limit)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge as exc:  # read by an app that does not answer HTTPExceptions itself
            await _reply(send, 413, exc.detail)

    async def _json(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Read a JSON body whole (it is small), check it, then hand it to the app as if unread."""
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _reply(send, 413, f"request body larger than {limit} bytes")
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = json_body_problem(body)
        if problem is not None:
            await _reply(send, 422, [{"loc": ["body"], "msg": problem, "type": "json_invalid"}])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class LatencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", "unmatched")
            if scope["path"].startswith(API_PREFIX + "/") and not path.startswith(API_PREFIX):
                path = API_PREFIX + path  # routes of an included router carry their path without its prefix
            REQUEST_LATENCY.labels(scope["method"], path, str(status[0])).observe(time.perf_counter() - start)
