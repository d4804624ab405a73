"""`hpsearch` commands; the composition root that may start the API and a worker supervisor together."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from app.core.config import LOOPBACK_HOSTS, Settings, get_settings

log = logging.getLogger("hpsearch")
FINISHED = {"completed", "cancelled", "failed"}


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("database_url", getattr(args, "database_url", None)),) if v}
    return Settings(**overrides) if overrides else get_settings()


# ---- server side -----------------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    from app.core import migrate

    settings = _settings(args)
    if args.action == "upgrade":
        migrate.upgrade(settings.database_url, args.revision)
    else:
        migrate.downgrade(settings.database_url, args.revision)
    print(f"database at {args.revision}: {_redact(settings.database_url)}")
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_keys(args: argparse.Namespace) -> int:
    from app.core import migrate
    from app.core.db import Database
    from app.services import keys

    settings = _settings(args)
    migrate.upgrade(settings.database_url)
    db = Database(settings.database_url)
    if args.action == "create":
        key = keys.create_key(db, owner=args.owner)
        print(f"API key for {args.owner} (shown once; store it now):", file=sys.stderr)
        print(key)
    else:
        n = keys.revoke_key(db, prefix_or_key=args.key)
        print(f"revoked {n} key(s)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.core.logging import setup_logging
    from workers.devices import resolve_devices

    settings = _settings(args)
    setup_logging(settings.log_json)
    try:
        devices = resolve_devices(args.devices)  # before the heavy imports: a typo fails in well under a second
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from app.core.db import Database
    from workers.supervisor import Supervisor

    per_device = args.per_device or (2 if devices == ["cpu"] else 1)
    if args.slots:
        devices, per_device = _spread(devices, args.slots)
    supervisor = Supervisor(Database(settings.database_url, pool_size=2), settings, devices=devices,
                            per_device=per_device, shutdown_grace_s=args.shutdown_grace)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
    if args.parent_pid:
        _stop_when_parent_dies(args.parent_pid, supervisor.stop)
    supervisor.run()
    return 0


def _spread(devices: list[str], slots: int) -> tuple[list[str], int]:
    """Devices and slots per device for `slots` trial slots in total (`serve --workers N`, as DESIGN says).

    Fewer slots than GPUs use the first GPUs. The supervisor runs the same number of slots on each device,
    so a remainder (3 slots on 2 GPUs) is dropped rather than overloading one GPU.
    """
    used = devices[:slots]
    per_device = slots // len(used)
    if per_device * len(used) != slots:
        log.warning("%d trial slots do not divide evenly over %d devices; running %d (%d per device)",
                    slots, len(used), per_device * len(used), per_device)
    return used, per_device


def _stop_when_parent_dies(pid: int, stop: Any) -> None:
    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        stop()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core import migrate
    from app.core.logging import setup_logging
    from app.main import create_app

    settings = _settings(args)
    setup_logging(settings.log_json)
    if args.host not in LOOPBACK_HOSTS and not settings.auth_enabled:
        print(f"refusing to bind {args.host} with authentication disabled (HPSEARCH_AUTH_ENABLED=false)",
              file=sys.stderr)
        return 2
    migrate.upgrade(settings.database_url)
    worker = None
    if args.workers != 0:
        cmd = [sys.executable, "-m", "app.cli", "worker", "--devices", "auto", "--parent-pid", str(os.getpid())]
        if args.workers is not None:
            cmd += ["--slots", str(args.workers)]
        # The URL travels in the environment: on the command line its password would show in `ps`.
        worker = subprocess.Popen(cmd, env={**os.environ, "HPSEARCH_DATABASE_URL": settings.database_url})
    else:
        _start_reaper(settings)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning",
                    log_config=None)  # uvicorn's lines go through our (JSON) handler
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _start_reaper(settings: Settings) -> None:
    """With no embedded workers the API process still reaps leases of workers that died elsewhere."""
    from app.core.db import Database
    from workers.reaper import Reaper

    reaper = Reaper(Database(settings.database_url, pool_size=1), settings.lease_grace_s)
    threading.Thread(target=reaper.run, args=(threading.Event(), reaper.interval_s), daemon=True,
                     name="reaper").start()


# ---- client side -----------------------------------------------------------------------------------------


class Client:
    def __init__(self, settings: Settings) -> None:
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.http = httpx.Client(base_url=settings.api_url.rstrip("/") + "/api/v1", headers=headers, timeout=30)

    def request(self, method: str, path: str, *, accept: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """The response, when it succeeded or its status is in `accept`; else the command ends with a one-line
        error (exit status 1)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SystemExit(f"error: cannot reach the API at {self.http.base_url}: {exc}") from exc
        if response.status_code >= 400 and response.status_code not in accept:
            raise SystemExit(f"error {response.status_code} {response.reason_phrase}: {_describe(response)}")
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # e.g. a proxy's sign-in page: HPSEARCH_API_URL points somewhere else
            raise SystemExit(f"error: {self.http.base_url} answered {response.status_code} with a body that is "
                             f"not JSON: {_describe(response)}") from None


