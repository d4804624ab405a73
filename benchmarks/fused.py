"""Fused trials against one trial at a time: trials finished per minute and best validation accuracy.

On the CPU both arms search the same space (the documented MLP space for image data, batch size fixed unless
`--batch-size any`) with the same seed, for the same wall-clock budget, side by side in two processes of
`--threads` threads each, so they share whatever load the machine carries. This drives the training engines
directly, not the service: a real Optuna study (TPE with constant liar, Hyperband pruning fed by every
epoch's report) through ask/tell; one arm trains each trial alone with `workers.trainer.train`, the other asks
K trials at once and trains them as fused groups with `workers.fused.train_group`, split by
`workers.fused.plan_groups` (per batch size, bounded padding). A trial is finished when it completed, was
pruned or diverged before the budget ran out; a trial still running then is stopped and not counted.

On a CUDA device (`--device cuda`) it runs the MNIST MLP search (batch size 128, random search, seed 0, a
fixed number of trials) through the service three times: `hpsearch serve --workers 1` (one trial at a time),
`--workers N` (N runner processes sharing the GPU, `--per-device N`'s way) and `--workers 1 --fuse auto`,
with trials per hour, best validation accuracy, trials per runner and GPU utilization for each
(`benchmarks.gpu`). Without a device it says so and exits 0; `--service` runs the same three on the CPU
with `--fuse K` (auto picks 1 there), which checks the benchmark itself.

    python -m benchmarks.fused --dataset digits --budget 90 --k 8
    python -m benchmarks.fused --dataset digits --budget 90 --sampler random   # the same trials in both arms
    python -m benchmarks.fused --step    # CPU time of one fused step of 8 members against 8 solo steps
    python -m benchmarks.fused --ceiling --dataset digits   # the most fusion can gain over this space
    python -m benchmarks.fused --ops --k 64   # operators (GPU kernel launches) of a fused step against solo steps
    python -m benchmarks.fused --device cuda --per-device 8 --trials 96
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

SEED = 0
EPOCHS = 8
PATIENCE = 3
VALIDATION_SPLIT = 0.2
BATCH_SIZE = 128


@dataclass
class Arm:
    mode: str  # "solo" | "fused"
    dataset: str
    budget_s: float
    k: int
    epochs: int
    device: str
    threads: int
    batch_size: int | None  # None: sampled from the documented choices
    max_waste: float = 0.5
    sampler: str = "tpe"  # "random": both arms train the same configurations, trial by trial


def load_rows(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/validation rows: digits from the service's split, MNIST-10k as the other benchmarks use it."""
    if dataset == "mnist":
        from benchmarks.common import mnist_rows

        r = mnist_rows(SEED)
        return r.x_train, r.y_train, r.x_val, r.y_val
    from app.ml import data

    s = data.split_dataset(data.load_builtin("builtin:digits"), validation_split=VALIDATION_SPLIT, seed=SEED)
    return s.x_train, s.y_train, s.x_val, s.y_val


