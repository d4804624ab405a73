"""The soak's checks of how studies ended, of the checkpoint files left on disk and of the processes' logs.

Each takes the rows read once at the end (benchmarks.soak.check), the driver's ledger and the report; each
violation names the study, the trial and what disagrees.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

STOP_CRITERIA = ("target_value", "no_improvement", "timeout")  # what a spec's stop or timeout makes fire


def check_outcome(s: Any, rows: list[Any], ledger: Any, report: Any) -> None:
    """An ended study ended for a reason the soak can name: `cancelled` only after its client's cancel,
    `failed` only for a cause the driver recorded, `completed` only with its budget spent (or a stop
    criterion fired) and the test split evaluated."""
    report.checks["outcomes"] += 1
    if s.status == "cancelled" and s.id not in ledger.cancel_sent:
        report.violate("outcome", f"study {s.id} ({ledger.created.get(s.id)}) ended cancelled, but its client never "
                                  f"cancelled it (stop_reason {s.stop_reason!r}, error {str(s.error)[:200]!r})")
    if s.status == "failed" and s.id not in ledger.failure_causes:
        report.violate("outcome", f"study {s.id} ({ledger.created.get(s.id)}) ended failed with no cause the soak "
                                  f"caused: {str(s.error)[:300]!r}")
    if s.status == "completed":
        _check_completed(s, rows, ledger, report)


def _check_completed(s: Any, rows: list[Any], ledger: Any, report: Any) -> None:
    finished = sum(1 for t in rows if t.state in ("complete", "pruned", "fail"))
    spent = s.stop_reason == "n_trials" and finished == s.n_trials
    if not spent and s.stop_reason not in STOP_CRITERIA:
        report.violate("outcome", f"study {s.id} ({ledger.created.get(s.id)}) completed with {finished}/"
                                  f"{s.n_trials} trials finished and stop_reason {s.stop_reason!r}")
    if s.stop_reason in STOP_CRITERIA and not _has_criterion(ledger.specs.get(s.id, {}), s.stop_reason):
        report.violate("outcome", f"study {s.id} completed by {s.stop_reason!r}, which its spec does not set")
    complete = [t for t in rows if t.state == "complete"]
    if complete and not s.test_metrics:
        report.violate("outcome", f"study {s.id} completed with {len(complete)} complete trial(s) but no test "
                                  f"metrics (error {str(s.error)[:200]!r})")
    if not complete and s.error != "no trial completed":
        report.violate("outcome", f"study {s.id} completed without a complete trial and without saying so "
                                  f"(error {s.error!r})")


def _has_criterion(spec: dict[str, Any], reason: str) -> bool:
    if reason == "timeout":
        return bool(spec.get("budget", {}).get("timeout_s"))
    return bool(spec.get("stop"))


def check_optuna_links(s: Any, rows: list[Any], report: Any) -> None:
    """Every complete or pruned trial names its Optuna trial (a failed one may never have been bound)."""
    for t in rows:
        if t.state in ("complete", "pruned"):
            report.checks["optuna_links"] += 1
            if t.optuna_trial_id is None:
                report.violate("optuna", f"study {s.id} trial {t.number} is {t.state} without an Optuna trial")


def check_creates(studies: dict[str, Any], ledger: Any, report: Any) -> None:
    """Every create carried an Idempotency-Key, so a create retried after an API kill made no second study:
    every study row is one the driver knows, under the key it sent."""
    for sid, s in studies.items():
        report.checks["creates"] += 1
        key = ledger.idempotency_keys.get(sid)
        if key is None:
            report.violate("idempotency", f"study {sid} ({s.status}, key {s.idempotency_key!r}) is not one the "
                                          "driver created: a create retried without its key?")
        elif s.idempotency_key != key:
            report.violate("idempotency", f"study {sid} holds Idempotency-Key {s.idempotency_key!r}, the driver "
                                          f"sent {key!r}")


# ---- checkpoint files ----------------------------------------------------------------------------------------


def allowed_completed(spec: dict[str, Any]) -> int | None:
    """How many completed trials of a study may keep a checkpoint (None: all of them)."""
    from app.schemas.study import KEEP_BEST_K

    keep = spec.get("keep_checkpoints") or "best_k"
    if keep == "all":
        return None
    if keep == "none":
        return 0
    return int(spec.get("keep_best_k") or KEEP_BEST_K)


def check_checkpoint_files(artifact_dir: Path, studies: dict[str, Any], trials_of: dict[str, list[Any]],
                           ledger: Any, report: Any) -> None:
    """No checkpoint file is left by an ended trial beyond what keep_checkpoints keeps: pruned, failed,
    dropped and deleted trials keep none, a completed one at most the file its row names, and no more
    completed trials hold one than the policy allows. A file a row names is there."""
    from workers.publishing import CHECKPOINTS_DIR, checkpoint_folders

    for sid in ledger.deleted_or_gone(studies):
        left = artifact_dir / sid / CHECKPOINTS_DIR
        report.checks["checkpoint_studies"] += 1
        if left.exists():
            report.violate("checkpoints", f"study {sid} was deleted but {_files_in(left)} checkpoint file(s) "
                                          f"remain under {left}")
    for sid, s in studies.items():
        if s.status not in ("completed", "failed", "cancelled"):
            continue
        report.checks["checkpoint_studies"] += 1
        rows = {t.number: t for t in trials_of.get(sid, []) if t.number is not None}
        for number, folders in checkpoint_folders(artifact_dir, sid).items():
            _check_trial_files(s, rows.get(number), number, folders, artifact_dir, report)
        _check_kept(s, list(rows.values()), artifact_dir, report)


def _check_trial_files(s: Any, t: Any, number: int, folders: list[Path], artifact_dir: Path,
                       report: Any) -> None:
    files = sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())
    kept = artifact_dir / t.checkpoint_path if t is not None and t.state == "complete" and t.checkpoint_path else None
    extra = [p for p in files if p != kept]
    if extra:
        state = t.state if t is not None else "no row"
        names = ", ".join(str(p.relative_to(artifact_dir)) for p in extra[:3])
        report.violate("checkpoints", f"study {s.id} ({s.status}) trial {number} ({state}, {_why(t)}) left "
                                      f"{len(extra)} checkpoint file(s) it does not keep: {names}")


def _why(t: Any) -> str:
    return f"error {str(t.error)[:160]!r}" if t is not None and t.error else "no error"


def _check_kept(s: Any, rows: list[Any], artifact_dir: Path, report: Any) -> None:
    holders = [t for t in rows if t.checkpoint_path]
    for t in holders:
        report.checks["kept_checkpoints"] += 1
        if t.state != "complete":
            report.violate("checkpoints", f"study {s.id} trial {t.number} is {t.state} and still names checkpoint "
                                          f"{t.checkpoint_path}")
        elif not (artifact_dir / t.checkpoint_path).is_file():
            report.violate("checkpoints", f"study {s.id} trial {t.number} keeps checkpoint {t.checkpoint_path}, "
                                          "which is not on disk")
    limit = allowed_completed(_json(s.spec))
    if limit is not None and len(holders) > limit:
        report.violate("checkpoints", f"study {s.id} ({_json(s.spec).get('keep_checkpoints', 'best_k')}) keeps "
                                      f"checkpoints of {len(holders)} completed trials, at most {limit} allowed")


def _files_in(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


# ---- logs ------------------------------------------------------------------------------------------------------

_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")
_NUMBERS = re.compile(r"\d+(\.\d+)?")  # "backing off 0.5s", "backing off 1.0s": one kind of message


def check_worker_logs(log_dir: Path, report: Any) -> None:
    """A Python traceback in a worker's log is a violation: a logged exception (a JSON line with `exc`) or
    one printed raw. Reported once per distinct message and exception, with how often it came."""
    seen: Counter[str] = Counter()
    where: dict[str, str] = {}
    for log in sorted(log_dir.glob("worker-*.log"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        report.checks["worker_logs"] += 1
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            what = _traceback_in(line, lines[i + 1:i + 60])
            if what is not None:
                seen[what] += 1
                where.setdefault(what, log.name)
    for what, n in sorted(seen.items()):
        report.violate("traceback", f"{n}x in {where[what]} and others: {what}" if n > 1 else
                       f"in {where[what]}: {what}")


def _traceback_in(line: str, following: list[str]) -> str | None:
    """The message and the exception's last line, when `line` carries or starts a traceback."""
    if line.startswith("{"):
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        if isinstance(rec, dict) and rec.get("exc"):
            last = str(rec["exc"]).strip().splitlines()[-1]
            return f"{_NUMBERS.sub('N', str(rec.get('msg', ''))):.120} -> {last:.200}"
        return None
    if _TRACEBACK.match(line):
        last = next((ln for ln in following if ln and not ln.startswith((" ", "Traceback"))), "?")
        return f"raw traceback -> {last:.200}"
    return None
