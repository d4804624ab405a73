"""Which devices this machine offers and how many trials each runs, probed in a child so the supervisor never
initializes CUDA; the rule that keeps it so (no CUDA runner is forked once CUDA is initialized here); and a
runner's own GPU made CUDA's current device.

GPU slots per device, when `--per-device` is not given (`default_per_device`):

    min(free GPU memory // TRIAL_GPU_BYTES, usable CPU cores // GPUs, MAX_SLOTS_PER_GPU), at least 1

Each trial is a process with its own CUDA context (about half a GiB), the study's split and a small model;
each keeps a core busy feeding its GPU (Python, the pipe to the supervisor). Beyond MAX_SLOTS_PER_GPU
processes a GPU time-slices contexts with little gain; `--fuse auto` is the way to put more trials on it.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("hpsearch.worker")

CPU_SLOTS = 2  # trials at once on a CPU worker, each with half the cores
TRIAL_GPU_BYTES = 2 * 2**30  # one trial's GPU memory, estimated: its CUDA context, the split, a small model
MAX_SLOTS_PER_GPU = 8
PROBE_TIMEOUT_S = 60.0
CUDA_WHEELS = "https://download.pytorch.org/whl/cu124"


# ---- what torch sees, probed in a child ------------------------------------------------------------------


@dataclass(frozen=True)
class CudaProbe:
    """What a forked child's torch saw: its CUDA build, the devices and each one's free bytes."""

    count: int = 0
    torch_cuda: str | None = None  # torch.version.cuda: None for a CPU-only build
    free_bytes: list[int] = field(default_factory=list)


def _probe_cuda(conn: object) -> None:
    import torch

    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        free = []
        for i in range(count):
            try:
                free.append(int(torch.cuda.mem_get_info(i)[0]))
            except RuntimeError:  # busy in exclusive mode, say: its memory counts as unknown
                free.append(0)
        conn.send(CudaProbe(count, torch.version.cuda, free))  # type: ignore[attr-defined]
    finally:
        os._exit(0)


def probe_cuda() -> CudaProbe:
    """CUDA as this machine's torch sees it, from a forked child (a CUDA context must not be inherited)."""
    pin_device_order()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_cuda, args=(child,), daemon=True)
    proc.start()
    try:
        probe = parent.recv() if parent.poll(PROBE_TIMEOUT_S) else CudaProbe()
    except EOFError:  # the probe died before it answered
        probe = CudaProbe()
    proc.join(5)
    return probe


def cuda_device_count() -> int:
    """CUDA devices visible here; the probe runs in a forked child (a CUDA context must not be inherited)."""
    return probe_cuda().count


def pin_device_order() -> None:
    """Number CUDA devices by PCI bus, as NVML does (CUDA's default puts the fastest first): cuda:N is then
    the GPU that NVML, nvidia-smi and /metrics call N. Set before any CUDA initialization, in children too."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def driver_gpus() -> tuple[int, str]:
    """NVIDIA GPUs the machine has whatever torch was built for, and who said so: NVML, the driver's
    /proc entries, or `nvidia-smi -L`. (0, "") where none of them shows one."""
    try:
        import pynvml  # nvidia-ml-py, the `gpu` extra

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
        if count:
            return count, "NVML"
    except Exception:  # noqa: BLE001 - no NVML or no driver: try the next witness
        pass
    found = glob.glob("/proc/driver/nvidia/gpus/*")
    if found:
        return len(found), "/proc/driver/nvidia/gpus"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        if count:
            return count, "nvidia-smi"
    return 0, ""


def missing_gpus_warning(probe: CudaProbe, gpus: int, witness: str) -> str | None:
    """Why `--devices auto` fell back to the CPU on a machine that has GPUs, and the fix; None otherwise."""
    if probe.count or not gpus:
        return None
    if probe.torch_cuda is None:
        cause = "this torch is a CPU-only build (torch.version.cuda is None)"
        fix = f"install a CUDA build of torch (pip install torch --index-url {CUDA_WHEELS}) or use the " \
              "hpsearch-cuda image"
    else:
        cause = f"torch (built for CUDA {probe.torch_cuda}) sees no device"
        fix = "check CUDA_VISIBLE_DEVICES, that the driver is recent enough for that CUDA, and, in a container, " \
              "the NVIDIA Container Toolkit (--gpus all)"
    return f"--devices auto found no usable GPU, yet this machine has {gpus} NVIDIA GPU(s) ({witness}): " \
           f"{cause}. Trials run on the CPU. Fix: {fix}; or say --devices cpu to mean it."


def resolve_devices(devices: str) -> list[str]:
    """'auto' (every GPU, else the CPU), 'cpu', or GPU indices '0,1'; unknown devices fail fast."""
    devices = devices.strip().lower()
    if devices == "cpu":
        return ["cpu"]
    probe = probe_cuda()
    count = probe.count
    if devices == "auto":
        if not count:
            warning = missing_gpus_warning(probe, *driver_gpus())
            if warning:
                log.warning(warning)
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


# ---- slots -----------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity, bounded by a cgroup CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_cpu_quota() -> int | None:
    """A container's CPU limit in whole cores (rounded up), from cgroup v2 or v1; None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # v2: "<quota> <period>", or "max <period>"
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g:
                quota, period = f.read().strip(), g.read().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def slots_per_gpu(free_bytes: int, cores: int, gpus: int) -> int:
    """The documented rule: as many trials per GPU as its free memory, the cores and the cap allow, at least 1."""
    by_memory = free_bytes // TRIAL_GPU_BYTES
    by_cores = cores // max(1, gpus)
    return max(1, min(by_memory, by_cores, MAX_SLOTS_PER_GPU))


def default_per_device(devices: list[str], probe: CudaProbe | None = None) -> int:
    """Trials at once per device when `--per-device` is not given: CPU_SLOTS on the CPU, the rule on GPUs
    (the least free memory of the GPUs used, since every GPU runs the same number)."""
    gpus = [int(d.removeprefix("cuda:")) for d in devices if d.startswith("cuda")]
    if not gpus:
        return CPU_SLOTS
    probe = probe or probe_cuda()
    free = min((probe.free_bytes[i] for i in gpus if i < len(probe.free_bytes)), default=0)
    cores = usable_cores()
    slots = slots_per_gpu(free, cores, len(gpus))
    log.info("%d trial slot(s) per GPU: min(%.1f GiB free / %.0f GiB a trial, %d cores / %d GPU(s), %d); "
             "--per-device overrides", slots, free / 2**30, TRIAL_GPU_BYTES / 2**30, cores, len(gpus),
             MAX_SLOTS_PER_GPU)
    return slots


def use_device(device: str) -> None:
    """Make a runner's CUDA device the current one: a call that names no device (a synchronize, a library's
    workspace) then opens no context on cuda:0, so eight runners on eight GPUs put nothing on GPU 0."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


def threads_per_slot(n_cpu_slots: int) -> int:
    """CPU threads for each trial so that concurrent CPU trials do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, n_cpu_slots))


# ---- no CUDA before fork ---------------------------------------------------------------------------------


class CudaBeforeFork(RuntimeError):
    """CUDA is initialized in the supervisor: a runner forked now could not use it."""


_initialized_by: str | None = None  # the first watched step after which CUDA was initialized


def cuda_initialized() -> bool:
    """Whether this process has initialized CUDA (never imports torch to find out)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


@contextmanager
def watching_cuda(step: str) -> Iterator[None]:
    """Run one step of the supervisor's setup (a plugin's import, say); if it initialized CUDA, remember it,
    so that the refusal to fork names it."""
    global _initialized_by
    before = cuda_initialized()
    try:
        yield
    finally:
        if not before and _initialized_by is None and cuda_initialized():
            _initialized_by = step


def check_fork_safe(device: str) -> None:
    """Refuse to fork a runner for a CUDA device once this process has initialized CUDA: the runner would fail
    every CUDA call ("Cannot re-initialize CUDA in forked subprocess"). CPU runners are unaffected."""
    if not device.startswith("cuda") or not cuda_initialized():
        return
    cause = _initialized_by or "code run in the supervisor (a dataset plugin loading its data, or a CUDA call " \
                               "outside a runner)"
    raise CudaBeforeFork(
        f"refusing to fork a trial runner for {device}: CUDA is already initialized in the worker supervisor "
        f"(pid {os.getpid()}), by {cause}. A runner forked from it could not use CUDA ('Cannot re-initialize "
        "CUDA in forked subprocess'). CUDA must be touched only "
        "in runners: move that CUDA call from import time into the plugin's build or train, then restart the "
        "worker.")


def reset_cuda_watch() -> None:
    """Forget who initialized CUDA (tests that simulate it)."""
    global _initialized_by
    _initialized_by = None
