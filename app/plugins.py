"""Model and dataset plugins: installed packages an administrator enables by name, never code from a request.

A package registers entry points in the groups `hpsearch.models` and `hpsearch.datasets`; a process enables
some of them with `HPSEARCH_PLUGINS` (`name` or `name==version`). Installed but not enabled is unknown.
Discovery reads package metadata only; a plugin is imported the first time it is used, and an import that
fails becomes a `PluginError` carrying the reason (for the client, or for the trials of a worker), never a
crash of the process.

A model plugin's entry point names an object (a module, a class, an instance) with:
- `hyperparameters`: a list of entries in the documented form ({"name", "type": "int" | "float" |
  "categorical", "low"/"high"/"log" or "choices", "domain" or "allowed", "condition", "note"});
- `build(params, dataset) -> torch.nn.Module`, where dataset is a `DatasetInfo`;
- optionally `train(params, data, device, report) -> torch.nn.Module`, its own training loop; one that also
  takes `resume` checkpoints (it hands its state to `report` and continues from `resume`: README, "Your own
  model"), one without it starts over when its trial is interrupted.
A dataset plugin's entry point names a function of no arguments returning a mapping with "x", "y", "task"
and, for classification, "classes" (optionally "feature_names").
"""

from __future__ import annotations

import enum
import inspect
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.ml import space

PREFIX = "plugin:"  # a study's dataset names a dataset plugin as plugin:<name>
NAME_PATTERN = r"[a-z][a-z0-9_\-]{0,63}"
_NAME = re.compile(rf"^{NAME_PATTERN}$")
# Hyperparameters of the service's own trainer, offered to every model plugin it trains.
TRAINING_PARAMS = ("optimizer", "momentum", "learning_rate", "weight_decay", "lr_schedule", "batch_size")


class StudyNames(Protocol):
    """What can_run reads of a study's spec (app.schemas.study.StudySpec has both)."""

    model: str
    dataset: str


class PluginKind(enum.StrEnum):
    MODEL = "model"
    DATASET = "dataset"

    @property
    def group(self) -> str:
        return f"hpsearch.{self.value}s"


class PluginError(Exception):
    """A plugin that is not enabled, not installed, or fails to import, declare, load or build."""


@dataclass(frozen=True)
class Requirement:
    """One entry of HPSEARCH_PLUGINS: a name, optionally pinned to a version."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Requirement:
        name, _, version = text.strip().partition("==")
        name, version = name.strip(), version.strip()
        if not _NAME.match(name) or ("==" in text and not version):
            raise PluginError(f"HPSEARCH_PLUGINS entry {text!r}: give `name` or `name==version`")
        return cls(name, version or None)


@dataclass(frozen=True)
class Installed:
    """An enabled plugin whose entry point is installed in the right version (not imported yet)."""

    kind: PluginKind
    name: str
    version: str
    distribution: str
    entry_point: metadata.EntryPoint = field(compare=False, repr=False)

    def ref(self) -> dict[str, str]:
        """What a saved model's config.json records about the plugin that built it."""
        return {"name": self.name, "version": self.version, "distribution": self.distribution}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model plugin's `build` learns about the data: one sample's shape and the outputs wanted."""

    input_shape: tuple[int, ...]
    n_outputs: int
    task: str
    classes: list[str] | None = None
    feature_groups: list[list[int]] | None = None


@dataclass(frozen=True)
class ModelPlugin:
    installed: Installed
    space: tuple[space.Hyperparameter, ...]
    build: Callable[[dict[str, Any], DatasetInfo], Any]
    train: Callable[..., Any] | None = None

    @property
    def name(self) -> str:
        return self.installed.name

    @property
    def resumable(self) -> bool:
        """Its own loop takes `resume` (and so hands its state to `report`): its trials checkpoint."""
        return self.train is not None and "resume" in inspect.signature(self.train).parameters


class _Declared(BaseModel):
    """One hyperparameter as a plugin declares it: the documented space's own form."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    type: str = Field(pattern=r"^(int|float|categorical)$")
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[bool | int | float | str] | None = Field(None, min_length=1, max_length=64)
    domain: list[float] | None = Field(None, min_length=2, max_length=2)
    allowed: list[bool | int | float | str] | None = Field(None, min_length=1, max_length=64)
    condition: str | None = Field(None, max_length=200)
    note: str = Field(min_length=1, max_length=300)
    source: str | None = Field(None, max_length=200)


