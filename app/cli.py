"""hpsearch: a hyperparameter search service for PyTorch.

`hpsearch serve` runs the service on this machine: the API, the dashboard and trial workers, on SQLite by
default. `upload`, `submit`, `follow`, `status`, `trials`, `pause`, `resume`, `extend`, `cancel`, `delete`,
`workers` and `export` talk to a running service over its REST API (HPSEARCH_API_URL, HPSEARCH_API_KEY); a
study is named by its id or any unique prefix of it. `worker`, `db` and `keys` are for whoever runs the service.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from app.client import DEFAULT_URL, ApiError, Client, Unauthorized, best_text, progress_line
from app.core.config import LOOPBACK_HOSTS, Settings, get_settings
from app.core.logging import LEVELS
from app.schemas.study import StudyPublic
from app.schemas.trial import TrialPublic

log = logging.getLogger("hpsearch")


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
    elif args.action == "list":
        rows = keys.list_keys(db, owner=args.owner)
        print(f"{'prefix':<12}  {'owner':<16}  {'created':<20}  revoked")
        for row in rows:
            revoked = f"{row.revoked_at:%Y-%m-%d %H:%M:%S}" if row.revoked_at else "-"
            print(f"{row.prefix:<12}  {row.owner:<16}  {row.created_at:%Y-%m-%d %H:%M:%S}  {revoked}")
        if not rows:
            print("no keys yet: `hpsearch keys create --owner NAME` makes one")
    else:
        n = keys.revoke_key(db, prefix_or_key=args.key)
        print(f"revoked {n} key(s)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.core.logging import setup_logging
    from workers.devices import default_per_device, resolve_devices

    settings = _settings(args)
    setup_logging(settings.log_json, args.log_level)
    try:
        devices = resolve_devices(args.devices)  # before the heavy imports: a typo fails in well under a second
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from workers.fusing import parse_fuse

    try:
        fuse = parse_fuse(args.fuse)
    except ValueError:
        print(f"error: --fuse takes auto or an integer of at least 1; got {args.fuse!r}", file=sys.stderr)
        return 2
    from app.core.db import Database, end_frozen_transactions
    from app.core.optuna_store import size_pool
    from workers.supervisor import Supervisor, database_pool_size

    end_frozen_transactions(settings.lease_grace_s)
    per_device = args.per_device or default_per_device(devices)  # the documented rule of workers.devices
    if args.slots:
        devices, per_device = _spread(devices, args.slots)
    connections = database_pool_size(len(devices) * per_device)
    db = Database(settings.database_url, pool_size=connections)
    size_pool(connections)  # Optuna's storage too: each slot's thread reports every epoch
    supervisor = Supervisor(db, settings, devices=devices,
                            per_device=per_device, shutdown_grace_s=args.shutdown_grace, fuse=fuse)
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
    setup_logging(settings.log_json, args.log_level)
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
        if args.fuse != "1":
            cmd += ["--fuse", args.fuse]
        if args.log_level:
            cmd += ["--log-level", args.log_level]
        # The URL travels in the environment: on the command line its password would show in `ps`.
        worker = subprocess.Popen(cmd, env={**os.environ, "HPSEARCH_DATABASE_URL": settings.database_url})
    else:
        _start_reaper(settings)
    try:
        listener = _bind(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        if worker is not None:
            worker.terminate()
        return 1
    print(_listening(args.host, args.port), flush=True)
    try:
        config = uvicorn.Config(create_app(settings), log_level="warning",
                                log_config=None)  # uvicorn's lines go through our (JSON) handler
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything says where the service listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _listening(host: str, port: int) -> str:
    """Where to point a browser and the CLI, said once at start."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    everywhere = f" (on every interface: {host})" if shown != host else ""
    return (f"hpsearch listening on {base}{everywhere}: dashboard {base}/, API {base}/api/v1, "
            f"API docs {base}/docs")


