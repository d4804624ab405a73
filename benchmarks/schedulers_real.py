"""ASHA with promotion and PBT against stop-based Hyperband and the hand-written loop, by real training on this CPU.

One after the other, each with the same budget on MNIST-10k over the documented MLP space: the hand-written
Optuna TPE + Hyperband loop (`reference_optuna`), and the service with TPE + Hyperband (stop-based), with
TPE + ASHA with promotion, and with PBT (`service_runs`). The target is the best validation accuracy the
hand-written loop ends its budget with; each search's time to a completed trial at that accuracy is compared
with the loop's. With several seeds each seed is one such round (its own target) and the table gives medians.

    python -m benchmarks.schedulers_real --budget 300 --seeds 3 --out /tmp/schedulers-real.json
    python -m benchmarks.schedulers_real --budget 300 --seeds 3 --asha 2 3 --variants tpe_hyperband tpe_asha
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

from benchmarks import reference_optuna, service_runs
from benchmarks.common import TARGET_ACCURACY, SearchResult, machine, time_to, write_json

SERVICE_VARIANTS = ("tpe_hyperband", "tpe_asha", "pbt")


def one_round(budget_s: float, seed: int, variants: tuple[str, ...] = SERVICE_VARIANTS,
              asha: tuple[int, int] = service_runs.DEFAULT_ASHA) -> list[dict[str, Any]]:
    """The loop and the service's `variants` with one seed; each row carries its time to the loop's best and
    its speed-up."""
    searches: list[SearchResult] = [reference_optuna.run("tpe_hyperband", budget_s, seed=seed)]
    searches += [service_runs.run(variant, budget_s, seed=seed, asha=asha) for variant in variants]
    target = searches[0].summary()["best"]
    rows = []
    for search in searches:
        summary = search.summary()
        reached = time_to(search.in_budget(), target) if target is not None else None
        rows.append({**summary, "seed": seed, "target": target, "time_to_reference_best_s": reached})
    loop_t = rows[0]["time_to_reference_best_s"]
    for row in rows:
        t = row["time_to_reference_best_s"]
        row["sooner_than_loop"] = round(loop_t / t, 2) if t and loop_t else None
    return rows


def median(values: list[float | None], missing: float) -> float | None:
    """The median with a missing value (never reached) counted as `missing`; None if that is the median."""
    m = statistics.median(missing if v is None else v for v in values)
    return None if m == missing else round(m, 4)


def medians(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per search over the seeds: medians of the counts, the best value, the times and the speed-up
    (a search that never reached the loop's best counts as infinitely late, a speed-up of 0)."""
    out = []
    for i, first in enumerate(rounds[0]):
        rows = [r[i] for r in rounds]
        out.append({
            "name": first["name"], "seeds": [r["seed"] for r in rows],
            **{k: statistics.median(r[k] for r in rows) for k in ("trials", "complete", "pruned")},
            "best": median([r["best"] for r in rows], -math.inf),
            "target": median([r["target"] for r in rows], -math.inf),
            "time_to_target_s": median([r["time_to_target_s"] for r in rows], math.inf),
            "time_to_reference_best_s": median([r["time_to_reference_best_s"] for r in rows], math.inf),
            "sooner_than_loop": round(statistics.median(r["sooner_than_loop"] or 0.0 for r in rows), 2),
            "reached_loop_best": sum(r["time_to_reference_best_s"] is not None for r in rows),
        })
    return out


def run(budget_s: float, seeds: list[int], variants: tuple[str, ...] = SERVICE_VARIANTS,
        asha: tuple[int, int] = service_runs.DEFAULT_ASHA) -> dict[str, Any]:
    rounds = [one_round(budget_s, seed, variants, asha) for seed in seeds]
    return {"budget_s": budget_s, "machine": machine(), "asha": list(asha), "rounds": rounds,
            "medians": medians(rounds)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"| search | trials (complete / pruned) | best val. accuracy | time to {TARGET_ACCURACY} | "
             "time to the loop's best | sooner than the loop |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t, early = r["time_to_reference_best_s"], r["time_to_target_s"]
        reached = f" ({r['reached_loop_best']}/{len(r['seeds'])} seeds)" if "seeds" in r else ""
        lines.append(f"| {r['name']} | {r['trials']} ({r['complete']} / {r['pruned']}) | "
                     f"{r['best'] if r['best'] is None else format(r['best'], '.4f')} | "
                     f"{'not reached' if early is None else f'{early} s'} | "
                     f"{'not reached' if t is None else f'{t} s'}{reached} | "
                     f"{'-' if r['sooner_than_loop'] is None else str(r['sooner_than_loop']) + 'x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per search")
    parser.add_argument("--seeds", type=int, default=1, help="rounds, with seeds 0, 1, ...")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=SERVICE_VARIANTS, default=list(SERVICE_VARIANTS),
                        help="the service's searches beside the loop")
    parser.add_argument("--asha", nargs=2, type=int, default=list(service_runs.DEFAULT_ASHA),
                        metavar=("MIN_EPOCHS", "ETA"), help="tpe_asha's first rung and reduction factor")
    parser.add_argument("--out", default=None, help="write every round and the medians as JSON here")
    args = parser.parse_args(argv)
    result = run(args.budget, list(range(args.first_seed, args.first_seed + args.seeds)), tuple(args.variants),
                 tuple(args.asha))
    for rows in result["rounds"]:
        print(f"seed {rows[0]['seed']}, the loop's best {rows[0]['target']}:")
        print(table(rows))
    print(f"medians over {len(result['rounds'])} seeds:")
    print(table(result["medians"]))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
