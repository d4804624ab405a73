"""LCBench offline: the service's ASHA-with-promotion decisions beside Syne Tune and Optuna, on a simulated clock.

The YAHPO Gym LCBench surrogate (34 OpenML tasks, epochs 1-52) is read with onnxruntime: each new configuration
is one batched call that returns its whole learning curve and the cumulative training time per epoch, which
is the clock. Four simulated workers train epoch by epoch; each method decides after every epoch (continue,
pause, stop) and whenever a worker is free (start a trial, or resume a paused one from its checkpoint). The
service's method is `workers.schedulers.Asha`, the code the workers run, not a copy. Results:
docs/benchmarks/schedulers.md; the environment: benchmarks/requirements-lcbench.txt (it needs numpy < 2 for
syne-tune 0.13, so never the service's venv).

    python -m benchmarks.lcbench --quick            # 2 tasks, 2 seeds, about 35 s of CPU
    python -m benchmarks.lcbench --seeds 10          # all 34 tasks: tuning (first 17 ids) and held-out (last 17)
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from workers.schedulers import Asha, AshaConfig, EpochDecision, Promote, TrialFacts

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HPSEARCH_LCBENCH_DIR", ROOT.parent / "shared" / "yahpo_data" / "lcbench"))
MAX_EPOCHS = 52
WORKERS = 4
FULL_TRAININGS = 100  # the budget: the time 4 workers need for this many full trainings of a median config
REGRET_TARGET = 0.01
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)  # anytime regret is reported at these fractions of the budget
# LCBench's seven hyperparameters (YAHPO's config_space.json): low, high, log, integer
SPACE: dict[str, tuple[float, float, bool, bool]] = {
    "batch_size": (16, 512, True, True), "learning_rate": (1e-4, 1e-1, True, False),
    "momentum": (0.1, 0.99, False, False), "weight_decay": (1e-5, 0.1, False, False),
    "num_layers": (1, 5, False, True), "max_units": (64, 1024, True, True), "max_dropout": (0.0, 1.0, False, False),
}
# the surrogate's continuous inputs, in its order (yahpo_gym/benchmarks/lcbench.py: cont_names), raw values
INPUTS = ("epoch", "batch_size", "learning_rate", "momentum", "weight_decay", "num_layers", "max_units",
          "max_dropout")
OUTPUTS = ("time", "val_accuracy", "val_cross_entropy", "val_balanced_accuracy", "test_cross_entropy",
           "test_balanced_accuracy")
# The service's ASHA settings, chosen on the tuning tasks only (docs/benchmarks/schedulers.md: with 10 seeds
# no setting reached 1% regret on most of them, and (2, 3) had the lowest mean regret); Syne Tune's ASHA keeps
# its defaults (grace period 1, reduction factor 3).
SERVICE_ASHA = {"min_epochs": 2, "reduction_factor": 3}


class Surrogate:
    """YAHPO's LCBench model: a configuration's whole curve (validation accuracy, cumulative seconds)."""

    def __init__(self, directory: Path = DATA) -> None:
        import onnxruntime as rt

        options = rt.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = rt.InferenceSession(str(directory / "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
        self.tasks = tuple(json.loads((directory / "config_space.json").read_text())["hyperparameters"][0]["choices"])
        self.encoding = json.loads((directory / "encoding.json").read_text())["OpenML_task_id"]
        self.cat, self.cont = (i.name for i in self.session.get_inputs())

    def curves(self, task: str, configs: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        """[n, 52] validation accuracy (percent) and [n, 52] per-epoch seconds, non-negative."""
        epochs = np.arange(1, MAX_EPOCHS + 1, dtype=np.float32)
        rows = np.array([[float(c[name]) for name in INPUTS[1:]] for c in configs], dtype=np.float32)
        cont = np.concatenate([np.repeat(rows, MAX_EPOCHS, axis=0),
                               np.tile(epochs, len(configs))[:, None]], axis=1)[:, [7, 0, 1, 2, 3, 4, 5, 6]]
        cat = np.full((len(cont), 1), self.encoding[task], dtype=np.int32)
        out = self.session.run(None, {self.cat: cat, self.cont: cont})[0].reshape(len(configs), MAX_EPOCHS, -1)
        accuracy = out[:, :, OUTPUTS.index("val_accuracy")].astype(np.float64)
        elapsed = np.maximum.accumulate(np.maximum(out[:, :, OUTPUTS.index("time")], 0.0), axis=1)
        return accuracy, np.maximum(np.diff(elapsed, axis=1, prepend=0.0), 1e-3).astype(np.float64)


def sample(rng: random.Random) -> dict[str, float]:
    config: dict[str, float] = {}
    for name, (low, high, log, integer) in SPACE.items():
        if log:
            value = math.exp(rng.uniform(math.log(low), math.log(high + 1 if integer else high)))
        else:
            value = rng.uniform(low, high + 1 if integer else high)
        config[name] = min(math.floor(value), high) if integer else value
    return config


def suggest_optuna(trial: Any) -> dict[str, float]:
    return {name: (trial.suggest_int if integer else trial.suggest_float)(name, low, high, log=log)
            for name, (low, high, log, integer) in SPACE.items()}


class Method(Protocol):
    """A scheduler under test: what a free worker runs, and whether a trial goes on after an epoch."""

    def next_job(self) -> tuple[int, dict[str, float]]: ...  # (trial key, its configuration)

    def report(self, key: int, epoch: int, value: float) -> bool: ...  # True: train the next epoch


@dataclass
class Run:
    """One method on one task and seed: every reported (time, accuracy) in time order."""

    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    trials: int = 0
    epochs: int = 0


def simulate(method: Method, surrogate: Surrogate, task: str, budget: float) -> Run:
    """Four workers on the simulated clock; a worker that is free asks the method for its next job."""
    run, done, curves, free = Run(), {}, {}, list(range(WORKERS))
    events: list[tuple[float, int, int, int, int]] = []  # (time, seq, worker, key, epoch)
    now, seq = 0.0, 0

    def start(worker: int) -> None:
        nonlocal seq
        key, config = method.next_job()
        if key not in curves:
            accuracy, seconds = surrogate.curves(task, [config])
            curves[key] = (accuracy[0], seconds[0])
            run.trials += 1
        epoch = done.get(key, 0) + 1  # a resumed trial continues from its checkpoint
        heapq.heappush(events, (now + curves[key][1][epoch - 1], seq, worker, key, epoch))
        seq += 1

    while True:
        for worker in free:
            start(worker)
        free = []
        now, _, worker, key, epoch = heapq.heappop(events)
        if now > budget:
            return run
        done[key] = epoch
        value = float(curves[key][0][epoch - 1])
        run.times.append(now)
        run.values.append(value)
        run.epochs += 1
        if epoch < MAX_EPOCHS and method.report(key, epoch, value):
            heapq.heappush(events, (now + curves[key][1][epoch], seq, worker, key, epoch + 1))
            seq += 1
        else:
            if epoch == MAX_EPOCHS:
                method.report(key, epoch, value)
            free = [worker]


class ServiceAsha:
    """The service's decisions (`workers.schedulers.Asha`) with a random or an Optuna TPE sampler.

    With TPE, the Optuna records follow the service's mapping: a trial that pauses at rung r is told PRUNED
    with its value at step r, which TPE learns from at once; a promotion continues in a fresh Optuna trial
    with the same parameters (as a retry does), which reports the epochs after r and is COMPLETE at R.
    """

    def __init__(self, seed: int, sampler: str = "random", **settings: int) -> None:
        self.asha = Asha(AshaConfig(name="asha", max_epochs=MAX_EPOCHS, **{**SERVICE_ASHA, **settings}),
                         maximize=True)
        self.rng = random.Random(seed)
        self.configs: list[dict[str, float]] = []
        self.rung_values: list[dict[int, float]] = []
        self.paused: dict[int, int] = {}
        self.trials: list[TrialFacts] = []
        self.study, self.optuna_trials = None, {}
        if sampler == "tpe":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

    def facts(self, key: int) -> None:
        """Rebuild the recorded facts of one trial after it changed (the service reads them from its rows)."""
        self.trials[key] = TrialFacts(key, dict(self.rung_values[key]), self.paused.get(key))

    def next_job(self) -> tuple[int, dict[str, float]]:
        job = self.asha.next_job(self.trials)
        if isinstance(job, Promote):
            del self.paused[job.trial]
            self.facts(job.trial)
            if self.study is not None:
                self.study.enqueue_trial(self.configs[job.trial], skip_if_exists=False)
                self.optuna_trials[job.trial] = trial = self.study.ask()
                suggest_optuna(trial)  # records the enqueued parameters on the new Optuna trial
            return job.trial, self.configs[job.trial]
        if self.study is not None:
            trial = self.study.ask()
            config = suggest_optuna(trial)
            self.optuna_trials[len(self.configs)] = trial
        else:
            config = sample(self.rng)
        self.configs.append(config)
        self.rung_values.append({})
        self.trials.append(TrialFacts(len(self.trials), {}))
        return len(self.configs) - 1, config

    def report(self, key: int, epoch: int, value: float) -> bool:
        import optuna

        if epoch in self.asha.rungs:
            self.rung_values[key][epoch] = value
        trial = self.optuna_trials.get(key)
        if trial is not None:
            trial.report(value, epoch)
        decision = self.asha.on_epoch(epoch)
        if decision is EpochDecision.PAUSE:
            self.paused[key] = epoch
            self.facts(key)
            if trial is not None:
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif decision is EpochDecision.FINISH and trial is not None:
            self.study.tell(trial, value)
        return decision is EpochDecision.CONTINUE


class SyneTune:
    """A Syne Tune scheduler driven through its own API (`suggest`, `on_trial_result`), as its Tuner does."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler, self.trials, self.next_id = scheduler, {}, 0

    def next_job(self) -> tuple[int, dict[str, float]]:
        from syne_tune.backend.trial_status import Trial

        suggestion = self.scheduler.suggest(trial_id=self.next_id)
        if suggestion.spawn_new_trial_id:
            trial = Trial(trial_id=self.next_id, config=suggestion.config, creation_time=datetime.now())
            self.scheduler.on_trial_add(trial=trial)
            self.trials[trial.trial_id] = trial
            self.next_id += 1
            return trial.trial_id, trial.config
        return suggestion.checkpoint_trial_id, self.trials[suggestion.checkpoint_trial_id].config

    def report(self, key: int, epoch: int, value: float) -> bool:
        from syne_tune.optimizer.scheduler import SchedulerDecision

        trial, result = self.trials[key], {"epoch": epoch, "val_accuracy": value}
        decision = self.scheduler.on_trial_result(trial=trial, result=result)
        if epoch == MAX_EPOCHS:
            self.scheduler.on_trial_complete(trial=trial, result=result)
            return False
        if decision == SchedulerDecision.CONTINUE:
            return True
        self.scheduler.on_trial_remove(trial=trial)
        return False