def _start_reaper(settings: Settings) -> None:
    """With no embedded workers the API process still reaps leases of workers that died elsewhere."""
    from app.core.db import Database
    from workers.reaper import Reaper

    reaper = Reaper(Database(settings.database_url, pool_size=1), settings.lease_grace_s, settings.artifact_dir)
    threading.Thread(target=reaper.run, args=(threading.Event(), reaper.interval_s), daemon=True,
                     name="reaper").start()


# ---- client side: every command below talks to the API through app.client -------------------------------


class CliError(Exception):
    """A failure the command reports in one line on stderr (exit status 1)."""


def _client(args: argparse.Namespace) -> Client:
    settings = get_settings()
    return Client(args.url or settings.api_url, args.key or settings.api_key or None)


def _explain(exc: ApiError, client: Client) -> str:
    """One line for an API error, with the fix when the fix is the user's: a key, or a field of the spec."""
    if isinstance(exc, Unauthorized):
        if not client.key:
            return ("error: no API key: set HPSEARCH_API_KEY or pass --key "
                    "(`hpsearch keys create --owner NAME` makes one)")
        return (f"error 401: the API at {client.url} refused the key {client.key[:10]}...: {exc.message} "
                "(check HPSEARCH_API_KEY or --key)")
    return str(exc)


