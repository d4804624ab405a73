"""The CLI's own logic: slots over devices, and how it reports answers that are not the API's JSON."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.cli import _spread
from tests.conftest import ROOT


@pytest.mark.parametrize(("devices", "slots", "expected"), [
    (["cpu"], 3, (["cpu"], 3)),
    (["cuda:0", "cuda:1"], 4, (["cuda:0", "cuda:1"], 2)),
    (["cuda:0", "cuda:1", "cuda:2"], 2, (["cuda:0", "cuda:1"], 1)),  # fewer slots than GPUs
    (["cuda:0", "cuda:1"], 3, (["cuda:0", "cuda:1"], 1)),  # never more slots than asked for
])
def test_serve_workers_n_is_n_slots_in_total(devices: list[str], slots: int,
                                             expected: tuple[list[str], int]) -> None:
    used, per_device = _spread(devices, slots)
    assert (used, per_device) == expected
    assert len(used) * per_device <= slots


class _Canned(BaseHTTPRequestHandler):
    """Answers every request with the status, content type and body the test put on the server."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        status, content_type, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


PROXY_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n")


@pytest.mark.parametrize(("status", "content_type", "body", "expected"), [
    (502, "text/html", PROXY_502, "error 502 Bad Gateway: 502 Bad Gateway 502 Bad Gateway nginx/1.25.3"),
    (413, "text/plain", b"request entity too large\n", "error 413 Request Entity Too Large: request entity too large"),
    (503, "text/plain", b"", "error 503 Service Unavailable: (empty body)"),
    (404, "application/json", b'{"detail": "study not found"}', 'error 404 Not Found: study not found'),
    (200, "text/html", b"<html><body>Sign in</body></html>", "answered 200 with a body that is not JSON: Sign in"),
])
def test_an_answer_that_is_not_the_apis_json_is_one_line_and_a_failure(
        canned: ThreadingHTTPServer, status: int, content_type: str, body: bytes, expected: str) -> None:
    canned.answer = (status, content_type, body)  # type: ignore[attr-defined]
    env = {**os.environ, "HPSEARCH_API_URL": f"http://127.0.0.1:{canned.server_address[1]}",
           "HPSEARCH_API_KEY": "hps_test"}
    done = subprocess.run([sys.executable, "-m", "app.cli", "status", "0" * 32], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
