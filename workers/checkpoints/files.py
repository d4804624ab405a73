"""Checkpoint files: one safetensors file per epoch, written atomically, validated when read.

A trial's checkpoints live in one directory as `epoch-000012.safetensors`; the JSON document (structure,
scalars, identity) sits in the file's safetensors header, so a checkpoint is one file and one rename. A
write goes to a temporary name in the same directory, is fsynced, renamed over the final name, and the
directory is fsynced: a crash leaves either the previous checkpoints alone or the new one whole.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from workers.checkpoints.encoding import FORMAT_VERSION, EncodingError, decode_state, encode_state
from workers.loop_state import LoopState

_HEADER_KEY = "hpsearch.checkpoint"
_NAME = re.compile(r"^epoch-(\d{6,})\.safetensors$")
TEMP_SUFFIX = ".tmp"


class Unusable(StrEnum):
    """Why a checkpoint cannot continue its trial (a label for the trial's record and /metrics)."""

    MISSING = "missing"  # no such file (e.g. a machine without the shared volume)
    CORRUPT = "corrupt"  # truncated or not a checkpoint
    FORMAT = "format"  # written by an incompatible version of this format
    IDENTITY = "identity_changed"  # the model or plugin version differs from the one that wrote it
    SHAPES = "shape_mismatch"  # the weights or optimizer state do not fit the model


class CheckpointUnusable(Exception):
    """A checkpoint that must not be resumed from; the caller falls back to an older one or starts over."""

    def __init__(self, reason: Unusable, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    epoch: int
    bytes: int


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}.safetensors"


def write_checkpoint(directory: Path, state: LoopState, *,
                     identity: Mapping[str, str] | None = None) -> CheckpointFile:
    """Write `state` as the checkpoint of its epoch, atomically; `identity` names what must match to resume
    (model kind, plugin name and version...)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, doc = encode_state(state)
    doc["identity"] = dict(identity or {})
    final = directory / checkpoint_name(state.epoch)
    temp = directory / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    try:
        save_file(tensors, temp, metadata={_HEADER_KEY: json.dumps(doc, allow_nan=False)})
        _fsync_path(temp)
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_path(directory)
    return CheckpointFile(final, state.epoch, final.stat().st_size)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path, *, module: nn.Module | None = None,
                    identity: Mapping[str, str] | None = None) -> LoopState:
    """The LoopState in `path`, checked against the model it will be loaded into and the identity of the
    code that will run it (None: not checked); CheckpointUnusable says why it cannot be used."""
    if not path.is_file():
        raise CheckpointUnusable(Unusable.MISSING, f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(_HEADER_KEY)
            if header is None:
                raise CheckpointUnusable(Unusable.CORRUPT, f"{path.name} is not a checkpoint")
            doc = json.loads(header)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointUnusable(Unusable.CORRUPT, f"{path.name}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        raise CheckpointUnusable(Unusable.FORMAT, f"{path.name} has format {_get(doc, 'format')!r}, this "
                                                  f"version reads {FORMAT_VERSION}")
    if identity is not None:
        _check_identity(path, dict(doc.get("identity") or {}), dict(identity))
    try:
        state = decode_state(tensors, doc)
    except EncodingError as e:
        raise CheckpointUnusable(Unusable.CORRUPT, f"{path.name}: {e}") from e
    if module is not None:
        check_fits(state, module)
    return state


def _get(doc: Any, key: str) -> Any:
    return doc.get(key) if isinstance(doc, dict) else None


def _check_identity(path: Path, stored: dict[str, str], expected: dict[str, str]) -> None:
    changed = [f"{k} {stored.get(k)!r} in the checkpoint, {expected.get(k)!r} now"
               for k in sorted(stored.keys() | expected.keys()) if stored.get(k) != expected.get(k)]
    if changed:
        raise CheckpointUnusable(Unusable.IDENTITY, f"{path.name}: " + "; ".join(changed))


def check_fits(state: LoopState, module: nn.Module) -> None:
    """The weights and optimizer buffers have the module's names and shapes (torch's optimizers keep
    their per-parameter buffers shaped like the parameter)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for label, weights in (("weights", state.model), ("best weights", state.best_model)):
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if got != expected:
            raise CheckpointUnusable(Unusable.SHAPES, f"{label}: {_shape_diff(got, expected)}")
    shapes = [tuple(p.shape) for p in module.parameters()]
    ids = [i for group in state.optimizer.get("param_groups", []) for i in group.get("params", [])]
    if len(ids) != len(shapes):
        raise CheckpointUnusable(Unusable.SHAPES, f"optimizer holds {len(ids)} parameters, the model has "
                                                  f"{len(shapes)}")
    position = {pid: n for n, pid in enumerate(ids)}
    for pid, buffers in state.optimizer.get("state", {}).items():
        want = shapes[position[pid]] if pid in position else None
        for key, value in buffers.items():
            if getattr(value, "ndim", 0) > 0 and tuple(value.shape) != want:
                raise CheckpointUnusable(Unusable.SHAPES, f"optimizer buffer {key!r} of parameter {pid} has "
                                                          f"shape {tuple(value.shape)}, the parameter {want}")


def _shape_diff(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra:
        return f"missing {missing}, unexpected {extra}"
    k = next(k for k in expected if got[k] != expected[k])
    return f"{k} has shape {got[k]} in the checkpoint, {expected[k]} in the model"


def list_checkpoints(directory: Path) -> list[CheckpointFile]:
    """The finished checkpoints in `directory`, oldest epoch first (temporaries are not checkpoints)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in os.scandir(directory):
        m = _NAME.match(entry.name)
        if m and entry.is_file():
            found.append(CheckpointFile(Path(entry.path), int(m.group(1)), entry.stat().st_size))
    return sorted(found, key=lambda c: c.epoch)


def latest_usable(directory: Path, *, module: nn.Module | None = None,
                  identity: Mapping[str, str] | None = None, newest: int | None = None
                  ) -> tuple[LoopState | None, list[tuple[CheckpointFile, CheckpointUnusable]]]:
    """The newest checkpoint that reads and fits, falling back epoch by epoch; None to start over. Also
    every newer one that was passed over, with why (to record on the trial). `newest`: no checkpoint of a
    later epoch (one written but never recorded: the recorded curve ends before it)."""
    skipped: list[tuple[CheckpointFile, CheckpointUnusable]] = []
    for ckpt in reversed(list_checkpoints(directory)):
        if newest is not None and ckpt.epoch > newest:
            continue
        try:
            return read_checkpoint(ckpt.path, module=module, identity=identity), skipped
        except CheckpointUnusable as e:
            skipped.append((ckpt, e))
    return None, skipped


def directory_bytes(directory: Path) -> int:
    """Bytes on disk under `directory`, temporaries included (they count against a quota too)."""
    if not directory.is_dir():
        return 0
    return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the leftovers of interrupted writes; only for the trial's owner, when no write is running."""
    removed = []
    if directory.is_dir():
        for entry in os.scandir(directory):
            if entry.name.startswith(".epoch-") and entry.name.endswith(TEMP_SUFFIX):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed
