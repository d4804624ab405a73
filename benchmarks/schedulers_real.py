"""ASHA with promotion and PBT against stop-based Hyperband and the hand-written loop, by real training on this CPU.

One after the other, each with the same budget on MNIST-10k over the documented MLP space: the hand-written
Optuna TPE + Hyperband loop (`reference_optuna`), and the service with TPE + Hyperband (stop-based), with
TPE + ASHA with promotion, and with PBT (`service_runs`). The target is the best validation accuracy the
hand-written loop ends its budget with; each search's time to a completed trial at that accuracy is compared
with the loop's.

    python -m benchmarks.schedulers_real --budget 300 --out /tmp/schedulers-real.json
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import reference_optuna, service_runs
from benchmarks.common import TARGET_ACCURACY, SearchResult, machine, time_to, write_json


def run(budget_s: float) -> dict[str, Any]:
    searches: list[SearchResult] = [reference_optuna.run("tpe_hyperband", budget_s)]
    searches += [service_runs.run(variant, budget_s) for variant in ("tpe_hyperband", "tpe_asha", "pbt")]
    reference = searches[0].summary()
    target = reference["best"]
    rows = []
    for search in searches:
        summary = search.summary()
        reached = time_to(search.in_budget(), target) if target is not None else None
        rows.append({**summary, "target": target, "time_to_reference_best_s": reached})
    loop_t = rows[0]["time_to_reference_best_s"]
    for row in rows:
        t = row["time_to_reference_best_s"]
        row["sooner_than_loop"] = round(loop_t / t, 2) if t and loop_t else None
    return {"budget_s": budget_s, "machine": machine(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"| search | trials (complete / pruned) | best val. accuracy | time to {TARGET_ACCURACY} | "
             "time to the loop's best | sooner than the loop |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        t, early = r["time_to_reference_best_s"], r["time_to_target_s"]
        lines.append(f"| {r['name']} | {r['trials']} ({r['complete']} / {r['pruned']}) | "
                     f"{r['best'] if r['best'] is None else format(r['best'], '.4f')} | "
                     f"{'not reached' if early is None else f'{early} s'} | "
                     f"{'not reached' if t is None else f'{t} s'} | "
                     f"{'-' if r['sooner_than_loop'] is None else str(r['sooner_than_loop']) + 'x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per search")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    result = run(args.budget)
    print(table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
