"""The supervisor's work per member-epoch of a fused group: SQL statements sent and trials its pruning window
reads, for groups of K members. The runner trains; the supervisor records each member's epoch, reports it to
Optuna and asks the pruner, on one thread: what it does per epoch should not grow with K.

A real supervisor runs in this process (its runners are forked as in production) on a fresh SQLite file,
one slot fusing K trials of one study of K trials (digits, median pruning after 2 trials, no early stopping);
every statement any engine of this process sends while it runs is counted.

    python -m benchmarks.epoch_statements --k 1 4 8 --epochs 6 --out /tmp/epoch-statements.json
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import Engine

from benchmarks.common import write_json


def measure(k: int, epochs: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from app.core import migrate
    from app.core.config import Settings
    from app.core.db import Database
    from app.main import create_app
    from app.models import Study, TrialEpoch
    from app.services import keys
    from workers import window_storage
    from workers.supervisor import Supervisor, database_pool_size

    home = Path(tempfile.mkdtemp(prefix="hpsearch-epoch-statements-"))
    url = f"sqlite:///{home / 'hpsearch.db'}"
    migrate.upgrade(url)
    settings = Settings(home=home, database_url=url, rate_limit_burst=10_000, rate_limit_per_s=10_000)
    db = Database(url, pool_size=database_pool_size(1))
    client = TestClient(create_app(settings, db))
    client.headers["Authorization"] = f"Bearer {keys.create_key(db, owner='bench')}"
    spec = {"name": f"epoch-statements-{k}", "dataset": "builtin:digits", "model": "mlp",
            "search_space": {"n_layers": 1, "units": 32, "batch_size": 64, "dropout": 0.0},
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
            "budget": {"n_trials": k, "epochs": epochs, "max_parallel": k, "patience": None}}
    answer = client.post("/api/v1/studies", json=spec)
    answer.raise_for_status()
    study_id = answer.json()["id"]

    statements: Counter[str] = Counter()
    reads = {"trials": 0}
    sync = window_storage.TrialWindow.sync

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements[statement.lstrip().split(None, 1)[0].upper()] += 1

    def counted_sync(window: window_storage.TrialWindow) -> None:
        before = window.read
        sync(window)
        reads["trials"] += window.read - before

    event.listen(Engine, "before_cursor_execute", count)
    window_storage.TrialWindow.sync = counted_sync  # type: ignore[method-assign]
    supervisor = Supervisor(db, settings, devices=["cpu"], per_device=1, fuse=k)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        while True:
            with db.read_session() as session:
                if session.scalar(select(Study.status).where(Study.id == study_id)) in ("completed", "failed"):
                    break
            time.sleep(0.2)
    finally:
        supervisor.stop()
        thread.join(60)
        event.remove(Engine, "before_cursor_execute", count)
        window_storage.TrialWindow.sync = sync  # type: ignore[method-assign]
    with db.read_session() as session:
        member_epochs = len(session.scalars(select(TrialEpoch.epoch)).all())
    db.dispose()
    total = sum(statements.values())
    return {"k": k, "epochs": epochs, "member_epochs": member_epochs, "statements": total,
            "by_kind": dict(statements), "seconds": round(time.perf_counter() - started, 1),
            "statements_per_member_epoch": round(total / member_epochs, 1),
            "window_trials_read_per_member_epoch": round(reads["trials"] / member_epochs, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = [measure(k, args.epochs) for k in args.k]
    print("| K | member-epochs | statements per member-epoch | window trials read per member-epoch |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['k']} | {r['member_epochs']} | {r['statements_per_member_epoch']} | "
              f"{r['window_trials_read_per_member_epoch']} |")
    if args.out:
        write_json(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
