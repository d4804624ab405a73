"""A LoopState as flat named tensors plus a JSON document, so that no byte of a checkpoint is pickle.

Nested values (an optimizer's state_dict: int keys, tuples, scalar tensors) keep their exact structure in
the JSON: a tensor becomes {"__tensor__": name} pointing into the tensors, a tuple {"__tuple__": [...]},
a dict whose keys are not all strings {"__dict__": [[key, value], ...]}, and a non-finite float
{"__float__": "inf"}, so the document stays strict JSON that any reader parses.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from workers.loop_state import LoopState, RngState
from workers.trainer import EpochReport

FORMAT_VERSION = 1
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


class EncodingError(ValueError):
    """A value with no faithful JSON/tensor form, or a document that does not decode."""


def flatten(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """`value` as JSON-able data; its tensors go into `tensors` under names that start with `name`."""
    if isinstance(value, Tensor):
        if name in tensors:
            raise EncodingError(f"two tensors would be stored as {name!r}")
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [flatten(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(t in value for t in _TAGS):
            return {k: flatten(v, f"{name}/{k}", tensors) for k, v in value.items()}
        return {"__dict__": [[flatten(k, f"{name}/key{i}", tensors), flatten(v, f"{name}/{k}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    raise EncodingError(f"{name}: cannot store a {type(value).__name__} without pickle")


def unflatten(data: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of `flatten`."""
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        try:
            return tensors[data["__tensor__"]]
        except KeyError:
            raise EncodingError(f"tensor {data['__tensor__']!r} is missing") from None
    if "__tuple__" in data:
        return tuple(unflatten(v, tensors) for v in data["__tuple__"])
    if "__dict__" in data:
        return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in data["__dict__"]}
    if "__float__" in data:
        return float(data["__float__"])
    return {k: unflatten(v, tensors) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


def encode_state(state: LoopState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, JSON document) for a LoopState."""
    tensors: dict[str, Tensor] = {}
    rng = state.rng
    doc = {
        "format": FORMAT_VERSION,
        "epoch": state.epoch,
        "params": flatten(state.params, "params", tensors),
        "model": flatten(dict(state.model), "model", tensors),
        "optimizer": flatten(state.optimizer, "optimizer", tensors),
        "scheduler": flatten(state.scheduler, "scheduler", tensors),
        "best": {"epoch": state.best_epoch, "value": flatten(state.best_value, "best/value", tensors),
                 "metrics": flatten(state.best_metrics, "best/metrics", tensors),
                 # After an improving epoch the best weights are the current ones: stored once.
                 "model": "model" if _same(state.best_model, state.model) else
                 flatten(dict(state.best_model), "best_model", tensors)},
        "epochs_since_best": state.epochs_since_best,  # for readers; derived from epoch and best.epoch
        "rng": flatten({"torch_cpu": rng.torch_cpu, "torch_cuda": rng.torch_cuda, "numpy": rng.numpy,
                        "python": rng.python, "data_order": rng.data_order}, "rng", tensors),
        "history": flatten([asdict(r) for r in state.history], "history", tensors),
        "own": flatten(state.own, "own", tensors),
    }
    return _unshared(tensors), doc


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors stores no two tensors over one memory (tied or aliased weights): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def decode_state(tensors: dict[str, Tensor], doc: dict[str, Any]) -> LoopState:
    """The LoopState of `encode_state`'s output; EncodingError when a part is missing or malformed."""
    try:
        best, rng = doc["best"], RngState(**unflatten(doc["rng"], tensors))
        model = unflatten(doc["model"], tensors)
        if any(not isinstance(t, Tensor) or t.dtype != torch.uint8
               for t in (rng.torch_cpu, rng.data_order, *rng.torch_cuda)):
            raise ValueError("torch random states must be byte tensors")
        return LoopState(
            epoch=int(doc["epoch"]),
            params=unflatten(doc["params"], tensors),
            model=model,
            optimizer=unflatten(doc["optimizer"], tensors),
            scheduler=unflatten(doc["scheduler"], tensors),
            best_epoch=int(best["epoch"]),
            best_value=unflatten(best["value"], tensors),
            best_metrics=unflatten(best["metrics"], tensors),
            best_model=dict(model) if best["model"] == "model" else unflatten(best["model"], tensors),
            rng=rng,
            history=[EpochReport(**r) for r in unflatten(doc["history"], tensors)],
            own=unflatten(doc.get("own"), tensors),  # absent from checkpoints written before plugins had it
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EncodingError(f"malformed checkpoint document: {e!r}") from e