def _describe(response: httpx.Response, limit: int = 200) -> str:
    """The API's JSON `detail`, or else the body as one short line: proxies answer with HTML or plain text."""
    try:
        body = response.json()
    except ValueError:
        text = " ".join(re.sub(r"<[^>]*>", " ", response.text).split())  # tags and line breaks out
        return (text[:limit] + "...") if len(text) > limit else (text or "(empty body)")
    return json.dumps(body.get("detail", body) if isinstance(body, dict) else body)


def cmd_submit(args: argparse.Namespace) -> int:
    client = Client(_settings(args))
    spec = json.loads(Path(args.spec).read_text())
    study = client.call("POST", "/studies", json=spec)
    print(study["id"])
    if args.follow:
        return _follow(client, study["id"])
    return 0


def _progress_line(study: dict[str, Any], width: int = 30) -> str:
    p = study["progress"]
    done = p["finished"]
    filled = int(width * done / max(1, p["n_trials"]))
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{p['n_trials']}  running {p['running']}  "
            f"pruned {p['pruned']}  failed {p['fail']}  best {_best_text(study)}  {study['status']}")


def _best_text(study: dict[str, Any]) -> str:
    """The best value so far; '-' before any trial finished (queued studies), all values when several."""
    best = study["best_trial"]
    if best and best["value"] is not None:
        return f"{best['value']:.4f}"
    if best and best.get("values"):
        return "/".join(f"{v:.4f}" for v in best["values"])
    return "-"


def _follow(client: Client, study_id: str, interval_s: float = 1.0) -> int:
    while True:
        study = client.call("GET", f"/studies/{study_id}")
        print("\r" + _progress_line(study), end="", flush=True)
        if study["status"] in FINISHED:
            print()
            _print_summary(study)
            return 0 if study["status"] == "completed" else 1
        time.sleep(interval_s)


def _print_summary(study: dict[str, Any]) -> None:
    print(f"study {study['id']} {study['status']} ({study.get('stop_reason') or '-'})")
    if study["best_trial"]:
        b = study["best_trial"]
        print(f"best trial #{b['number']}: {b['value'] if b['value'] is not None else b.get('values')}")
        print(f"  params: {json.dumps(b['params'])}")
    if study["test_metrics"]:
        print(f"test: {json.dumps(study['test_metrics'])}")
    if study.get("error"):
        print(f"error: {study['error']}")


