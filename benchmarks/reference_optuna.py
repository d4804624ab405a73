"""The reference: what a user writes by hand instead of using the service.

`optuna.create_study(...).optimize(objective, timeout=...)` with a plain PyTorch loop over the documented MLP
space on MNIST-10k (6,400 train / 1,600 validation rows, standardized on train), 8 epochs per trial, batches
indexed from in-memory tensors. Only the rows come from the service's split function, so that validation
accuracies compare; the space, the model, the loop and the search are written here from scratch.

    python -m benchmarks.reference_optuna --variant tpe_hyperband --budget 150 --out /tmp/ref.json
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import datetime
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import EPOCHS, SEED, MnistRows, SearchResult, TrialRecord, mnist_rows, seconds_since, write_json

VARIANTS = ("tpe_hyperband", "tpe", "random")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """The documented MLP space for image data, one suggest call per hyperparameter."""
    p: dict[str, Any] = {
        "n_layers": trial.suggest_int("n_layers", 1, 4),
        "units": trial.suggest_int("units", 32, 512, log=True),
        "layer_shape": trial.suggest_categorical("layer_shape", ["constant", "funnel"]),
        "activation": trial.suggest_categorical("activation", ["relu", "tanh", "sigmoid", "silu"]),
        "batch_norm": trial.suggest_categorical("batch_norm", ["none", "before_activation", "after_activation"]),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "weight_decay": trial.suggest_float("weight_decay", 1e-8, 1e-2, log=True),
        "weight_init": trial.suggest_categorical(
            "weight_init", ["he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "normal"]),
        "optimizer": trial.suggest_categorical(
            "optimizer", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]),
    }
    if p["optimizer"] in ("momentum", "nesterov"):
        p["momentum"] = trial.suggest_float("momentum", 0.5, 0.99)
    p["learning_rate"] = trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
    p["lr_schedule"] = trial.suggest_categorical("lr_schedule", ["constant", "step", "plateau", "cosine"])
    p["batch_size"] = trial.suggest_categorical("batch_size", [32, 64, 128, 256])
    p["augmentation"] = trial.suggest_categorical("augmentation", ["none", "light"])
    return p


def make_model(p: dict[str, Any]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for i in range(p["n_layers"]):
        out = p["units"] if p["layer_shape"] == "constant" else max(p["units"] >> i, min(p["units"], 4))
        layers.append(nn.Linear(width, out))
        act = ACTIVATIONS[p["activation"]]()
        if p["batch_norm"] == "before_activation":
            layers += [nn.BatchNorm1d(out), act]
        elif p["batch_norm"] == "after_activation":
            layers += [act, nn.BatchNorm1d(out)]
        else:
            layers.append(act)
        if p["dropout"] > 0:
            layers.append(nn.Dropout(p["dropout"]))
        width = out
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    init = {"he_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
            "he_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
            "glorot_normal": nn.init.xavier_normal_, "glorot_uniform": nn.init.xavier_uniform_,
            "normal": lambda w: nn.init.normal_(w, 0.0, 1.0)}[p["weight_init"]]
    for m in model.modules():
        if isinstance(m, nn.Linear):
            init(m.weight)
            nn.init.zeros_(m.bias)
    return model


def make_optimizer(p: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    lr, wd, params = p["learning_rate"], p["weight_decay"], model.parameters()
    name = p["optimizer"]
    if name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=p.get("momentum", 0.0), nesterov=name == "nesterov",
                               weight_decay=wd)
    cls = {"adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
           "adamw": torch.optim.AdamW}[name]
    return cls(params, lr=lr, weight_decay=wd)


def make_schedule(p: dict[str, Any], opt: torch.optim.Optimizer) -> Any:
    s = torch.optim.lr_scheduler
    return {"constant": lambda: None, "step": lambda: s.StepLR(opt, 5, 0.5),
            "plateau": lambda: s.ReduceLROnPlateau(opt, factor=0.5, patience=2),
            "cosine": lambda: s.CosineAnnealingLR(opt, EPOCHS)}[p["lr_schedule"]]()


def light_augment(x: torch.Tensor, noise_std: float) -> torch.Tensor:
    """Shifts of up to 2 px, rotations of up to 10 degrees, Gaussian noise."""
    b = x.shape[0]
    angle = (torch.rand(b) * 2 - 1) * math.radians(10)
    tx, ty = ((torch.rand(b) * 2 - 1) * 4 / 28), ((torch.rand(b) * 2 - 1) * 4 / 28)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return x + torch.randn_like(x) * noise_std


class Objective:
    """Trains one configuration; reports validation accuracy each epoch to the pruner."""

    def __init__(self, rows: MnistRows, seed: int = SEED) -> None:
        self.seed = seed
        mean, std = float(rows.x_train.mean()), float(rows.x_train.std())
        self.x_train = (torch.as_tensor(rows.x_train) - mean) / std
        self.y_train = torch.as_tensor(rows.y_train)
        self.x_val = (torch.as_tensor(rows.x_val) - mean) / std
        self.y_val = torch.as_tensor(rows.y_val)

    def __call__(self, trial: optuna.Trial) -> float:
        p = suggest(trial)
        torch.manual_seed(self.seed + trial.number)
        model = make_model(p)
        opt = make_optimizer(p, model)
        schedule = make_schedule(p, opt)
        best = 0.0
        n = len(self.x_train)
        for epoch in range(1, EPOCHS + 1):
            model.train()
            perm = torch.randperm(n)
            for start in range(0, n, p["batch_size"]):
                idx = perm[start:start + p["batch_size"]]
                if len(idx) < 2:
                    continue
                xb = self.x_train[idx]
                if p["augmentation"] == "light":
                    xb = light_augment(xb, 0.05)  # 5% of the (now unit) input std
                loss = F.cross_entropy(model(xb), self.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                out = model(self.x_val)
                val_loss = F.cross_entropy(out, self.y_val).item()
                accuracy = (out.argmax(1) == self.y_val).float().mean().item()
            if not math.isfinite(val_loss):
                raise optuna.TrialPruned()  # diverged: nothing more to learn from it
            best = max(best, accuracy)
            if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
                schedule.step(val_loss)
            elif schedule is not None:
                schedule.step()
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best


def make_study(variant: str, storage: str | None, seed: int = SEED) -> optuna.Study:
    if variant == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=EPOCHS, reduction_factor=3) \
        if variant == "tpe_hyperband" else optuna.pruners.NopPruner()
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner, storage=storage)


def run(variant: str, budget_s: float, storage: str | None = None, threads: int | None = None,
        seed: int = SEED) -> SearchResult:
    """One search of `budget_s` seconds; storage None keeps Optuna in memory. The seed drives the sampler and
    each trial's initial weights; the train/validation split stays the service's (seed 0)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = Objective(mnist_rows(), seed)
    study = make_study(variant, storage, seed)
    began = datetime.now()
    start = time.perf_counter()
    study.optimize(objective, timeout=budget_s)
    wall = time.perf_counter() - start
    records = [TrialRecord(t.number, t.state.name.lower(), t.value, seconds_since(began, t.datetime_start),
                           seconds_since(began, t.datetime_complete), len(t.intermediate_values))
               for t in study.trials if t.datetime_complete is not None]
    return SearchResult(f"reference {variant}" + (" sqlite" if storage else ""), budget_s, records, wall,
                        {"threads": torch.get_num_threads()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="tpe_hyperband")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of search")
    parser.add_argument("--storage", default=None, help="an Optuna storage URL, e.g. sqlite:////tmp/ref.db")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="write trials and summary as JSON here")
    args = parser.parse_args(argv)
    result = run(args.variant, args.budget, args.storage, args.threads)
    summary = result.summary()
    print(summary)
    write_json(args.out, {"summary": summary, "trials": result.trials})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