class _Search:
    """One arm's study, data and bookkeeping: what each finished trial scored and when."""

    def __init__(self, arm: Arm) -> None:
        import optuna
        import torch

        from app.ml.space import Context, resolve_space
        from workers.runner import standardization
        from workers.trainer import TrainData

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        torch.set_num_threads(arm.threads)
        self.arm = arm
        x_tr, y_tr, x_va, y_va = load_rows(arm.dataset)
        self.mean, self.std = standardization(x_tr, True)
        self.shape = tuple(int(d) for d in x_tr.shape[1:])
        self.n_classes = int(max(y_tr.max(), y_va.max())) + 1
        dev = torch.device(arm.device)
        self.data = TrainData(torch.as_tensor(x_tr, dtype=torch.float32, device=dev),
                              torch.as_tensor(y_tr, dtype=torch.long, device=dev),
                              torch.as_tensor(x_va, dtype=torch.float32, device=dev),
                              torch.as_tensor(y_va, dtype=torch.long, device=dev), "classification", image=True)
        entries = {} if arm.batch_size is None else {"batch_size": arm.batch_size}
        self.space = resolve_space(entries, Context("mlp", image=True))
        self.study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.RandomSampler(seed=SEED) if arm.sampler == "random"
            else optuna.samplers.TPESampler(seed=SEED, constant_liar=True),
            pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=arm.epochs, reduction_factor=3))
        self.records: list[dict[str, Any]] = []
        _warm_up()
        self.start = time.perf_counter()
        self.deadline = self.start + arm.budget_s
        self.pruned: set[int] = set()
        self.group_sizes: list[int] = []
        self.occupancy: list[float] = []  # per group: member-epochs / (members x the group's epochs)

    def spec(self, params: dict[str, Any]) -> Any:
        from app.ml.artifacts import ModelSpec

        return ModelSpec("mlp", params, "classification", self.shape, self.n_classes, None, None,
                         self.mean.tolist(), self.std.tolist())

    def over(self) -> bool:
        return time.perf_counter() >= self.deadline

    def report(self, trial: Any, epoch: int, value: float) -> bool:
        """Hand an epoch to the pruner; True (stop) when it prunes the trial."""
        trial.report(value, epoch)
        if trial.should_prune():
            self.pruned.add(trial.number)
            return True
        return False

    def finish(self, trial: Any, result: Any) -> None:
        import optuna

        now = time.perf_counter()
        state: str
        if trial.number in self.pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            state = "pruned"
        elif result.stop_reason == "non_finite_loss" or not result.best_metrics:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            state = "failed"
        elif result.stop_reason == "stopped":  # the budget ran out mid-trial
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        else:
            self.study.tell(trial, result.best_metrics["val_accuracy"])
            state = "complete"
        if now <= self.deadline:
            value = result.best_metrics.get("val_accuracy") if state == "complete" else None
            self.records.append({"number": trial.number, "state": state, "value": value,
                                 "finished_s": round(now - self.start, 2), "epochs": result.epochs_run})

    def summary(self) -> dict[str, Any]:
        done = self.records
        values = [r["value"] for r in done if r["value"] is not None]
        minutes = self.arm.budget_s / 60
        return {"mode": self.arm.mode, "dataset": self.arm.dataset, "k": self.arm.k if self.arm.mode == "fused" else 1,
                "budget_s": self.arm.budget_s, "finished": len(done),
                "complete": sum(r["state"] == "complete" for r in done),
                "pruned": sum(r["state"] == "pruned" for r in done),
                "failed": sum(r["state"] == "failed" for r in done),
                "trials_per_min": round(len(done) / minutes, 2), "best_val_accuracy": max(values) if values else None,
                "epochs_trained": sum(r["epochs"] for r in done), "device": self.arm.device,
                "threads": self.arm.threads,
                "mean_group_size": round(float(np.mean(self.group_sizes)), 2) if self.group_sizes else None,
                "mean_occupancy": round(float(np.mean(self.occupancy)), 2) if self.occupancy else None}


def _warm_up() -> None:
    """Import what either arm trains with before the clock starts: torch's first optimizer imports
    torch._dynamo (seconds on this CPU), which would otherwise be charged to whichever arm builds one first."""
    import torch

    import workers.fused  # noqa: F401
    from workers.trainer import make_optimizer, make_scheduler

    module = torch.nn.Linear(2, 2)
    make_scheduler({"lr_schedule": "plateau"}, make_optimizer({"optimizer": "adam"}, module), epochs=1)


def run_solo(search: _Search) -> None:
    import torch

    from app.ml.artifacts import build_module
    from app.ml.space import sample_params
    from workers.trainer import train

    while not search.over():
        trial = search.study.ask()
        params = sample_params(trial, search.space)
        torch.manual_seed(trial.number)
        module = build_module(search.spec(params))

        class Reporter:
            def on_epoch_end(self, report: Any, trial: Any = trial) -> bool:
                return search.report(trial, report.epoch, report.metrics["val_accuracy"])

        result = train(module, search.data, params, epochs=search.arm.epochs, objective="val_accuracy",
                       direction="maximize", patience=PATIENCE, seed=trial.number, callbacks=[Reporter()],
                       stop_signal=search.over)
        search.finish(trial, result)


