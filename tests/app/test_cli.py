"""The CLI's own logic: slots over devices, and how it reports answers that are not the API's JSON."""

from __future__ import annotations

import argparse
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


def _hpsearch(*args: str, env: dict[str, str] | None = None, cwd: Any = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env or dict(os.environ), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_help_says_what_the_tool_does_and_every_option_its_help_and_default() -> None:
    from app.cli import build_parser

    top = _hpsearch("--help")
    assert top.returncode == 0
    assert "hyperparameter search service for PyTorch" in top.stdout.split("\n\n")[1]
    assert "composition root" not in top.stdout
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    parsers = dict(commands)
    parsers.update({f"keys {n}": p for n, p in commands["keys"]._subparsers._group_actions[0].choices.items()})
    for name, sub in parsers.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction
                                                                 | argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            shown = sub._get_formatter()._expand_help(action)  # the text --help prints for it
            if action.default not in (None, False):
                assert f"default: {action.default}" in shown, (name, action.dest, shown)
    serve = _hpsearch("serve", "--help").stdout
    assert "(default: 127.0.0.1)" in serve and "(default: 8000)" in " ".join(serve.split())
    submit = " ".join(_hpsearch("submit", "--help").stdout.split())
    assert "HPSEARCH_API_URL" in submit and "HPSEARCH_API_KEY" in submit


def test_no_key_tells_the_user_how_to_give_one(canned: ThreadingHTTPServer) -> None:
    canned.answer = (401, "application/json", b'{"detail": "missing API key"}')  # type: ignore[attr-defined]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env["HPSEARCH_API_URL"] = f"http://127.0.0.1:{canned.server_address[1]}"
    done = _hpsearch("status", env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "set HPSEARCH_API_KEY or pass --key" in done.stderr
    refused = _hpsearch("status", "--key", "hps_wrong-key", env=env)
    assert refused.returncode == 1 and "refused the key hps_wrong-" in refused.stderr, refused.stderr


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot read the spec file"),
    ('{"name": "x",', "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_missing_or_invalid_spec_file_is_one_line(tmp_path: Any, content: str | None, expected: str) -> None:
    if content is not None:
        (tmp_path / "spec.json").write_text(content)
    env = {**os.environ, "HPSEARCH_API_URL": "http://127.0.0.1:9", "HPSEARCH_API_KEY": "hps_x"}
    done = _hpsearch("submit", str(tmp_path / "spec.json"), env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_keys_list_shows_prefixes_owners_and_revocations(sqlite_url: str) -> None:
    env = {**os.environ, "HPSEARCH_DATABASE_URL": sqlite_url}
    alice = _hpsearch("keys", "create", "--owner", "alice", env=env).stdout.strip()
    bob = _hpsearch("keys", "create", "--owner", "bob", env=env).stdout.strip()
    assert _hpsearch("keys", "revoke", bob[:10], env=env).returncode == 0
    listed = _hpsearch("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[-1] == "-") for r in rows] == [(alice[:10], "alice", True), (bob[:10], "bob", False)]
    assert alice not in listed.stdout and bob not in listed.stdout  # never the key itself
    only = _hpsearch("keys", "list", "--owner", "alice", env=env).stdout
    assert "bob" not in only and alice[:10] in only


def test_the_trials_table_has_aligned_columns_with_the_given_params() -> None:
    from app.cli import trials_table
    from app.schemas.trial import TrialPublic

    def trial(number: int | None, state: str, value: float | None, **params: Any) -> TrialPublic:
        return TrialPublic(number=number, state=state, source="sampled", params=params, value=value, values=None,
                           metrics=None, attempt=1, worker_id=None, device=None, started_at=None, finished_at=None,
                           duration_s=1.25 if value is not None else None, epochs_run=None, best_epoch=None,
                           error=None)

    table = trials_table([trial(0, "complete", 0.9786, learning_rate=3.2e-5, optimizer="adam", units=64),
                          trial(12, "pruned", 0.5, learning_rate=0.01, optimizer="momentum", units=128),
                          trial(None, "waiting", None, learning_rate=0.001)],
                         ["learning_rate", "optimizer"])
    lines = table.splitlines()
    assert lines[0].split() == ["#", "state", "value", "secs", "learning_rate", "optimizer"]
    assert lines[1].split() == ["0", "complete", "0.9786", "1.2", "3.20e-05", "adam"]
    assert lines[2].split() == ["12", "pruned", "0.5000", "1.2", "0.0100", "momentum"]
    assert lines[3].split() == ["-", "waiting", "-", "-", "0.0010", "-"]
    assert "units" not in table
    assert len({line.index("state") if i == 0 else line.index(line.split()[1]) for i, line in enumerate(lines)}) == 1