def syne_space() -> dict[str, Any]:
    from syne_tune.config_space import lograndint, loguniform, randint, uniform

    def domain(low: float, high: float, log: bool, integer: bool) -> Any:
        if integer:
            return (lograndint if log else randint)(int(low), int(high))
        return (loguniform if log else uniform)(low, high)

    return {name: domain(*bounds) for name, bounds in SPACE.items()} | {"epochs": MAX_EPOCHS}


def syne_tune(kind: str, seed: int) -> SyneTune:
    from syne_tune.optimizer.baselines import RandomSearch, SyncHyperband
    from syne_tune.optimizer.schedulers import HyperbandScheduler

    common = {"metric": "val_accuracy", "mode": "max", "random_seed": seed}
    if kind == "asha":
        return SyneTune(HyperbandScheduler(syne_space(), type="promotion", searcher="random", max_t=MAX_EPOCHS,
                                           resource_attr="epoch", grace_period=1, reduction_factor=3, **common))
    if kind == "hyperband":
        return SyneTune(SyncHyperband(syne_space(), max_resource_level=MAX_EPOCHS, resource_attr="epoch",
                                      grace_period=1, reduction_factor=3, **common))
    return SyneTune(RandomSearch(syne_space(), **common))


class OptunaHyperband:
    """A hand-written Optuna loop: TPE asks, HyperbandPruner stops; a stopped trial is gone for good."""

    def __init__(self, seed: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # a fixed name: HyperbandPruner assigns brackets by a hash of the study's name and the trial number
        self.study = optuna.create_study(
            study_name=f"lcbench-{seed}", direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=MAX_EPOCHS, reduction_factor=3))
        self.trials: dict[int, Any] = {}

    def next_job(self) -> tuple[int, dict[str, float]]:
        trial = self.study.ask()
        self.trials[trial.number] = trial
        return trial.number, suggest_optuna(trial)

    def report(self, key: int, epoch: int, value: float) -> bool:
        import optuna

        trial = self.trials[key]
        trial.report(value, epoch)
        if epoch == MAX_EPOCHS:
            self.study.tell(trial, value)
            return False
        if trial.should_prune():
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return False
        return True


