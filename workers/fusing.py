"""How many trials a worker slot fuses into one runner: `hpsearch worker --fuse K|auto`.

`auto` picks K per claim from the first member's model, the device and its free memory: on a GPU as many
members as fit in half its free memory, by an estimate of one member's parameter, optimizer-state and
activation bytes; on a CPU 1, since fused groups measured slower there than one trial per runner (a CPU's
arithmetic bounds it, and padding members to the widest adds arithmetic; `benchmarks/fused.py`, figures in
docs/benchmarks/performance.md). `--fuse K` fuses on a CPU all the same. The study's max_parallel bounds K
either way, through the claim.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.ml.artifacts import ModelSpec

AUTO = "auto"
CPU_AUTO_K = 1
UNKNOWN_MEMORY_K = 8  # a GPU whose free memory could not be read
MAX_AUTO_K = 64
MEMORY_SHARE = 0.5  # of the free device memory: the rest for CUDA's workspace, fragmentation, other slots


def parse_fuse(value: str) -> int | str:
    """`--fuse`'s value: an integer of at least 1 (1: off), or 'auto'."""
    if value.strip().lower() == AUTO:
        return AUTO
    k = int(value)
    if k < 1:
        raise ValueError("--fuse takes auto or an integer of at least 1")
    return k


def member_bytes(spec: ModelSpec, batch_size: int) -> int:
    """Estimated device bytes of one fused member: weights, gradients and two optimizer moments (float32),
    plus a training step's activations (input, each layer's pre- and post-activation, kept for backward)."""
    from workers.fused.partition import layer_sizes

    sizes = layer_sizes(spec)
    params = sum(i * o + o for i, o in sizes)
    activations = batch_size * (sizes[0][0] + 3 * sum(o for _, o in sizes))
    return 4 * (4 * params + activations)


def _free_memory(conn: Any, device: str) -> None:
    import torch

    try:
        conn.send(int(torch.cuda.mem_get_info(torch.device(device))[0]))
    except Exception:  # noqa: BLE001 - no answer: the caller falls back
        conn.send(0)
    finally:
        os._exit(0)


def free_memory(device: str) -> int:
    """Free bytes on a CUDA device, probed in a forked child: the supervisor must never hold a CUDA context
    (a forked runner cannot use CUDA once its parent initialized it). 0 when unknown."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_free_memory, args=(child, device), daemon=True)
    proc.start()
    free = parent.recv() if parent.poll(60) else 0
    proc.join(5)
    return int(free)


def fuse_size(setting: int | str, device: str, spec: ModelSpec, batch_size: int) -> int:
    """K for a claim whose first member has `spec`: the setting, or auto's pick for this device."""
    if setting != AUTO:
        return int(setting)
    if not device.startswith("cuda"):
        return CPU_AUTO_K
    free = free_memory(device)
    if free <= 0:
        return UNKNOWN_MEMORY_K
    return max(1, min(MAX_AUTO_K, int(free * MEMORY_SHARE) // max(1, member_bytes(spec, batch_size))))