def _hyperparameter(model: str, entry: Any) -> space.Hyperparameter:
    try:
        d = _Declared.model_validate(entry)
    except ValidationError as exc:
        raise PluginError(f"model plugin {model!r} declares a bad hyperparameter {entry!r}: {exc}") from None
    source = d.source or f"plugin {model}"
    if d.type == "categorical":
        if d.choices is None:
            raise PluginError(f"model plugin {model!r}: categorical {d.name!r} needs choices")
        allowed = tuple(d.allowed or d.choices)
        return space.Hyperparameter(d.name, "categorical", {"choices": list(d.choices)}, d.note, source,
                                    allowed=allowed, models=(model,), condition=d.condition)
    if d.low is None or d.high is None or not d.low <= d.high:
        raise PluginError(f"model plugin {model!r}: {d.name!r} needs low <= high")
    cast = int if d.type == "int" else float
    low, high = cast(d.low), cast(d.high)
    domain = (cast(d.domain[0]), cast(d.domain[1])) if d.domain else (low, high)
    if not domain[0] <= low <= high <= domain[1]:
        raise PluginError(f"model plugin {model!r}: {d.name!r} default range lies outside its domain")
    return space.Hyperparameter(d.name, d.type, {"low": low, "high": high, "log": d.log}, d.note, source,
                                domain=domain, models=(model,), condition=d.condition)


def plugin_space(model: str, declared: Sequence[Any], *, own_loop: bool) -> tuple[space.Hyperparameter, ...]:
    """The plugin's hyperparameters, then (unless it trains itself) the trainer's ones it does not declare."""
    own = [_hyperparameter(model, entry) for entry in declared]
    names = [hp.name for hp in own]
    if len(set(names)) != len(names):
        raise PluginError(f"model plugin {model!r} declares a hyperparameter twice: {names}")
    training = [] if own_loop else [replace(space.BY_NAME[n], models=(model,)) for n in TRAINING_PARAMS
                                    if n not in names]
    return (*own, *training)


def _load(installed: Installed) -> Any:
    try:
        return installed.entry_point.load()
    except Exception as exc:  # noqa: BLE001 - any import error is the plugin's, reported as its reason
        raise PluginError(f"{installed.kind} plugin {installed.name!r} failed to import: "
                          f"{type(exc).__name__}: {exc}") from exc


def _model_plugin(installed: Installed) -> ModelPlugin:
    obj = _load(installed)
    build, train = getattr(obj, "build", None), getattr(obj, "train", None)
    if not callable(build):
        raise PluginError(f"model plugin {installed.name!r} has no build(params, dataset)")
    declared = getattr(obj, "hyperparameters", None)
    if not isinstance(declared, list | tuple):
        raise PluginError(f"model plugin {installed.name!r} has no hyperparameters list")
    own_loop = callable(train)
    return ModelPlugin(installed, plugin_space(installed.name, declared, own_loop=own_loop), build,
                       train if own_loop else None)


def _dataset(installed: Installed) -> Any:
    from app.ml.data import Dataset, DatasetError

    loader = _load(installed)
    try:
        raw = loader()
        x, y = np.asarray(raw["x"], dtype=np.float32), np.asarray(raw["y"])
        task = str(raw.get("task", "classification"))
        if task == "classification":
            y = y.astype(np.int64)
        else:
            y = y.astype(np.float32)
        return Dataset(name=PREFIX + installed.name, x=x, y=y, task=task, classes=raw.get("classes"),
                       feature_names=raw.get("feature_names"))
    except (DatasetError, KeyError, TypeError, ValueError) as exc:
        raise PluginError(f"dataset plugin {installed.name!r} gave no valid dataset: "
                          f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the plugin's own failure, reported as its reason
        raise PluginError(f"dataset plugin {installed.name!r} failed to load: {type(exc).__name__}: {exc}") \
            from exc


class Plugins:
    """The plugins one process enables: discovered from metadata, imported on first use, cached."""

    def __init__(self, enabled: Sequence[str]) -> None:
        self.enabled = list(enabled)
        self.problems: dict[str, str] = {}  # enabled name -> why it is unavailable here
        self.requirements: dict[str, Requirement] = {}
        for text in enabled:
            try:
                req = Requirement.parse(text)
            except PluginError as exc:
                self.problems[text] = str(exc)
                continue
            self.requirements[req.name] = req
        self.installed: dict[PluginKind, dict[str, Installed]] = {kind: self._discover(kind)
                                                                  for kind in PluginKind}
        for name, req in self.requirements.items():
            if name not in self.problems and not any(name in found for found in self.installed.values()):
                self.problems[name] = f"plugin {name!r} is enabled but not installed" + \
                    (f" in version {req.version}" if req.version else "")
        self._models: dict[str, ModelPlugin | PluginError] = {}
        self._datasets: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _discover(self, kind: PluginKind) -> dict[str, Installed]:
        found: dict[str, Installed] = {}
        for ep in metadata.entry_points(group=kind.group):
            req = self.requirements.get(ep.name)
            dist = ep.dist
            version = dist.version if dist is not None else "0"
            if req is None or (req.version is not None and req.version != version):
                continue
            found[ep.name] = Installed(kind, ep.name, version, dist.name if dist is not None else ep.name, ep)
        return found

    def names(self, kind: PluginKind) -> list[str]:
        return sorted(self.installed[kind])

    def has(self, kind: PluginKind, name: str) -> bool:
        return name in self.installed[kind]

    def model(self, name: str) -> ModelPlugin:
        """The enabled model plugin, imported once; PluginError with the reason otherwise."""
        installed = self.installed[PluginKind.MODEL].get(name)
        if installed is None:
            raise PluginError(unknown_text(PluginKind.MODEL, name, self.names(PluginKind.MODEL)))
        with self._lock:
            if name not in self._models:
                try:
                    self._models[name] = _model_plugin(installed)
                except PluginError as exc:
                    self._models[name] = exc
            got = self._models[name]
        if isinstance(got, PluginError):
            raise got
        return got

    def dataset(self, name: str) -> Any:
        """The dataset an enabled dataset plugin generates (app.ml.data.Dataset), loaded once."""
        installed = self.installed[PluginKind.DATASET].get(name)
        if installed is None:
            raise PluginError(unknown_text(PluginKind.DATASET, name, self.names(PluginKind.DATASET)))
        with self._lock:
            if name not in self._datasets:
                self._datasets[name] = _dataset(installed)
            return self._datasets[name]

    def advertised(self) -> list[dict[str, Any]]:
        """What a worker registers: each enabled plugin it has, its version, and why it fails to import."""
        out: list[dict[str, Any]] = []
        for kind in PluginKind:
            for name, installed in sorted(self.installed[kind].items()):
                error = None
                if kind == PluginKind.MODEL:
                    try:
                        self.model(name)
                    except PluginError as exc:
                        error = str(exc)
                out.append({"name": name, "kind": kind.value, "version": installed.version, "error": error})
        return out

    def can_run(self, spec: StudyNames) -> bool:
        """Whether this process has the model and dataset plugins a study's spec names."""
        model, dataset = spec.model, spec.dataset
        if model not in space.MODELS and not self.has(PluginKind.MODEL, model):
            return False
        return not dataset.startswith(PREFIX) or self.has(PluginKind.DATASET, dataset.removeprefix(PREFIX))


ENABLE_HINT = "(a plugin is enabled by naming it in HPSEARCH_PLUGINS where the API and the workers run)"


def unknown_text(kind: PluginKind, name: str, enabled: list[str]) -> str:
    if kind == PluginKind.MODEL:
        models = [*space.MODELS, *enabled]
        return (f"unknown model {name!r}{space.did_you_mean(name, models)}: the enabled models are "
                f"{', '.join(models)} {ENABLE_HINT}")
    listed = ", ".join(PREFIX + n for n in enabled) if enabled else "none"
    return (f"unknown dataset {PREFIX}{name}{space.did_you_mean(name, enabled)}: the enabled dataset plugins "
            f"are {listed} {ENABLE_HINT}")


_current: Plugins | None = None
_current_lock = threading.Lock()


def configure(enabled: Sequence[str]) -> Plugins:
    """Set the plugins this process enables (the API at start, a worker before it forks runners)."""
    global _current
    with _current_lock:
        if _current is None or _current.enabled != list(enabled):
            _current = Plugins(enabled)
        return _current


def current() -> Plugins:
    """The configured plugins; before any configure(), those HPSEARCH_PLUGINS enables."""
    if _current is None:
        from app.core.config import get_settings

        return configure(get_settings().plugins)
    return _current


def table_for(model: str) -> tuple[space.Hyperparameter, ...] | None:
    """The hyperparameter table of an enabled model plugin (None for the built-in models, whose table is
    the documented space); SpaceError naming the model otherwise."""
    if model in space.MODELS:
        return None
    try:
        return current().model(model).space
    except PluginError as exc:
        raise space.SpaceError((), str(exc)) from None


def build_plugin_module(spec: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """Standardize (the training split's statistics) followed by the plugin's network: raw inputs in."""
    from torch import nn

    from app.ml.networks import Standardize

    plugin = current().model(spec.model)
    info = DatasetInfo(tuple(spec.input_shape), spec.n_outputs, spec.task, spec.classes, spec.feature_groups)
    try:
        net = plugin.build(dict(spec.params), info)
    except Exception as exc:  # noqa: BLE001 - the plugin's failure, reported as the trial's reason
        raise PluginError(f"model plugin {spec.model!r} failed to build: {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise PluginError(f"model plugin {spec.model!r} built a {type(net).__name__}, not a torch.nn.Module")
    return nn.Sequential(Standardize(mean, std, tuple(spec.input_shape)), net)