METHODS: dict[str, Callable[[int], Method]] = {
    "service-asha": lambda seed: ServiceAsha(seed),
    "service-asha-tpe": lambda seed: ServiceAsha(seed, sampler="tpe"),
    "synetune-asha": lambda seed: syne_tune("asha", seed),
    "synetune-hyperband": lambda seed: syne_tune("hyperband", seed),
    "synetune-random": lambda seed: syne_tune("random", seed),
    "optuna-tpe-hyperband": lambda seed: OptunaHyperband(seed),
}


@dataclass(frozen=True)
class Reference:
    """A task's scale, fixed before any method runs: the best and worst accuracy (any epoch) of 2,000 random
    configurations, and the clock budget. Fixed, so that runs made apart can be compared and merged."""

    best: float
    worst: float
    budget: float


@functools.cache
def reference(surrogate: Surrogate, task: str, n: int = 2000) -> Reference:
    rng = random.Random(f"reference-{task}")
    accuracy, seconds = surrogate.curves(task, [sample(rng) for _ in range(n)])
    full = float(np.median(seconds.sum(axis=1)))
    return Reference(float(accuracy.max()), float(accuracy.min()), FULL_TRAININGS * full / WORKERS)


def summarize(run: Run, ref: Reference) -> dict[str, Any]:
    """Anytime normalized regret at FRACTIONS of the budget, and the first time (x budget) it is within 1%.

    A run that beats the reference sample's best has regret 0 from then on."""
    incumbent = np.maximum.accumulate(np.array(run.values)) if run.values else np.array([])
    regret = np.maximum((ref.best - incumbent) / (ref.best - ref.worst), 0.0)
    times = np.array(run.times)
    anytime = {}
    for fraction in FRACTIONS:
        k = int(np.searchsorted(times, fraction * ref.budget, side="right"))
        anytime[str(fraction)] = float(regret[k - 1]) if k else 1.0
    hit = np.flatnonzero(regret <= REGRET_TARGET)
    return {"regret": anytime, "time_to_1pct": float(times[hit[0]] / ref.budget) if hit.size else None,
            "trials": run.trials, "epochs": run.epochs}


