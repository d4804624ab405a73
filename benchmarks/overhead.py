"""Overhead: tiny trials (1 epoch, 500 training samples) through the service vs a bare Optuna loop.

Both sides train the same trials with the same code (app.ml.artifacts.build_module + workers.trainer.train) on
the same rows, with TPE (seed 0) over the documented MLP space, and keep Optuna in a SQLite file. The service
adds REST, its own tables, leases, a runner child process (one per slot, living across trials; or, for the
comparison, one forked per trial), per-epoch curves, artifacts. Trials per minute run
from the REST submit (service) or the first ask (bare loop) to the last trial's end; the service's final test
evaluation comes after that and is reported apart.

    python -m benchmarks.overhead --trials 150 --out /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import SEED, write_json
from benchmarks.harness import running_service

TRAIN_SAMPLES = 500
# 781 rows split as the service does: 156 test, then 125 validation and 500 training rows.
DATASET_ROWS = 781
EPOCHS = 1


def tiny_dataset() -> tuple[np.ndarray, np.ndarray]:
    """The first 781 rows of scikit-learn's digits (64 features, 10 classes)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x[:DATASET_ROWS].astype(np.float32), y[:DATASET_ROWS].astype(np.int64)


def tiny_spec(dataset_ref: str, n_trials: int, slots: int) -> dict[str, Any]:
    return {"name": "bench-overhead", "dataset": dataset_ref, "model": "mlp",
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "sampler": {"name": "tpe", "seed": SEED}, "pruner": {"name": "none"},
            "budget": {"n_trials": n_trials, "max_parallel": slots, "epochs": EPOCHS, "patience": None,
                       "max_attempts": 1}}


def run_service(n_trials: int, slots: int, runner_trials: int = 50) -> dict[str, Any]:
    """`runner_trials` 1: a new runner process for every trial, as before runners lived across trials."""
    x, y = tiny_dataset()
    with running_service(slots=slots, HPSEARCH_RUNNER_TRIALS=str(runner_trials)) as svc:
        ref = svc.upload_npz("digits-781", x, y)
        study_id, submitted = svc.submit(tiny_spec(ref, n_trials, slots))
        start = time.perf_counter()
        study = svc.wait(study_id, timeout_s=600, poll_s=0.5)
        wall = time.perf_counter() - start
        result = svc.result("service", study_id, submitted, float("inf"), wall)
    finished = [t for t in result.trials if t.state in ("complete", "pruned", "fail")]
    last = max(t.finished_s for t in finished)
    runners = "a runner per trial" if runner_trials == 1 else f"runners of up to {runner_trials} trials"
    return {"name": f"service ({slots} slots, {runners})", "trials": len(finished),
            "complete": sum(t.state == "complete" for t in finished), "seconds": round(last, 2),
            "trials_per_min": round(60 * len(finished) / last, 1),
            "slot_ms_per_trial": round(1000 * last * slots / len(finished), 1),
            "finalize_s": round(wall - last, 1), "status": study["status"]}


def run_bare(n_trials: int, threads: int = 1) -> dict[str, Any]:
    """The same trials in `study.optimize` with Optuna's RDB storage in a fresh SQLite file.

    One torch thread by default, as each service slot has: tiny models gain nothing from a second
    thread, and on a loaded machine two spinning threads can make every trial many times slower.
    """
    import optuna
    import torch

    from app.core.optuna_store import optuna_storage
    from app.ml import data as datasets_lib
    from app.ml.artifacts import ModelSpec, build_module
    from app.ml.space import Context, resolve_space, sample_params
    from workers.runner import standardization
    from workers.trainer import TrainData, train

    torch.set_num_threads(threads)
    x, y = tiny_dataset()
    ds = datasets_lib.Dataset("digits-781", x, y, "classification", [str(i) for i in range(10)])
    s = datasets_lib.split_dataset(ds, validation_split=0.2, seed=SEED)
    mean, std = standardization(s.x_train, image=False)
    data = TrainData(torch.as_tensor(s.x_train), torch.as_tensor(s.y_train), torch.as_tensor(s.x_val),
                     torch.as_tensor(s.y_val), task="classification")
    resolved = resolve_space({}, Context("mlp"))
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-bare-"))
    url = f"sqlite:///{tmp / 'optuna.db'}"

    def objective(trial: optuna.Trial) -> float:
        params = sample_params(trial, resolved)
        spec = ModelSpec("mlp", params, "classification", (x.shape[1],), 10, None, ds.classes, mean.tolist(),
                         std.tolist())
        torch.manual_seed(SEED + trial.number)
        module = build_module(spec)

        class Report:
            def on_epoch_end(self, report: Any) -> bool:
                trial.report(report.metrics["val_accuracy"], report.epoch)
                return False

        result = train(module, data, params, epochs=EPOCHS, objective="val_accuracy", direction="maximize",
                       patience=None, seed=SEED + trial.number, callbacks=[Report()])
        return float(result.best_metrics.get("val_accuracy", float("nan")))

    study = optuna.create_study(storage=optuna_storage(url), direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=SEED))
    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    seconds = time.perf_counter() - start
    shutil.rmtree(tmp, ignore_errors=True)
    return {"name": f"bare Optuna loop (SQLite, {threads} thread)", "trials": n_trials,
            "complete": sum(t.state.name == "COMPLETE" for t in study.trials), "seconds": round(seconds, 2),
            "trials_per_min": round(60 * n_trials / seconds, 1)}


def run(n_trials: int, slots: int = 2, bare_threads: int = 1) -> dict[str, Any]:
    """The bare loop, the service, and the service forking a runner per trial, side by side."""
    bare = run_bare(n_trials, bare_threads)
    service = run_service(n_trials, slots)
    forking = run_service(n_trials, slots, runner_trials=1)
    return {"bare": bare, "service": service, "service_forking": forking,
            "ratio": round(service["trials_per_min"] / bare["trials_per_min"], 2),
            "slot_gap_saved_ms": round(forking["slot_ms_per_trial"] - service["slot_ms_per_trial"], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--slots", type=int, default=2, help="trial slots of the service's worker")
    parser.add_argument("--bare-threads", type=int, default=1, help="torch threads of the bare loop")
    parser.add_argument("--only", choices=["bare", "service"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.only == "bare":
        result: dict[str, Any] = run_bare(args.trials, args.bare_threads)
    elif args.only == "service":
        result = run_service(args.trials, args.slots)
    else:
        result = run(args.trials, args.slots, args.bare_threads)
    print(result)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
