"""The one command: every performance benchmark in sequence, then a table of the targets.

Pieces run one after another, never side by side (machines are noisy), each in its own process that writes
DIR/<piece>.json and DIR/<piece>.log, so one that fails leaves the rest standing. The table of targets
(target, measured, ratio, met) is printed and written with the machine's description to DIR/report.md.

    python -m benchmarks.run --out /tmp/bench                  # the real benchmark (150 s searches)
    python -m benchmarks.run --quick --out /tmp/bench-quick    # a smoke test of the whole driver (~3 min)
    python -m benchmarks.run --only scale,gpu --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, TARGET_ACCURACY, machine

GROUPS = ("search", "overhead", "scale", "gpu")
TRIALS_RATIO, TIME_TO_TARGET_RATIO, OVERHEAD_RATIO, GPU_RATIO = 1.5, 0.5, 0.9, 8.0


@dataclass
class Piece:
    name: str
    group: str
    module: str
    args: list[str]
    timeout_s: float


def pieces(budget: float, quick: bool, reference_threads: int | None) -> list[Piece]:
    search_timeout = budget + 900
    refs = ("tpe_hyperband", "tpe") if quick else ("tpe_hyperband", "tpe", "random")
    services = ("tpe_hyperband",) if quick else ("tpe_hyperband", "tpe")
    threads = ["--threads", str(reference_threads)] if reference_threads else []
    out = [Piece(f"reference_{v}", "search", "reference_optuna",
                 ["--variant", v, "--budget", str(budget), *threads], search_timeout) for v in refs]
    out += [Piece(f"service_{v}", "search", "service_runs", ["--variant", v, "--budget", str(budget)],
                  search_timeout) for v in services]
    out.append(Piece("overhead", "overhead", "overhead", ["--trials", "20" if quick else "150"], 1800))
    scale = ["--workers", "4", "--trials", "32", "--ask-sizes", "200,1000", "--asks", "3",
             "--memory-trials", "24"] if quick else []
    out.append(Piece("scale", "scale", "scale", scale, 3600))
    gpu = ["--per-device", "4", "--trials", "8", "--epochs", "2"] if quick else []
    out.append(Piece("gpu", "gpu", "gpu", gpu, 3600))
    return out


def run_piece(piece: Piece, out_dir: Path) -> dict[str, Any]:
    """Run one piece in its own process; its JSON, or why there is none."""
    json_path, log_path = out_dir / f"{piece.name}.json", out_dir / f"{piece.name}.log"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"benchmarks.{piece.module}", *piece.args, "--out", str(json_path)]
    print(f"-- {piece.name}: {shlex.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=piece.timeout_s,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.perf_counter() - started, 1)
    if rc == 0 and json_path.exists():
        print(f"   done in {seconds} s", flush=True)
        return {"ok": True, "seconds": seconds, "data": json.loads(json_path.read_text())}
    why = f"timed out after {piece.timeout_s:.0f} s" if rc is None else f"exit code {rc}"
    print(f"   FAILED ({why}); see {log_path}", flush=True)
    return {"ok": False, "seconds": seconds, "error": f"{why}; see {log_path.name}"}


# ---- the table of targets --------------------------------------------------------------------------------


Row = dict[str, str]


def _row(target: str, measured: str, ratio: float | str | None, met: bool | str) -> Row:
    ratio_text = "-" if ratio is None else ratio if isinstance(ratio, str) else f"{ratio:.2f}x"
    met_text = met if isinstance(met, str) else ("yes" if met else "no")
    return {"target": target, "measured": measured, "ratio": ratio_text, "met": met_text}


def _failed(target: str, *results: dict[str, Any] | None) -> Row | None:
    """A row saying which piece failed or did not run, when one of `results` is missing."""
    for r in results:
        if r is None:
            return _row(target, "not run", None, "n/a")
        if not r["ok"]:
            return _row(target, f"failed: {r['error']}", None, "no")
    return None


def search_rows(results: dict[str, dict[str, Any]], budget: float) -> list[Row]:
    ref_hb, ref_tpe, svc = (results.get(n) for n in ("reference_tpe_hyperband", "reference_tpe",
                                                        "service_tpe_hyperband"))
    rows: list[Row] = []
    target = f"trials in {budget:g} s, service TPE+Hyperband / hand-written TPE+Hyperband >= {TRIALS_RATIO}x"
    best_target = "best validation accuracy, service TPE+Hyperband >= hand-written TPE+Hyperband"
    if failed := _failed(target, ref_hb, svc):
        rows += [failed, {**failed, "target": best_target}]
    else:
        s, r = _summary(results, "service_tpe_hyperband"), _summary(results, "reference_tpe_hyperband")
        ratio = s["trials"] / r["trials"] if r["trials"] else None
        rows.append(_row(target, f"{s['trials']} vs {r['trials']}", ratio,
                         ratio is not None and ratio >= TRIALS_RATIO))
        if s["best"] is None or r["best"] is None:
            rows.append(_row(best_target, f"{s['best']} vs {r['best']}", None,
                             s["best"] is not None and r["best"] is None))
        else:
            rows.append(_row(best_target, f"{s['best']:.4f} vs {r['best']:.4f}", s["best"] / r["best"],
                             s["best"] >= r["best"]))
    target = (f"time to {TARGET_ACCURACY} validation accuracy, service TPE+Hyperband / hand-written TPE "
              f"(no pruning) <= {TIME_TO_TARGET_RATIO}x")
    if failed := _failed(target, ref_tpe, svc):
        return [*rows, failed]
    s_t = _summary(results, "service_tpe_hyperband")["time_to_target_s"]
    r_t = _summary(results, "reference_tpe")["time_to_target_s"]
    if s_t is None:
        rows.append(_row(target, f"service not reached in {budget:g} s; hand-written {_secs(r_t)}", None, False))
    elif r_t is None:  # the reference would have needed more than the budget
        bound = s_t / budget
        rows.append(_row(target, f"{s_t} s vs not reached in {budget:g} s", f"< {bound:.2f}x",
                         True if bound <= TIME_TO_TARGET_RATIO else "unknown"))
    else:
        rows.append(_row(target, f"{s_t} s vs {r_t} s", s_t / r_t, s_t / r_t <= TIME_TO_TARGET_RATIO))
    return rows


def _summary(results: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return dict(results[name]["data"]["summary"])


def _secs(value: float | None) -> str:
    return "not reached" if value is None else f"{value} s"


def overhead_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    target = f"tiny trials per minute, service / bare Optuna loop on SQLite >= {OVERHEAD_RATIO}x"
    r = results.get("overhead")
    if failed := _failed(target, r):
        return [failed]
    d = results["overhead"]["data"]
    return [_row(target, f"{d['service']['trials_per_min']} vs {d['bare']['trials_per_min']} per min",
                 d["ratio"], d["ratio"] >= OVERHEAD_RATIO)]


def gpu_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    target = f"GPU trials per hour, N per device / one at a time >= {GPU_RATIO}x"
    r = results.get("gpu")
    if failed := _failed(target, r):
        return [failed]
    d = results["gpu"]["data"]
    if "skipped" in d:
        return [_row(target, f"skipped: {d['skipped']}", None, "n/a")]
    shared, seq = d["shared"], d["sequential"]
    util = (shared.get("gpu") or {}).get("util_mean_pct")
    measured = (f"{shared['trials_per_hour']:.0f} vs {seq['trials_per_hour']:.0f} per hour on {d['device']} "
                f"({shared['slots']} per device; mean GPU utilization {util if util is not None else '-'}% vs "
                f"{(seq.get('gpu') or {}).get('util_mean_pct', '-')}%)")
    return [_row(target, measured, d["ratio"], d["ratio"] is not None and d["ratio"] >= GPU_RATIO)]


def scale_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    r = results.get("scale")
    if failed := _failed("scale: workers on PostgreSQL, ask latency, worker memory", r):
        return [failed]
    d = results["scale"]["data"]
    rows: list[Row] = []
    if c := d.get("claims"):
        rows.append(_row(f"{c['workers']} worker processes on PostgreSQL: no deadlock, every trial once",
                         f"{c['claims_per_s']} claims/s; {c['postgres_deadlocks']} deadlocks; "
                         f"{c['distinct_numbers']}/{c['n_trials']} numbers, {c['started_twice']} started twice; "
                         f"study {c['status']}", None, bool(c["ok"])))
    for a in d.get("asks", []):
        rows.append(_row(f"TPE ask latency at {a['trials_in_study']} trials, cached mirror <= plain ask",
                         f"{a['mirror']['median_ms']} ms vs {a['direct']['median_ms']} ms (median)", a["ratio"],
                         a["ratio"] <= 1.0))
    if m := d.get("memory"):
        rows.append(_row(f"worker memory flat over {m['n_trials']} trials (<= +5%)",
                         f"{m['first']['rss_mib']} MiB after {m['first']['after_trials']} trials, "
                         f"{m['last']['rss_mib']} MiB after {m['last']['after_trials']}",
                         m["last"]["rss_mib"] / m["first"]["rss_mib"], bool(m["ok"])))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| target | measured | ratio | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['target']} | {r['measured']} | {r['ratio']} | {r['met']} |" for r in rows]
    return "\n".join(lines)


def report(rows: list[Row], results: dict[str, dict[str, Any]], argv: list[str], started: datetime) -> str:
    info = machine()
    lines = [f"# Performance benchmark, {started:%Y-%m-%d %H:%M} UTC", "",
             f"Command: `python -m benchmarks.run {shlex.join(argv)}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "", table(rows), "",
             "| piece | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'ok' if r['ok'] else r['error']} | {r['seconds']} |" for name, r in results.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=None, help="seconds per search (default 150; quick 20)")
    parser.add_argument("--quick", action="store_true", help="tiny settings everywhere: a smoke test (~3 min)")
    parser.add_argument("--reference-threads", type=int, default=None,
                        help="torch threads of the hand-written script (default: torch's choice; quick: 1)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma list of {', '.join(GROUPS)}")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "hpsearch-benchmarks"),
                        help="folder for the JSON, logs and report.md")
    args = parser.parse_args(argv)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    if unknown := groups - set(GROUPS):
        parser.error(f"unknown group(s): {', '.join(sorted(unknown))}")
    budget = args.budget if args.budget is not None else (20.0 if args.quick else 150.0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    # Quick runs share the machine with whatever else runs: two spinning torch threads can then make one
    # 8-epoch trial of the hand-written script take minutes, far past a smoke test's budget.
    reference_threads = args.reference_threads or (1 if args.quick else None)
    results = {p.name: run_piece(p, out_dir) for p in pieces(budget, args.quick, reference_threads)
               if p.group in groups}
    rows: list[Row] = []
    if "search" in groups:
        rows += search_rows(results, budget)
    if "overhead" in groups:
        rows += overhead_rows(results)
    if "gpu" in groups:
        rows += gpu_rows(results)
    if "scale" in groups:
        rows += scale_rows(results)
    print()
    print(table(rows))
    text = report(rows, results, argv, started)
    (out_dir / "report.md").write_text(text)
    (out_dir / "targets.json").write_text(json.dumps(rows, indent=1))
    print(f"\nreport: {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
