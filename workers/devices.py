"""Which devices this machine offers, probed in a child so the supervisor never initializes CUDA."""

from __future__ import annotations

import multiprocessing as mp
import os


def _count_cuda(conn: object) -> None:
    import torch

    try:
        conn.send(torch.cuda.device_count() if torch.cuda.is_available() else 0)  # type: ignore[attr-defined]
    finally:
        os._exit(0)


def cuda_device_count() -> int:
    """CUDA devices visible here; the probe runs in a forked child (a CUDA context must not be inherited)."""
    parent, child = mp.get_context("fork").Pipe(duplex=False)
    proc = mp.get_context("fork").Process(target=_count_cuda, args=(child,), daemon=True)
    proc.start()
    count = parent.recv() if parent.poll(60) else 0
    proc.join(5)
    return int(count)


def resolve_devices(devices: str) -> list[str]:
    """'auto' (every GPU, else the CPU), 'cpu', or GPU indices '0,1'; unknown devices fail fast."""
    devices = devices.strip().lower()
    if devices == "cpu":
        return ["cpu"]
    count = cuda_device_count()
    if devices == "auto":
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    out = []
    for part in devices.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise ValueError(f"--devices takes auto, cpu or GPU indices like 0,1; got {part!r}")
        if int(part) >= count:
            raise ValueError(f"CUDA device {part} does not exist: this machine has {count} CUDA device(s)")
        out.append(f"cuda:{int(part)}")
    return out


def threads_per_slot(n_cpu_slots: int) -> int:
    """CPU threads for each trial so that concurrent CPU trials do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, n_cpu_slots))
