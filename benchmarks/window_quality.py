"""Does a bounded sampler window find configurations as good as TPE over the whole history?

The same digits (or MNIST-10k) search (the documented MLP space, the service's TPE settings, asked through
`workers.asking.ask_trial`) runs with the sampler window and with the full history, for several seeds; each
trial trains an MLP for a few epochs and reports its best validation accuracy. The window is scaled down
with the study (the 25 best, the 10 latest and a systematic sample of at most 15, of N trials) so that it
leaves most of the history out, as the service's 100 + 100 + 600 trial window does at 100,000 trials; TPE's
good group (at most 25 trials) is inside it.

    python -m benchmarks.window_quality --trials 150 --seeds 0,1,2,3,4 --out /tmp/window_quality.json
    python -m benchmarks.window_quality --dataset mnist --trials 100 --seeds 0,1,2,3 --out /tmp/wq_mnist.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import torch.nn.functional as F

from benchmarks.common import write_json

EPOCHS = 6
SMALL_BEST, SMALL_RECENT, SMALL_SAMPLE = 25, 10, 15
# Entries the search leaves fixed: it compares samplers, not image augmentation or schedules.
FIXED = {"lr_schedule": "constant", "augmentation": "none", "layer_shape": "constant"}


def train(params: dict[str, Any], splits: Any, seed: int) -> float:
    """Best validation accuracy over EPOCHS epochs of one configuration."""
    from app.ml.networks import build_model

    torch.manual_seed(seed)
    x_train, y_train = torch.as_tensor(splits.x_train), torch.as_tensor(splits.y_train)
    x_val, y_val = torch.as_tensor(splits.x_val), torch.as_tensor(splits.y_val)
    model = build_model(params, model="mlp", input_shape=tuple(x_train.shape[1:]), n_outputs=10,
                        mean=splits.x_train.mean(axis=0), std=splits.x_train.std(axis=0) + 1e-6)
    name, lr, wd = params["optimizer"], params["learning_rate"], params["weight_decay"]
    if name in ("sgd", "momentum", "nesterov"):
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd,
                                                     momentum=params.get("momentum", 0.0),
                                                     nesterov=name == "nesterov")
    else:
        opt = {"adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
               "adamw": torch.optim.AdamW}[name](model.parameters(), lr=lr, weight_decay=wd)
    best = 0.0
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_train))
        for start in range(0, len(x_train), params["batch_size"]):
            idx = perm[start:start + params["batch_size"]]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(x_val)
        if not torch.isfinite(out).all():
            break
        best = max(best, (out.argmax(1) == y_val).float().mean().item())
    return best


def search(window: bool, seed: int, n_trials: int, splits: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    from app.core.optuna_store import optuna_storage
    from app.schemas.study import StudySpec
    from workers import asking
    from workers.search import make_sampler

    sizes = (asking.BEST_TRIALS, asking.RECENT_TRIALS, asking.SAMPLED_TRIALS)
    asking.BEST_TRIALS, asking.RECENT_TRIALS, asking.SAMPLED_TRIALS = (
        (SMALL_BEST, SMALL_RECENT, SMALL_SAMPLE) if window else (10**9, 10**9, 0))
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-window-"))
    storage = optuna_storage(f"sqlite:///{tmp / 'optuna.db'}")
    try:
        spec = StudySpec(name="quality", dataset="builtin:digits", sampler={"name": "tpe", "seed": seed})
        optuna.create_study(study_name=f"q-{window}-{seed}", storage=storage, direction="maximize")
        study = asking.open_study(storage, f"q-{window}-{seed}", make_sampler(spec, resolved),
                                  optuna.pruners.NopPruner())
        windowed = asking.storage_of(study)
        values, held = [], 0
        for _ in range(n_trials):
            number, _, params = asking.ask_trial(study, resolved)
            value = train(params, splits, seed * 100_000 + number)
            study.tell(number, value)
            values.append(value)
            held = max(held, len(windowed.window(windowed.get_study_id_from_name(study.study_name)).trials()))
    finally:
        asking.BEST_TRIALS, asking.RECENT_TRIALS, asking.SAMPLED_TRIALS = sizes
        storage.engine.dispose()
    return {"window": window, "seed": seed, "best": max(values), "best_of_first_half": max(values[:n_trials // 2]),
            "top10_mean": float(np.mean(sorted(values)[-10:])), "max_trials_held": held}


def main(argv: list[str] | None = None) -> int:
    from app.ml import data
    from app.ml.space import Context, resolve_space

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits",
                        help="digits (built in) or MNIST-10k (the official test set, split as the benchmarks do)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(1)
    if args.dataset == "mnist":
        from benchmarks.common import mnist_rows

        splits: Any = mnist_rows(0)
    else:
        splits = data.split_dataset(data.load_builtin("builtin:digits"), validation_split=0.2, seed=0)
    resolved = resolve_space(FIXED, Context("mlp", image=True))
    runs = []
    started = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for window in (True, False):
            runs.append(search(window, seed, args.trials, splits, resolved))
            r = runs[-1]
            print(f"seed {seed} {'window' if window else 'full  '}: best {r['best']:.4f}, "
                  f"top-10 mean {r['top10_mean']:.4f}, held at most {r['max_trials_held']} trials", flush=True)
    summary = {}
    for window in (True, False):
        best = [r["best"] for r in runs if r["window"] == window]
        top = [r["top10_mean"] for r in runs if r["window"] == window]
        summary["window" if window else "full"] = {
            "best_mean": round(statistics.mean(best), 4), "best_stdev": round(statistics.pstdev(best), 4),
            "top10_mean": round(statistics.mean(top), 4)}
    print(summary)
    write_json(args.out, {"dataset": args.dataset, "trials": args.trials, "epochs": EPOCHS,
                          "window": [SMALL_BEST, SMALL_RECENT, SMALL_SAMPLE], "runs": runs, "summary": summary,
                          "seconds": round(time.perf_counter() - started)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