def cmd_status(args: argparse.Namespace) -> int:
    client = Client(_settings(args))
    if args.id:
        study = client.call("GET", f"/studies/{args.id}")
        print(_progress_line(study))
        _print_summary(study)
        return 0
    studies = client.call("GET", "/studies", params={"limit": 100})["data"]
    print(f"{'id':<32}  {'status':<10} {'done':>9}  {'best':>8}  name")
    for s in studies:
        done = f"{s['progress']['finished']}/{s['progress']['n_trials']}"
        print(f"{s['id']:<32}  {s['status']:<10} {done:>9}  {_best_text(s):>8}  {s['name']}")
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    client = Client(_settings(args))
    query = {"limit": args.limit, "sort": args.sort, "state": args.state}
    page = client.call("GET", f"/studies/{args.id}/trials", params={k: v for k, v in query.items() if v})
    print(f"{'#':>5}  {'state':<9} {'value':>9} {'secs':>7}  params")
    for t in page["data"]:
        value = f"{t['value']:.4f}" if t["value"] is not None else "-"
        secs = f"{t['duration_s']:.1f}" if t["duration_s"] is not None else "-"
        number = "-" if t["number"] is None else t["number"]  # an enqueued configuration not yet claimed
        print(f"{number:>5}  {t['state']:<9} {value:>9} {secs:>7}  {json.dumps(t['params'])}")
    print(f"({len(page['data'])} of {page['count']})")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    study = Client(_settings(args)).call("POST", f"/studies/{args.id}/cancel")
    print(f"study {study['id']} {study['status']}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    workers = Client(_settings(args)).call("GET", "/workers")["data"]
    for w in workers:
        running = ", ".join(f"trial {r['number']} on {r['device']}" for r in w["running"]) or "idle"
        print(f"{w['id']}  devices {','.join(w['devices'])}  slots {w['slots']}  beat {w['heartbeat_at']}  {running}")
        for p in w.get("plugins") or []:  # the model and dataset plugins this worker can run
            broken = f"  fails to import: {p['error']}" if p["error"] else ""
            print(f"  plugin {p['name']}=={p['version']} ({p['kind']}){broken}")
    if not workers:
        print("no live workers")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a study's best model (model.safetensors, config.json) and its ensemble (ensemble/) to DIR."""
    import io
    import zipfile

    client = Client(_settings(args))
    study = client.call("GET", f"/studies/{args.id}")
    if not study["best_trial"]:
        raise SystemExit(f"error: study {args.id} has no finished model yet")

    def download(path: str, into: Path, *, missing_ok: bool = False) -> bool:
        response = client.request("GET", path, accept=(404,) if missing_ok else ())
        if response.status_code == 404:
            return False
        zipfile.ZipFile(io.BytesIO(response.content)).extractall(into)
        return True

    number, out = study["best_trial"]["number"], Path(args.dir)
    download(f"/studies/{args.id}/trials/{number}/model", out)
    print(f"best trial #{number}: {out / 'model.safetensors'}, {out / 'config.json'}")
    if download(f"/studies/{args.id}/ensemble/model", out / "ensemble", missing_ok=True):
        print(f"ensemble: {out / 'ensemble'} (ensemble.json names the members and weights)")
    else:
        print("no ensemble yet: it is chosen when the study completes")
    return 0


# ---- parser ----------------------------------------------------------------------------------------------


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpsearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    db_url = {"help": "SQLAlchemy URL (env HPSEARCH_DATABASE_URL)", "default": None}

    p = sub.add_parser("serve", help="migrate, then run the API and an embedded worker supervisor")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--database-url", **db_url)
    p.add_argument("--workers", type=_non_negative, default=None,
                   help="trial slots in total, spread over the GPUs or the CPU (default: 2 on a CPU, one per GPU; "
                        "0: API only)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="a worker supervisor on this machine")
    p.add_argument("--database-url", **db_url)
    p.add_argument("--devices", default="auto", help="auto, cpu, or GPU indices such as 0,1")
    p.add_argument("--per-device", type=int, default=None, help="concurrent trials per device")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running trials get at SIGTERM")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--slots", type=int, default=None, help=argparse.SUPPRESS)  # serve --workers N: N in total
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("db", help="schema migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("revision", nargs="?", default="head")
    p.add_argument("--database-url", **db_url)
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("keys", help="API keys")
    ksub = p.add_subparsers(dest="action", required=True)
    k = ksub.add_parser("create")
    k.add_argument("--owner", required=True)
    k.add_argument("--database-url", **db_url)
    k = ksub.add_parser("revoke")
    k.add_argument("key", help="the key or its shown prefix")
    k.add_argument("--database-url", **db_url)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("submit", help="create a study from a JSON spec")
    p.add_argument("spec")
    p.add_argument("--follow", action="store_true", help="show a live progress bar until the study ends")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("status", help="list studies, or show one")
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("trials", help="a study's trials")
    p.add_argument("id")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--sort", choices=["number", "value", "duration"], default="number")
    p.add_argument("--state", choices=["waiting", "running", "complete", "pruned", "fail"], default=None)
    p.set_defaults(func=cmd_trials)
    p = sub.add_parser("cancel", help="cancel a study")
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("workers", help="live workers and their trials")
    p.set_defaults(func=cmd_workers)
    p = sub.add_parser("export", help="write a study's best model and its ensemble into a folder")
    p.add_argument("id")
    p.add_argument("dir")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