def _read_spec(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"error: cannot read the spec file {path}: {exc.strerror or exc}") from None
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise CliError(f"error: the spec file {path} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise CliError(f"error: the spec file {path} must hold a JSON object (a study spec)")
    return spec


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    study = client.studies.create(_read_spec(args.spec))
    print(study.id)
    if args.follow:
        return _print_summary(client.studies.follow(study.id))
    return 0


def cmd_follow(args: argparse.Namespace, client: Client) -> int:
    return _print_summary(client.studies.follow(args.id))


def _print_summary(study: StudyPublic) -> int:
    """What a finished (or any) study came to; exit status 0 only for a completed one."""
    print(f"study {study.id} {study.status} ({study.stop_reason or '-'})")
    if best := study.best_trial:
        print(f"best trial #{best.number}: {best.value if best.value is not None else best.values}")
        print(f"  params: {json.dumps(best.params)}")
    if study.test_metrics:
        print(f"test: {json.dumps(study.test_metrics)}")
    if study.error:
        print(f"error: {study.error}")
    return 0 if study.status == "completed" else 1


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    if args.id:
        study = client.studies.get(args.id)
        print(progress_line(study))
        _print_summary(study)
        return 0
    studies = client.studies.list(limit=100).data
    print(f"{'id':<32}  {'status':<10} {'done':>9}  {'best':>8}  name")
    for s in studies:
        done = f"{s.progress.finished}/{s.progress.n_trials}"
        print(f"{s.id:<32}  {s.status:<10} {done:>9}  {best_text(s):>8}  {s.name}")
    return 0


def cmd_trials(args: argparse.Namespace, client: Client) -> int:
    study_id = client.full_id(args.id)  # once: a short id costs a listing of your studies
    page = client.trials.page(study_id, sort=args.sort, state=args.state, limit=args.limit)
    if args.json:
        for trial in page.data:
            print(trial.model_dump_json())
        return 0
    if args.columns is not None:
        names = _chosen_columns(args.columns, page.data)
    else:
        names = _param_columns(client, study_id, page.data, args.params)
    print(trials_table(page.data, names))
    print(f"({len(page.data)} of {page.count})")
    return 0


def cmd_rungs(args: argparse.Namespace, client: Client) -> int:
    rungs = client.studies.rungs(args.id)
    if rungs.scheduler is None:
        print("this study has no scheduler: its trials never pause at rungs")
        return 0
    went_on = "promoted" if rungs.scheduler == "asha" else "continued"
    print(f"{rungs.scheduler}: {'epoch':>5}  {'reached':>7}  {'paused':>6}  {went_on:>9}")
    for r in rungs.rungs:
        print(f"{'':{len(rungs.scheduler) + 1}} {r.epoch:>5}  {r.reached:>7}  {r.paused:>6}  {r.promoted:>9}")
    return 0


def _chosen_columns(text: str, trials: list[TrialPublic]) -> list[str]:
    """--columns learning_rate,optimizer: those parameters, in that order; a name no trial has is an error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    seen = {name for trial in trials for name in trial.params or {}}
    if unknown := [n for n in names if n not in seen]:
        raise CliError(f"error: no trial shown has the parameter(s) {', '.join(unknown)}; they have "
                       f"{', '.join(sorted(seen)) or 'none yet'}")
    return names


def _param_columns(client: Client, study_id: str, trials: list[TrialPublic], n: int | None) -> list[str]:
    """The parameters to show: those the spec searches (a range or choices) first, in the spec's order, then
    the most important (as the dashboard orders them), then as they appear. n: how many (default: every
    searched one, and at least five)."""
    seen: list[str] = []
    for trial in trials:
        seen += [name for name in trial.params or {} if name not in seen]
    space = client.studies.get(study_id).spec.get("search_space") or {}
    searched = [name for name, entry in space.items() if isinstance(entry, dict) and name in seen]
    try:
        ranked = [i.name for i in client.studies.importance(study_id).importances if i.name in seen]
    except ApiError:
        ranked = []
    ordered = list(dict.fromkeys([*searched, *ranked, *seen]))
    return ordered[:max(5, len(searched)) if n is None else n]


def trials_table(trials: list[TrialPublic], names: list[str]) -> str:
    """Aligned columns: number, state (and the rung a scheduler paused it at), value, seconds, then one column
    per parameter in `names`."""
    header = ["#", "state", "value", "secs", *names]
    rows = [[_cell(t.number), f"{t.state} (rung {t.rung})" if t.rung else t.state, _cell(t.value),
             _cell(t.duration_s, ".1f"), *(_cell((t.params or {}).get(name)) for name in names)] for t in trials]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in (0, 2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cell(value: Any, fmt: str = "") -> str:
    if value is None:
        return "-"  # no value yet, or an enqueued configuration not yet claimed
    if isinstance(value, float):
        if fmt:
            return format(value, fmt)
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    study = client.studies.cancel(args.id)
    print(f"study {study.id} {study.status}")
    return 0


def cmd_pause(args: argparse.Namespace, client: Client) -> int:
    if args.trial is not None:
        trial = client.trials.pause(args.id, args.trial)
        when = "at its next epoch boundary" if trial.state == "running" else "now"
        print(f"trial {trial.number} pauses {when} (`hpsearch resume {args.id} {trial.number}` goes on)")
        return 0
    study = client.studies.pause(args.id)
    print(f"study {study.id} {study.status} (`hpsearch resume {study.id[:8]}` goes on)")
    return 0


def cmd_resume(args: argparse.Namespace, client: Client) -> int:
    if args.trial is not None:
        trial = client.trials.resume(args.id, args.trial)
        print(f"trial {trial.number} {'back in line' if trial.state == 'waiting' else trial.state}")
        return 0
    study = client.studies.resume(args.id)
    print(f"study {study.id} {study.status}")
    return 0


def cmd_extend(args: argparse.Namespace, client: Client) -> int:
    trial = client.trials.extend(args.id, args.trial, args.epochs)
    print(f"trial {trial.number} continues from epoch {trial.checkpoint_epoch} to {trial.epochs_target} "
          f"(`hpsearch follow {args.id}` watches it)")
    return 0


def cmd_delete(args: argparse.Namespace, client: Client) -> int:
    study_id = client.full_id(args.id)
    client.studies.delete(study_id)
    print(f"deleted study {study_id}, its trials and their files")
    return 0


UPLOAD_KINDS = {".csv": "csv", ".npz": "npz"}


def cmd_upload(args: argparse.Namespace, client: Client) -> int:
    """Upload a CSV, an NPZ or a pair of MNIST IDX files; print the id a spec's `dataset` takes."""
    path = Path(args.file)
    kind = args.kind or ("idx" if args.labels else UPLOAD_KINDS.get(path.suffix.lower()))
    if kind is None:
        raise CliError(f"error: cannot tell the kind of {path.name} from its name: pass --kind csv, npz or idx")
    if kind == "csv" and not args.label_column:
        raise CliError("error: a CSV upload needs --label-column (the column to predict)")
    if kind == "idx" and not args.labels:
        raise CliError("error: an IDX upload takes the images file and --labels LABELS_FILE")
    for name in (args.file, args.labels):
        if name and not Path(name).is_file():
            raise CliError(f"error: no file {name}")
    files = {"images": path, "labels": Path(args.labels)} if kind == "idx" else {"file": path}
    try:
        groups = json.loads(args.feature_groups) if args.feature_groups else None
    except ValueError:
        raise CliError('error: --feature-groups takes JSON: {"group": ["column", ...]}') from None
    dataset = client.datasets.upload(**files, kind=kind, name=args.name or path.stem, label_column=args.label_column,
                                     task=args.task, feature_groups=groups)
    print(dataset["id"])
    shape = f"{dataset.get('samples')} samples, {dataset.get('features')} features, {dataset.get('task')}"
    print(f"{dataset['name']}: {shape}, {dataset.get('size_bytes')} bytes", file=sys.stderr)
    return 0


def cmd_workers(args: argparse.Namespace, client: Client) -> int:
    workers = client.workers()
    for w in workers:
        running = ", ".join(f"trial {r['number']} on {r['device']}" for r in w["running"]) or "idle"
        print(f"{w['id']}  devices {','.join(w['devices'])}  slots {w['slots']}  beat {w['heartbeat_at']}  {running}")
        for p in w.get("plugins") or []:  # the model and dataset plugins this worker can run
            broken = f"  fails to import: {p['error']}" if p["error"] else ""
            print(f"  plugin {p['name']}=={p['version']} ({p['kind']}){broken}")
    if not workers:
        print("no live workers")
    return 0


def cmd_export(args: argparse.Namespace, client: Client) -> int:
    """Write a study's best model (model.safetensors, config.json) and its ensemble (ensemble/) to DIR."""
    done = client.downloads.export(args.id, args.dir)
    print(f"best trial #{done.trial_number}: {done.folder / 'model.safetensors'}, {done.folder / 'config.json'}")
    if done.ensemble is not None:
        print(f"ensemble: {done.ensemble} (ensemble.json names the members and weights)")
    else:
        print("no ensemble yet: it is chosen when the study completes")
    return 0


def _run_client_command(args: argparse.Namespace) -> int:
    """Run a command that talks to the API; any failure is one line on stderr and exit status 1."""
    client = _client(args)
    try:
        with client:
            return int(args.client_func(args, client) or 0)
    except ApiError as exc:
        print(_explain(exc, client), file=sys.stderr)
    except CliError as exc:
        print(exc, file=sys.stderr)
    return 1


# ---- parser ----------------------------------------------------------------------------------------------


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _per_device(text: str) -> int | None:
    """`--per-device`: a positive count, or auto (None: the rule of workers.devices)."""
    if text.strip().lower() == "auto":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be auto or 1 or more, got {value}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, unless it has none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"


_URL_HELP = f"address of the hpsearch API (default: $HPSEARCH_API_URL, else {DEFAULT_URL})"
_ID_HELP = "the study id, or any unique prefix of it (the 8 characters `hpsearch status` shows)"
_KEY_HELP = "API key (default: $HPSEARCH_API_KEY; `hpsearch keys create --owner NAME` makes one)"


def _client_command(sub: Any, name: str, help_text: str, func: Any, description: str | None = None) -> Any:
    """A subcommand that talks to the API: --url and --key, read from the environment by default."""
    p = sub.add_parser(name, help=help_text, description=description or help_text, formatter_class=_HelpFormatter)
    p.add_argument("--url", default=None, help=_URL_HELP)
    p.add_argument("--key", default=None, help=_KEY_HELP)
    p.set_defaults(func=_run_client_command, client_func=func)
    return p


_FUSE_HELP = ("trials of one study trained together as one fused model per runner (MLPs of one batch size): "
              "K, or auto (on a GPU from the model size and its free memory; 1 on a CPU, where fusing is "
              "slower); 1: off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpsearch", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    db_url = {"help": "SQLAlchemy database URL (default: $HPSEARCH_DATABASE_URL, else SQLite in "
                      "$HPSEARCH_HOME, .hpsearch/)", "default": None}

    log_level = {"choices": LEVELS, "default": None,
                 "help": "the least severe log lines shown (default: warning on a terminal, where a line per "
                         "trial would break `follow`'s progress bar; info in a file or a log shipper)"}

    def server_command(name: str, help_text: str) -> Any:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    p = server_command("serve", "migrate the database, then run the API, the dashboard and trial workers")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--database-url", **db_url)
    p.add_argument("--workers", type=_non_negative, default=None,
                   help="trial slots in total, spread over the GPUs or the CPU (default: the worker's, 2 on a CPU; "
                        "0: API only)")
    p.add_argument("--fuse", default="1", help=_FUSE_HELP)
    p.add_argument("--log-level", **log_level)
    p.set_defaults(func=cmd_serve)

    p = server_command("worker", "a worker supervisor on this machine: claims trials and trains them")
    p.add_argument("--database-url", **db_url)
    p.add_argument("--devices", default="auto", help="auto, cpu, or GPU indices such as 0,1")
    p.add_argument("--per-device", type=_per_device, default=None,
                   help="concurrent trials per device, or auto (the default: 2 on a CPU; on GPUs min(free GPU "
                        "memory / 2 GiB, CPU cores / GPUs, 8))")
    p.add_argument("--fuse", default="1", help=_FUSE_HELP)
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running trials get at SIGTERM")
    p.add_argument("--log-level", **log_level)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--slots", type=int, default=None, help=argparse.SUPPRESS)  # serve --workers N: N in total
    p.set_defaults(func=cmd_worker)

    p = server_command("db", "apply or roll back schema migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"], help="upgrade or downgrade the schema")
    p.add_argument("revision", nargs="?", default="head", help="the revision to go to (default: head)")
    p.add_argument("--database-url", **db_url)
    p.set_defaults(func=cmd_db)

    p = server_command("keys", "create, list and revoke API keys (straight in the database)")
    ksub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = ksub.add_parser("create", help="create a key for an owner; prints the key alone on its last line",
                        formatter_class=_HelpFormatter)
    k.add_argument("--owner", required=True, help="who the key's studies belong to")
    k.add_argument("--database-url", **db_url)
    k = ksub.add_parser("list", help="list keys by their shown prefix, owner, creation and revocation",
                        formatter_class=_HelpFormatter)
    k.add_argument("--owner", default=None, help="only this owner's keys (default: every owner's)")
    k.add_argument("--database-url", **db_url)
    k = ksub.add_parser("revoke", help="revoke a key", formatter_class=_HelpFormatter)
    k.add_argument("key", help="the key or its shown prefix")
    k.add_argument("--database-url", **db_url)
    p.set_defaults(func=cmd_keys)

    p = _client_command(sub, "upload", "upload a dataset (CSV, NPZ or MNIST IDX) and print its id", cmd_upload,
                        "Upload a dataset and print the id a spec's `dataset` takes (dataset:...). A CSV names "
                        "its label column; an NPZ holds arrays X and y; IDX takes the images file and --labels. "
                        "The same content is stored once: again under another name is refused, naming it.")
    p.add_argument("file", help="the CSV or NPZ file, or the IDX images file")
    p.add_argument("--kind", choices=["csv", "npz", "idx"], default=None,
                   help="the format (default: from the file's extension; idx when --labels is given)")
    p.add_argument("--name", default=None, help="the dataset's name (default: the file's name without extension)")
    p.add_argument("--label-column", default=None, help="CSV: the column to predict")
    p.add_argument("--labels", default=None, help="IDX: the labels file")
    p.add_argument("--task", choices=["classification", "regression"], default=None,
                   help="default: classification for text or integer labels, else regression")
    p.add_argument("--feature-groups", default=None,
                   help='CSV: JSON naming groups of columns, {"group": ["column", ...]}')
    p = _client_command(sub, "submit", "create a study from a JSON spec and print its id", cmd_submit,
                        "Create a study from a JSON spec file (see README.md and GET /docs) and print its id. "
                        "Talks to the API at HPSEARCH_API_URL with the key in HPSEARCH_API_KEY "
                        "(or --url and --key).")
    p.add_argument("spec", help="path of the study spec, a JSON file")
    p.add_argument("--follow", action="store_true", help="show a live progress bar until the study ends")
    p = _client_command(sub, "follow", "show a study's live progress bar until it ends, then its summary",
                        cmd_follow)
    p.add_argument("id", help=_ID_HELP)
    p = _client_command(sub, "status", "list your studies, or show one", cmd_status)
    p.add_argument("id", nargs="?", help=f"{_ID_HELP} (default: list every study)")
    p = _client_command(sub, "trials", "a study's trials as a table (--json for scripts)", cmd_trials)
    p.add_argument("id", help=_ID_HELP)
    p.add_argument("--limit", type=int, default=50, help="how many trials")
    p.add_argument("--sort", choices=["number", "value", "duration"], default="number", help="order of the rows")
    p.add_argument("--state", choices=["waiting", "running", "paused", "complete", "pruned", "fail"], default=None,
                   help="only trials in this state (default: all)")
    p.add_argument("--columns", default=None, metavar="NAMES",
                   help="the parameter columns, comma separated: --columns learning_rate,optimizer "
                        "(default: the parameters the spec searches, then the most important)")
    p.add_argument("--params", type=_non_negative, default=None,
                   help="how many parameter columns without --columns (default: every searched one, at least 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per trial and line, for scripts")
    p = _client_command(sub, "rungs", "where a study's scheduler pauses trials: per rung, how many reached it, "
                        "wait paused there and went on", cmd_rungs)
    p.add_argument("id", help=_ID_HELP)
    for name, func, text in (("pause", cmd_pause, "pause a study (no new trials until resumed), or one trial of "
                                                  "it: checkpointed at its next epoch boundary, its slot freed"),
                             ("resume", cmd_resume, "resume a paused study, or a paused trial from its checkpoint"),
                             ("cancel", cmd_cancel, "cancel a queued, running or paused study"),
                             ("delete", cmd_delete, "delete a study, its trials and their files")):
        p = _client_command(sub, name, text, func)
        p.add_argument("id", help=_ID_HELP)
        if name in ("pause", "resume"):
            p.add_argument("trial", nargs="?", type=_non_negative, default=None,
                           help=f"a trial's number: {name} that trial only")
    p = _client_command(sub, "extend", "train a complete trial more epochs, on from its checkpoint", cmd_extend)
    p.add_argument("id", help=_ID_HELP)
    p.add_argument("trial", type=_non_negative, help="the trial's number")
    p.add_argument("--epochs", type=_positive, required=True, help="how many more epochs")
    _client_command(sub, "workers", "live workers and your trials on them", cmd_workers)
    p = _client_command(sub, "export", "write a study's best model and its ensemble into a folder", cmd_export)
    p.add_argument("id", help=_ID_HELP)
    p.add_argument("dir", help="the folder to write (created if missing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
