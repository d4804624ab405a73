"""Model plugins on the worker side: which plugins a worker has, and a plugin's own training loop.

A worker enables plugins with HPSEARCH_PLUGINS, imports them once before it forks runners (so a runner
starts with them loaded), registers them, and claims only studies whose model and dataset it has. A plugin
with its own `train(params, data, device, report)` runs in the same forked runner as any trial: the runner
relays each `report(epoch, metrics)` to the supervisor, whose answer (pruned, cancelled, shutting down) is
what `report` returns.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

from app import plugins
from app.ml.artifacts import ModelSpec, describe_layers
from app.ml.space import MODELS

log = logging.getLogger("hpsearch.worker")


def worker_plugins(enabled: list[str]) -> plugins.Plugins:
    """Enable and import this worker's plugins; one that is missing or fails to import is logged, not fatal
    (its studies' trials then fail with the reason)."""
    found = plugins.configure(enabled)
    for name, problem in found.problems.items():
        log.warning("plugin %s unavailable: %s", name, problem)
    for entry in found.advertised():  # imports each model plugin once, here, before any fork
        if entry["error"]:
            log.warning("plugin %s: %s", entry["name"], entry["error"])
    return found


def stamped(spec: ModelSpec) -> ModelSpec:
    """The spec naming the plugin and version that build its model (what config.json records)."""
    if spec.model in MODELS or spec.plugin is not None:
        return spec
    return replace(spec, plugin=plugins.current().model(spec.model).installed.ref())


def layers(spec: ModelSpec, module: Any) -> list[dict[str, Any]]:
    """The plain-torch layer list of a built-in network; a plugin's network is described by its plugin."""
    return describe_layers(module) if spec.model in MODELS else []


def own_loop(spec: ModelSpec) -> plugins.ModelPlugin | None:
    """The model plugin when it brings its own training loop, else None (the service's trainer trains)."""
    if spec.model in MODELS:
        return None
    plugin = plugins.current().model(spec.model)
    return plugin if plugin.train is not None else None


class _Relay:
    """The `report` handed to a plugin's loop: checks its metrics, relays each epoch, says when to stop."""

    def __init__(self, reporter: Any, objective: str, patience: int | None, maximize: bool, epochs: int) -> None:
        from workers.training_rules import Progress

        self.reporter, self.objective, self.max_epochs = reporter, objective, epochs
        self.progress = Progress(maximize, epochs, patience)  # best epoch and patience, as the trainer's
        self.epochs = 0
        self.early = False
        self._last = time.perf_counter()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> bool:
        from workers.trainer import EpochReport

        if not isinstance(epoch, int) or epoch != self.epochs + 1:
            raise ValueError(f"report epochs 1, 2, ... in order; got {epoch!r} after {self.epochs}")
        values = {str(k): float(v) for k, v in dict(metrics).items()}
        if self.objective not in values or "val_loss" not in values:
            raise ValueError(f"report(epoch, metrics) needs val_loss and {self.objective}; got {sorted(values)}")
        now = time.perf_counter()
        val = {k: v for k, v in values.items() if k.startswith("val_")}
        report = EpochReport(epoch, values.get("train_loss", math.nan), values["val_loss"], val,
                             values.get("learning_rate", math.nan), now - self._last)
        self._last, self.epochs = now, epoch
        self.progress.record(epoch, values[self.objective], val)
        if self.reporter.on_epoch_end(report):
            return True
        self.early = self.early or self.progress.out_of_patience(epoch)
        return self.early or epoch >= self.max_epochs  # the study's budget.epochs bounds every loop


def run_own_loop(plugin: plugins.ModelPlugin, job: Any, data: Any, reporter: Any) -> tuple[Any, Any]:
    """Run the plugin's loop for the one trial of `job` (a `workers.runner.RunnerJob`) on standardized data;
    (the network as saved, a TrainResult of its weights). `reporter` is the trial's epoch callback.

    The returned network must be what `build` makes for the same parameters; the service puts the training
    split's standardization in front of it, so the saved model takes raw inputs like a built-in one.
    """
    import torch
    from torch import nn

    from app.ml.artifacts import _broadcast_stats
    from app.ml.networks import Standardize
    from workers.trainer import TrainData, TrainResult, cpu_state, evaluate

    mean, std = _broadcast_stats(job.spec)
    standardize = Standardize(mean, std, tuple(job.spec.input_shape)).to(data.x_train.device)
    with torch.no_grad():
        scaled = TrainData(standardize(data.x_train), data.y_train, standardize(data.x_val), data.y_val,
                           task=data.task, image=data.image)
    relay = _Relay(reporter, job.objective, job.patience, job.direction == "maximize", job.epochs)
    net = plugin.train(dict(job.spec.params), scaled, job.device, relay)
    if not isinstance(net, nn.Module):
        raise plugins.PluginError(f"model plugin {plugin.name!r}: train returned a {type(net).__name__}, "
                                  "not a torch.nn.Module")
    module = nn.Sequential(standardize, net.to(data.x_train.device))
    if relay.epochs == 0:
        raise plugins.PluginError(f"model plugin {plugin.name!r}: train reported no epoch")
    raw = evaluate(module, data.x_val, data.y_val, data.task)
    metrics = {f"val_{k}": v for k, v in raw.items()}
    reason = "early_stopping" if relay.early else "completed"
    if not math.isfinite(metrics["val_loss"]):
        reason = "non_finite_loss"
    return module, TrainResult(epochs_run=relay.epochs, best_epoch=relay.epochs, best_metrics=metrics,
                               best_state=cpu_state(module), stop_reason=reason)