def run_fused(search: _Search) -> None:
    from app.ml.space import sample_params
    from workers.fused import Member, plan_groups, train_group

    while not search.over():
        trials: dict[int, Any] = {}
        members: list[Member] = []
        for _ in range(search.arm.k):
            trial = search.study.ask()
            trials[trial.number] = trial
            members.append(Member(trial.number, search.spec(sample_params(trial, search.space)), trial.number))
        for group in plan_groups([m.spec for m in members], max_members=search.arm.k,
                                 max_waste=search.arm.max_waste):
            chosen = [members[i] for i in group]
            keys = [m.key for m in chosen]
            train_group(chosen, search.data, epochs=search.arm.epochs, objective="val_accuracy",
                        direction="maximize", patience=PATIENCE, callbacks=[_GroupReporter(search, trials)],
                        stop_signal=lambda keys=keys: keys if search.over() else ())
            search.group_sizes.append(len(group))
            epochs = [r["epochs"] for r in search.records if r["number"] in keys]
            if len(epochs) == len(keys) and max(epochs) > 0:  # a group that ended within the budget
                search.occupancy.append(sum(epochs) / (len(keys) * max(epochs)))


class _GroupReporter:
    """Each member's epochs to its own Optuna trial; a member that ends is told at once."""

    def __init__(self, search: _Search, trials: dict[int, Any]) -> None:
        self.search, self.trials = search, trials

    def on_epoch_end(self, key: Hashable, report: Any) -> bool:
        return self.search.report(self.trials[key], report.epoch, report.metrics["val_accuracy"])  # type: ignore[index]

    def on_member_end(self, key: Hashable, result: Any) -> None:
        self.search.finish(self.trials[key], result)  # type: ignore[index]


def run_arm(arm: Arm) -> dict[str, Any]:
    search = _Search(arm)
    (run_fused if arm.mode == "fused" else run_solo)(search)
    return search.summary()


def _child(arm: Arm, queue: Any) -> None:
    queue.put(run_arm(arm))