def label(name: str) -> str:
    """A method's name in the results; the service's carries its ASHA settings (min_epochs, reduction_factor)."""
    if name.startswith("service-asha"):
        return f"{name}({SERVICE_ASHA['min_epochs']},{SERVICE_ASHA['reduction_factor']})"
    return name


def run_all(tasks: list[str], seeds: list[int], methods: list[str], surrogate: Surrogate,
            save: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Every method on every task and seed; `save` gets the results so far after each task."""
    out: dict[str, Any] = {}
    for task in tasks:
        ref = reference(surrogate, task)
        out[task] = {"budget_s": ref.budget, "best": ref.best, "worst": ref.worst, "methods": {}}
        seconds = {}
        for name in methods:
            started = time.process_time()
            runs = [summarize(simulate(METHODS[name](seed), surrogate, task, ref.budget), ref) for seed in seeds]
            seconds[name] = time.process_time() - started
            out[task]["methods"][label(name)] = {"cpu_s": seconds[name], "seeds": seeds, "runs": runs}
        print(f"task {task}: " + ", ".join(f"{label(n)} {seconds[n]:.1f}s" for n in methods), flush=True)
        save(out)
    return out


def table(results: dict[str, Any], tasks: list[str], methods: list[str]) -> str:
    """Per method: the median over tasks of the median over seeds of the time to 1% regret (x budget; a run
    that never gets there counts as beyond it), how many runs got there, and the mean normalized regret at
    each fraction of the budget. A method is summarized over the tasks it ran on."""
    lines = ["| method | tasks x seeds | median time to 1% regret (x budget) | runs reaching 1% | "
             + " | ".join(f"regret @{f:g}" for f in FRACTIONS) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in FRACTIONS) + " |"]
    for name in methods:
        ran = [t for t in tasks if name in results[t]["methods"]]
        if not ran:
            continue
        runs = [r for t in ran for r in results[t]["methods"][name]["runs"]]
        reached = sum(r["time_to_1pct"] is not None for r in runs)
        median = median_time(results, ran, name)
        anytime = [statistics.fmean(r["regret"][str(f)] for r in runs) for f in FRACTIONS]
        lines.append(f"| {name} | {len(ran)} x {len(runs) // len(ran)} | "
                     f"{'> 1' if median == math.inf else f'{median:.3f}'} | {reached}/{len(runs)} | "
                     + " | ".join(f"{v:.4f}" for v in anytime) + " |")
    return "\n".join(lines)


GRID = ((1, 3), (1, 2), (2, 3))  # (min_epochs, reduction_factor) tried by --choose


def choose(surrogate: Surrogate, tasks: list[str], seeds: list[int]) -> tuple[int, int]:
    """The service's ASHA settings for the tuning tasks only: the lowest median time to 1% regret, ties
    (for instance, no setting gets there on most tasks) broken by the lowest mean anytime regret."""
    scores = {}
    for min_epochs, eta in GRID:
        SERVICE_ASHA.update(min_epochs=min_epochs, reduction_factor=eta)
        results = run_all(tasks, seeds, ["service-asha"], surrogate)
        name = label("service-asha")
        scores[(min_epochs, eta)] = (median_time(results, tasks, name), mean_regret(results, tasks, name))
        print(f"min_epochs={min_epochs} reduction_factor={eta}: median time to 1% regret "
              f"{scores[(min_epochs, eta)][0]}, mean anytime regret {scores[(min_epochs, eta)][1]:.4f}")
    return min(scores, key=lambda k: (*scores[k], GRID.index(k)))


def mean_regret(results: dict[str, Any], tasks: list[str], name: str) -> float:
    """Mean normalized regret over tasks, seeds and the budget fractions of FRACTIONS."""
    return statistics.fmean(r["regret"][str(f)] for t in tasks for r in results[t]["methods"][name]["runs"]
                            for f in FRACTIONS)


def median_time(results: dict[str, Any], tasks: list[str], name: str) -> float:
    """Median over tasks of the median over seeds of the time to 1% regret (never: infinite)."""
    per_task = []
    for task in tasks:
        runs = results[task]["methods"][name]["runs"]
        per_task.append(statistics.median(r["time_to_1pct"] if r["time_to_1pct"] is not None else math.inf
                                          for r in runs))
    return statistics.median(per_task)


def merge(paths: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """Results of several runs (other methods, settings or seeds on the same fixed references) as one."""
    results: dict[str, Any] = {}
    for path in paths:
        for task, entry in json.loads(path.read_text())["results"].items():
            methods = results.setdefault(task, {**entry, "methods": {}})["methods"]
            for name, ran in entry["methods"].items():
                into = methods.setdefault(name, {"cpu_s": 0.0, "seeds": [], "runs": []})
                pairs = zip(ran["seeds"], ran["runs"], strict=True)
                fresh = [(seed, run) for seed, run in pairs if seed not in into["seeds"]]
                into["seeds"] += [seed for seed, _ in fresh]
                into["runs"] += [run for _, run in fresh]
                into["cpu_s"] += ran["cpu_s"]
    methods = list(dict.fromkeys(m for entry in results.values() for m in entry["methods"]))
    return results, methods


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 tasks, 2 seeds, the fast methods")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds from here (to split a long run)")
    parser.add_argument("--tasks", default="all", help="all, tuning (first 17 ids), held-out, or ids a,b,c")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--asha", default=None, help="the service's ASHA as MIN_EPOCHS,REDUCTION_FACTOR")
    parser.add_argument("--choose", action="store_true", help="pick --asha on the tuning tasks, then stop")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--report", type=Path, nargs="+", default=None, help="tables from earlier --out files")
    args = parser.parse_args(argv)

    if args.report:
        results, methods = merge(args.report)
        surrogate_tasks = json.loads((DATA / "config_space.json").read_text())["hyperparameters"][0]["choices"]
        seeds = None
    else:
        surrogate = Surrogate()
        surrogate_tasks = list(surrogate.tasks)
    tuning, held_out = list(surrogate_tasks[:17]), list(surrogate_tasks[17:])
    if not args.report:
        chosen = {"all": tuning + held_out, "tuning": tuning, "held-out": held_out}.get(args.tasks)
        tasks = chosen if chosen is not None else args.tasks.split(",")
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        methods = args.methods.split(",")
        if args.quick:
            tasks, seeds = [tuning[0], held_out[0]], [0, 1]
            methods = [m for m in methods if m != "service-asha-tpe"] if args.methods == parser.get_default(
                "methods") else methods
        if args.asha:
            min_epochs, eta = (int(v) for v in args.asha.split(","))
            SERVICE_ASHA.update(min_epochs=min_epochs, reduction_factor=eta)
        if args.choose:
            min_epochs, eta = choose(surrogate, [t for t in tasks if t in tuning], seeds)
            print(f"chosen: --asha {min_epochs},{eta}")
            return
        def save(results: dict[str, Any]) -> None:
            if args.out is not None:
                args.out.write_text(json.dumps({"tasks": tasks, "seeds": seeds, "service_asha": SERVICE_ASHA,
                                                "results": results}, indent=1))

        results = run_all(tasks, seeds, methods, surrogate, save)
        methods = [label(m) for m in methods]
    for title, group in (("tuning tasks", tuning), ("held-out tasks", held_out)):
        present = [t for t in group if t in results]
        if present:
            counts = sorted({len(results[t]["methods"][m]["runs"]) for t in present for m in methods
                             if m in results[t]["methods"]})
            print(f"\n{title} ({len(present)} tasks, seeds per method {counts}):\n"
                  + table(results, present, methods))


if __name__ == "__main__":
    main()
