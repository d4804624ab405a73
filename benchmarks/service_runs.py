"""The reference searches through the real service: `hpsearch serve` on a temporary SQLite, a study over REST.

Timing starts just before the REST submit; only trials the service started inside the budget count, the
same rule as `optimize(timeout=...)`.

    python -m benchmarks.service_runs --variant tpe_hyperband --budget 150 --out /tmp/svc.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.common import EPOCHS, SEED, SearchResult, write_json
from benchmarks.harness import running_service

VARIANTS = ("tpe_hyperband", "tpe_asha", "pbt", "tpe", "random")
# pbt trains its population through the whole budget: 16 members of 16 epochs (twice the others' trials,
# since PBT's schedules pay off in longer training) take about 170 s on 2 slots here.
POPULATION, PBT_EPOCHS = 16, 16
DEFAULT_SLOTS = 2
DEFAULT_PATIENCE = 3
DEFAULT_ASHA = (1, 3)  # min_epochs, reduction_factor: rungs 1, 3 below the 8 epochs


def mnist_spec(variant: str, budget_s: float, *, slots: int, patience: int | None,
               seed: int = SEED, asha: tuple[int, int] = DEFAULT_ASHA) -> dict[str, Any]:
    """The documented MLP space (no entry narrowed) on builtin:mnist, 8 epochs, the budget as timeout_s (pbt:
    its population's members are the trials, trained from random starting values, without early stopping)."""
    sampler = "random" if variant == "random" else "tpe"
    pruner = "hyperband" if variant == "tpe_hyperband" else "none"
    schedulers = {
        "tpe_asha": {"name": "asha", "min_epochs": asha[0], "reduction_factor": asha[1], "max_epochs": EPOCHS},
        "pbt": {"name": "pbt", "population": POPULATION, "interval_epochs": 2,
                "mutable": ["learning_rate", "weight_decay", "dropout"]},
    }
    return {
        "name": f"bench-{variant}",
        "dataset": "builtin:mnist",
        "model": "mlp",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "sampler": {"name": sampler, "seed": seed},
        "pruner": {"name": pruner},
        "budget": {"n_trials": POPULATION if variant == "pbt" else 10_000, "timeout_s": budget_s,
                   "max_parallel": slots, "epochs": PBT_EPOCHS if variant == "pbt" else EPOCHS,
                   "patience": patience, "max_attempts": 1},
        **({"scheduler": schedulers[variant]} if variant in schedulers else {}),
    }


def run(variant: str, budget_s: float, *, slots: int = DEFAULT_SLOTS, patience: int | None = DEFAULT_PATIENCE,
        keep: bool = False, seed: int = SEED, asha: tuple[int, int] = DEFAULT_ASHA) -> SearchResult:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    with running_service(slots=slots, keep=keep) as svc:
        study_id, submitted = svc.submit(mnist_spec(variant, budget_s, slots=slots, patience=patience, seed=seed,
                                                         asha=asha))
        start = time.perf_counter()
        study = svc.wait(study_id, timeout_s=budget_s + 600)
        wall = time.perf_counter() - start
        name = f"service {variant}" + (f"({asha[0]},{asha[1]})" if variant == "tpe_asha" else "")
        return svc.result(name, study_id, submitted, budget_s, wall, slots=slots,
                          patience=patience, status=study["status"],
                          test_accuracy=(study["test_metrics"] or {}).get("test_accuracy"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="tpe_hyperband")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of search (the study's timeout_s)")
    parser.add_argument("--slots", type=int, default=DEFAULT_SLOTS, help="trial slots of the embedded worker")
    parser.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                        help="early-stopping patience in epochs (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (database, logs)")
    parser.add_argument("--out", default=None, help="write trials and summary as JSON here")
    args = parser.parse_args(argv)
    result = run(args.variant, args.budget, slots=args.slots, patience=args.patience or None, keep=args.keep)
    summary = result.summary()
    print(summary)
    write_json(args.out, {"summary": summary, "trials": result.trials})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