def compare(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    arms = [Arm(mode, dataset, args.budget, args.k, args.epochs, args.device, args.threads,
                None if args.batch_size == "any" else int(args.batch_size), args.max_waste, args.sampler)
            for mode in ("solo", "fused")]
    ctx = mp.get_context("spawn")  # side by side: both arms see the same machine load
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(arm, queue)) for arm in arms]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    by_mode = {r["mode"]: r for r in results}
    solo, fused = by_mode["solo"], by_mode["fused"]
    speedup = fused["trials_per_min"] / solo["trials_per_min"] if solo["trials_per_min"] else math.inf
    return {"dataset": dataset, "solo": solo, "fused": fused, "speedup_trials_per_min": round(speedup, 2),
            "best_delta": None if solo["best_val_accuracy"] is None or fused["best_val_accuracy"] is None
            else round(fused["best_val_accuracy"] - solo["best_val_accuracy"], 4),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _sampled_specs(k: int, units: int, shape: tuple[int, ...], seed: int = 1, n_layers: int | None = 2) -> list[Any]:
    """k configurations of the documented MLP space, all `units` wide and `n_layers` deep (None: as sampled), in
    fusion order."""
    import optuna

    from app.ml.artifacts import ModelSpec
    from app.ml.space import Context, resolve_space, sample_params
    from workers.fused import fusion_order

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = resolve_space({"batch_size": BATCH_SIZE}, Context("mlp", image=True))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    depth = {} if n_layers is None else {"n_layers": n_layers}
    specs = [ModelSpec("mlp", {**sample_params(study.ask(), space), "units": units, **depth},
                       "classification", shape, 10, None, None, [0.0], [1.0]) for _ in range(k)]
    return [specs[i] for i in fusion_order(specs)]


def _fused_step(specs: list[Any], rows: int, device: str = "cpu") -> Any:
    """One training step of the fused group of `specs` over `rows` rows each, as a callable."""
    import torch

    from workers.fused import FusedMLP, FusedOptimizer
    from workers.fused.train import member_losses

    k = len(specs)
    x = torch.randn(k, rows, *specs[0].input_shape, device=device)
    y = torch.randint(0, 10, (k, rows), device=device)
    model = FusedMLP(specs, list(range(k))).to(device)
    opt = FusedOptimizer(model.parameters(), [s.params for s in specs])

    def step() -> None:
        loss = member_losses(model(x), y, "classification").sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _solo_steps(specs: list[Any], x: Any, y: Any) -> Any:
    """One training step of each member's own network and optimizer, one after the other, as a callable."""
    import torch

    from app.ml.artifacts import build_module
    from workers.trainer import make_optimizer

    solos = [(m, make_optimizer(s.params, m)) for s in specs for m in [build_module(s)]]

    def steps() -> None:
        for i, (m, o) in enumerate(solos):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
            o.step()

    return steps


def _milliseconds(fn: Any, repeats: int, device: str = "cpu") -> float:
    """Mean time of fn(): process time on the CPU (the machine's other load matters less), wall time on CUDA."""
    import torch

    fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    sync()
    started = clock()
    for _ in range(repeats):
        fn()
    sync()
    return round((clock() - started) / repeats * 1e3, 3)


def step_times(k: int, units: int = 48, repeats: int = 60) -> dict[str, float]:
    """CPU milliseconds of one fused training step of k sampled members (all `units` wide, 2 layers) on
    digits-sized input at batch 128, against k solo steps of the same networks; process time, one thread."""
    import torch

    torch.set_num_threads(1)
    specs = _sampled_specs(k, units, (1, 8, 8))
    x, y = torch.randn(k, BATCH_SIZE, 1, 8, 8), torch.randint(0, 10, (k, BATCH_SIZE))
    return {"fused_step_ms": _milliseconds(_fused_step(specs, BATCH_SIZE), repeats),
            "solo_steps_ms": _milliseconds(_solo_steps(specs, x, y), repeats)}


def op_counts(k: int, units: int = 48) -> dict[str, Any]:
    """Operators other than views dispatched (forward, backward, optimizer) by one fused step of k members
    against k solo steps, for k sampled members (2 layers of `units`; then as many layers as sampled) and for k
    copies of one. On a GPU each is about one kernel launch, what a small network's step costs there, so the
    ratio predicts fusion's gain where launches, not arithmetic, bound the step. A count, not a timing: the same
    on any machine."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.count += not func.is_view  # a view launches nothing
            return func(*args, **(kwargs or {}))

    def counted(fn: Any) -> int:
        fn()  # optimizer state is created on the first step
        with Counter() as counter:
            fn()
        return counter.count

    out: dict[str, Any] = {"k": k, "units": units}
    sampled = _sampled_specs(k, units, (1, 8, 8))
    groups = (("sampled", sampled), ("sampled_depths", _sampled_specs(k, units, (1, 8, 8), n_layers=None)),
              ("alike", [sampled[0]] * k))
    for name, specs in groups:
        x, y = torch.randn(k, BATCH_SIZE, 1, 8, 8), torch.randint(0, 10, (k, BATCH_SIZE))
        fused, solo = counted(_fused_step(specs, BATCH_SIZE)), counted(_solo_steps(specs, x, y))
        out[name] = {"fused_step_ops": fused, "solo_steps_ops": solo, "ratio": round(solo / fused, 1)}
    return out


def batch_mix(k: int, device: str, units: int = 128, small: int = 64, large: int = BATCH_SIZE,
              rows: int = 8000, repeats: int = 30) -> dict[str, Any]:
    """Two ways to fuse k members, half of them at batch `small` and half at `large`, over `rows` training rows
    of MNIST-sized input: one group in which every member computes `large` rows a step (a smaller batch's
    extra rows masked out of its loss) for the smaller batch's rows/small steps an epoch, against one group
    per batch size. Milliseconds of one epoch of each."""
    import torch

    if device == "cpu":
        torch.set_num_threads(1)
    specs = _sampled_specs(k, units, (1, 28, 28))
    half = k // 2
    shared = _milliseconds(_fused_step(specs, large, device), repeats, device)
    by_small = _milliseconds(_fused_step(specs[:half], small, device), repeats, device)
    by_large = _milliseconds(_fused_step(specs[half:], large, device), repeats, device)
    steps_small, steps_large = math.ceil(rows / small), math.ceil(rows / large)
    one_group = steps_small * shared
    two_groups = steps_small * by_small + steps_large * by_large
    return {"device": device, "k": k, "units": units, "batch_sizes": [small, large],
            "step_ms": {"one_group_padded": shared, f"group_of_{small}": by_small, f"group_of_{large}": by_large},
            "epoch_ms": {"one_group_padded": round(one_group, 1), "group_per_batch_size": round(two_groups, 1)},
            "faster": "group per batch size" if two_groups <= one_group else "one padded group"}


def ceiling(dataset: str, k: int, configs: int, epochs: int = 1) -> dict[str, Any]:
    """The most fusion can gain over this search space on this device: sampled configurations, each trained
    solo and as a group of k copies of itself (distinct seeds: no padding, every member to the end), process
    time per member-epoch. The mix's ratio (solo time over fused time, summed over the configurations) bounds
    the trial-rate gain of any grouping of these trials; padding and members ending early only lower it."""
    import optuna
    import torch

    from app.ml.artifacts import build_module
    from app.ml.space import sample_params
    from workers.fused import Member, train_group
    from workers.trainer import train

    search = _Search(Arm("ceiling", dataset, 0.0, k, epochs, "cpu", 1, BATCH_SIZE, sampler="random"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=SEED))
    rows = []
    for number in range(configs):
        params = sample_params(study.ask(), search.space)
        spec = search.spec(params)
        started = time.process_time()
        torch.manual_seed(number)
        train(build_module(spec), search.data, params, epochs=epochs, objective="val_accuracy",
              direction="maximize", patience=None, seed=number)
        solo = (time.process_time() - started) / epochs
        started = time.process_time()
        train_group([Member(i, spec, number * k + i) for i in range(k)], search.data, epochs=epochs,
                    objective="val_accuracy", direction="maximize", patience=None)
        fused = (time.process_time() - started) / epochs / k
        rows.append({"units": params["units"], "n_layers": params["n_layers"], "solo_ms": round(solo * 1e3, 1),
                     "fused_ms_per_member": round(fused * 1e3, 1), "ratio": round(solo / fused, 2)})
    total = sum(r["solo_ms"] for r in rows) / sum(r["fused_ms_per_member"] for r in rows)
    return {"dataset": dataset, "k": k, "configurations": rows, "ceiling": round(total, 2),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


FUSED_VS_SEQUENTIAL = 15.0  # targets of the CUDA comparison
FUSED_VS_SHARED = 3.0


def service_comparison(device: str, per_device: int, n_trials: int, epochs: int, k: int) -> dict[str, Any]:
    """The MNIST MLP search through the service: one trial at a time, `per_device` runners sharing the device,
    one fusing runner (`--fuse auto` on CUDA, `--fuse k` on the CPU, where auto picks 1)."""
    from benchmarks.gpu import run_one

    cpu = not device.startswith("cuda")
    gpu = int(device.split(":")[1]) if ":" in device else 0
    fuse = str(k) if cpu else "auto"
    arms = {"one at a time": run_one(1, n_trials, epochs, gpu, cpu, batch_size=BATCH_SIZE),
            f"{per_device} per device": run_one(per_device, n_trials, epochs, gpu, cpu, batch_size=BATCH_SIZE),
            f"fused ({fuse})": run_one(1, n_trials, epochs, gpu, cpu, fuse=fuse, batch_size=BATCH_SIZE)}
    rates = [a["trials_per_hour"] for a in arms.values()]
    return {"device": device, "arms": arms,
            "fused_vs_one_at_a_time": round(rates[2] / rates[0], 2) if rates[0] else None,
            "fused_vs_per_device": round(rates[2] / rates[1], 2) if rates[1] else None,
            "targets": {"fused_vs_one_at_a_time": FUSED_VS_SEQUENTIAL, "fused_vs_per_device": FUSED_VS_SHARED}}


def print_service_table(result: dict[str, Any]) -> None:
    from benchmarks.gpu import print_runs

    print_runs(result["arms"])
    print(f"fused: {result['fused_vs_one_at_a_time']}x one at a time (target {FUSED_VS_SEQUENTIAL}), "
          f"{result['fused_vs_per_device']}x per device (target {FUSED_VS_SHARED}) on {result['device']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "mnist", "both"), default="both")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds per arm")
    parser.add_argument("--k", type=int, default=8, help="trials per fused group")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--batch-size", default=str(BATCH_SIZE), help="a fixed batch size, or 'any'")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-waste", type=float, default=None,
                        help="padding a group may add, as a fraction of its members' own compute "
                             "(default: the worker's for the device)")
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe",
                        help="random: the arms train the same configurations in the same order, so the "
                             "trial rates compare the engines, not what each arm's TPE settled on")
    parser.add_argument("--per-device", type=int, default=8,
                        help="runners sharing the device in the through-the-service comparison")
    parser.add_argument("--trials", type=int, default=96, help="trials of each through-the-service run")
    parser.add_argument("--service", action="store_true",
                        help="run the CUDA comparison (three runs through the service) on the CPU, with --fuse K")
    parser.add_argument("--ops", action="store_true",
                        help="only count the operators (GPU kernel launches) of one fused step of K members "
                             "against K solo steps")
    parser.add_argument("--batch-mix", action="store_true",
                        help="only compare, for K members of two batch sizes, one padded group against one "
                             "group per batch size (time of an epoch, on --device)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--step", action="store_true",
                        help="only time one fused step of K members against K solo steps (CPU time)")
    parser.add_argument("--ceiling", type=int, nargs="?", const=24, default=None, metavar="CONFIGS",
                        help="only measure the most fusion can gain: CONFIGS sampled configurations (24), "
                             "each solo and as K copies of itself, one thread")
    args = parser.parse_args(argv)
    if args.max_waste is None:
        from workers.fused import max_waste

        args.max_waste = max_waste(args.device)
    from benchmarks.gpu import cuda_skip_reason

    cuda_missing = cuda_skip_reason() if args.device.startswith("cuda") else None
    if args.step:
        print(json.dumps(step_times(args.k)))
        return 0
    if args.ops:
        print(json.dumps(op_counts(args.k)))
        return 0
    if args.batch_mix:
        if cuda_missing:
            print(f"skipped: {cuda_missing}")
            return 0
        print(json.dumps(batch_mix(args.k, args.device), indent=1))
        return 0
    if args.ceiling:
        for d in ["digits", "mnist"] if args.dataset == "both" else [args.dataset]:
            print(json.dumps(ceiling(d, args.k, args.ceiling), indent=1))
        return 0
    if args.device.startswith("cuda") or args.service:
        from benchmarks.common import write_json

        if cuda_missing:
            print(f"skipped: {cuda_missing}; the fused benchmark on CUDA needs a GPU")
            write_json(args.out, {"skipped": cuda_missing})
            return 0
        result = service_comparison(args.device, args.per_device, args.trials, args.epochs, args.k)
        print_service_table(result)
        write_json(args.out, result)
        return 0
    datasets = ["digits", "mnist"] if args.dataset == "both" else [args.dataset]
    out = [compare(d, args) for d in datasets]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
