"""Model plugins on the worker side: which plugins a worker has, and a plugin's own training loop.

A worker enables plugins with HPSEARCH_PLUGINS, imports them once before it forks runners (so a runner
starts with them loaded), registers them, and claims only studies whose model and dataset it has. A plugin
with its own `train(params, data, device, report)` runs in the same forked runner as any trial: the runner
relays each `report(epoch, metrics)` to the supervisor, whose answer (pruned, cancelled, shutting down,
paused) is what `report` returns.

A loop that also takes `resume` checkpoints like the service's own: it hands `report` its state at every
epoch (`report(epoch, metrics, state={...})`), the service writes it every `checkpoint_every` epochs with the
random generators and the loop's best-so-far, and a trial interrupted later calls `train` again with
`resume` (a `Resume`: the epoch and that state) to continue from there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
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


def checkpoints(spec: ModelSpec) -> bool:
    """Whether a trial of `spec` writes checkpoints: the service's loop does, a plugin's own only if resumable."""
    plugin = own_loop(spec)
    return plugin is None or plugin.resumable


def identity(spec: ModelSpec) -> dict[str, str]:
    """What wrote a trial's checkpoint, to be the same to continue from it: the model plugin and its version."""
    if spec.model in MODELS:
        return {}
    ref = plugins.current().model(spec.model).installed.ref()
    return {"plugin": f"{ref['name']}=={ref['version']}"}


@dataclass(frozen=True)
class Resume:
    """What a resumable plugin loop continues from: the `state` it handed to `report` after `epoch`."""

    epoch: int
    state: dict[str, Any]  # tensors on the CPU (load_state_dict moves them), plain values as given
    _rng: Any = field(repr=False, default=None)

    def restore_random_state(self) -> None:
        """Set torch's, numpy's and Python's global random generators as they were after `epoch`: call it
        once the network and optimizer are built and loaded, so the rest draws what the uninterrupted run
        would have drawn."""
        from workers.loop_state import restore_rng

        restore_rng(self._rng, None)


class _Relay:
    """The `report` handed to a plugin's loop: checks its metrics, relays each epoch, says when to stop, and
    hands a resumable loop's state to the trial's checkpoint hook."""

    def __init__(self, reporter: Any, job: Any, checkpoint: Any = None, resume_from: Any = None) -> None:
        from workers.training_rules import Progress

        self.reporter, self.objective, self.max_epochs = reporter, job.objective, job.epochs
        # best epoch and patience, as the trainer's
        self.progress = Progress(job.direction == "maximize", job.epochs, job.patience)
        self.params, self.checkpoint = dict(job.spec.params), checkpoint
        self.epochs = 0
        self.history: list[Any] = []
        if resume_from is not None:
            self.epochs, self.history = resume_from.epoch, list(resume_from.history)
            self.progress.best_epoch, self.progress.best_value = resume_from.best_epoch, resume_from.best_value
            self.progress.best_metrics = dict(resume_from.best_metrics)
        self.early = False
        self.stopped = False  # the supervisor said stop, or the trial pauses here: not an end of training
        self._last = time.perf_counter()

    def __call__(self, epoch: int, metrics: dict[str, float], state: dict[str, Any] | None = None) -> bool:
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
        self.history.append(report)
        self.progress.record(epoch, values[self.objective], val)
        if self.checkpoint is not None and state is not None:
            self.checkpoint.on_epoch_state(report, partial(self._capture, epoch, state))
        if self.reporter.on_epoch_end(report):
            self.stopped = True
            return True
        self.early = self.early or self.progress.out_of_patience(epoch)
        return self.early or epoch >= self.max_epochs  # the study's budget.epochs bounds every loop

    def _capture(self, epoch: int, state: dict[str, Any]) -> Any:
        from workers.loop_state import LoopState, capture_rng, cpu_copy

        p = self.progress
        return LoopState(epoch=epoch, params=dict(self.params), model={}, optimizer={}, scheduler=None,
                         best_epoch=p.best_epoch, best_value=p.best_value, best_metrics=dict(p.best_metrics),
                         best_model={}, rng=capture_rng(None), history=list(self.history), own=cpu_copy(state))


def run_own_loop(plugin: plugins.ModelPlugin, job: Any, data: Any, reporter: Any, *, checkpoint: Any = None,
                 resume_from: Any = None) -> tuple[Any, Any]:
    """Run the plugin's loop for the one trial of `job` (a `workers.runner.RunnerJob`) on standardized data;
    (the network as saved, a TrainResult of its weights). `reporter` is the trial's epoch callback. A
    resumable loop (`plugin.resumable`) writes through `checkpoint` (a `workers.trainer.CheckpointHook`) and
    continues from `resume_from` (a `workers.loop_state.LoopState` it wrote), or from scratch when None.

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
    relay = _Relay(reporter, job, checkpoint, resume_from)
    if plugin.resumable:
        resume = None if resume_from is None else Resume(resume_from.epoch, resume_from.own or {}, resume_from.rng)
        net = plugin.train(dict(job.spec.params), scaled, job.device, relay, resume=resume)
    else:
        net = plugin.train(dict(job.spec.params), scaled, job.device, relay)
    if not isinstance(net, nn.Module):
        raise plugins.PluginError(f"model plugin {plugin.name!r}: train returned a {type(net).__name__}, "
                                  "not a torch.nn.Module")
    module = nn.Sequential(standardize, net.to(data.x_train.device))
    if relay.epochs == 0:
        raise plugins.PluginError(f"model plugin {plugin.name!r}: train reported no epoch")
    raw = evaluate(module, data.x_val, data.y_val, data.task)
    metrics = {f"val_{k}": v for k, v in raw.items()}
    reason = "stopped" if relay.stopped else "early_stopping" if relay.early else "completed"
    if not math.isfinite(metrics["val_loss"]):
        reason = "non_finite_loss"
    return module, TrainResult(epochs_run=relay.epochs, best_epoch=relay.epochs, best_metrics=metrics,
                               best_state=cpu_state(module), stop_reason=reason)
