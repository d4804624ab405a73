"""`hpsearch worker --devices` and `--per-device`: devices that do not exist stop the worker before it touches
the database; GPUs torch cannot see are reported; slots per GPU follow the documented rule; a runner keeps to
its own GPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from workers import devices
from workers.devices import (
    CPU_SLOTS,
    MAX_SLOTS_PER_GPU,
    CudaProbe,
    cuda_device_count,
    default_per_device,
    missing_gpus_warning,
    resolve_devices,
    slots_per_gpu,
    use_device,
)

HPSEARCH = Path(sys.executable).with_name("hpsearch")
FAIL_FAST_S = 60  # generous on 2 busy cores; a worker that started serving would never exit by itself


@pytest.fixture(scope="module")
def gpu_count() -> int:
    return cuda_device_count()  # probed in a forked child, as the worker does: this process stays CUDA-free


def _worker(tmp_path: Path, devices: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    db_path = tmp_path / "hpsearch.db"
    env = {**os.environ, "HPSEARCH_DATABASE_URL": f"sqlite:///{db_path}",
           "HPSEARCH_HOME": str(tmp_path / "home")}
    result = subprocess.run([str(HPSEARCH), "worker", "--devices", devices], env=env, capture_output=True,
                            text=True, timeout=FAIL_FAST_S)
    return result, db_path


def test_a_gpu_that_does_not_exist_fails_fast_with_a_clear_message(tmp_path: Path, gpu_count: int) -> None:
    missing = max(7, gpu_count)  # 7 on a machine without GPUs, as a user would type it
    result, db_path = _worker(tmp_path, str(missing))
    assert result.returncode != 0
    assert f"CUDA device {missing} does not exist" in result.stderr
    assert "device(s)" in result.stderr and "Traceback" not in result.stderr
    assert not db_path.exists()  # refused before registering anywhere


@pytest.mark.parametrize("devices", ["gpu0", "cpu,1"])
def test_malformed_device_lists_are_refused(tmp_path: Path, devices: str) -> None:
    result, db_path = _worker(tmp_path, devices)
    assert result.returncode != 0
    assert "--devices takes auto, cpu or GPU indices" in result.stderr and "Traceback" not in result.stderr
    assert not db_path.exists()


def test_cpu_and_auto_resolve_to_devices_that_exist(gpu_count: int) -> None:
    assert resolve_devices("cpu") == resolve_devices(" CPU ") == ["cpu"]
    assert resolve_devices("auto") == ([f"cuda:{i}" for i in range(gpu_count)] or ["cpu"])
    if gpu_count:
        assert resolve_devices("cuda:0") == ["cuda:0"]


# ---- slots per GPU: the documented rule -----------------------------------------------------------------

GiB = 2**30


@pytest.mark.parametrize(("free_gib", "cores", "gpus", "slots"), [
    (139, 16, 1, 8),  # an H200 on 16 cores: the cap
    (78, 16, 8, 2),  # eight H100s on 16 cores: the cores
    (5, 64, 1, 2),  # a small card: its free memory (2 GiB a trial)
    (1, 64, 1, 1),  # less than one trial's memory still runs one
    (80, 2, 4, 1),  # fewer cores than GPUs: one each
])
def test_slots_per_gpu_is_the_least_of_memory_cores_and_the_cap(free_gib: int, cores: int, gpus: int,
                                                                slots: int) -> None:
    assert slots_per_gpu(free_gib * GiB, cores, gpus) == slots


def test_the_default_uses_the_least_free_gpu_and_two_slots_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "usable_cores", lambda: 32)
    probe = CudaProbe(count=3, torch_cuda="12.4", free_bytes=[70 * GiB, 7 * GiB, 70 * GiB])
    assert default_per_device(["cuda:0", "cuda:2"], probe) == min(70 // 2, 32 // 2, MAX_SLOTS_PER_GPU)
    assert default_per_device(["cuda:0", "cuda:1"], probe) == 3  # cuda:1 has room for 3 trials
    assert default_per_device(["cpu"], probe) == CPU_SLOTS == 2


def test_usable_cores_never_exceed_this_process_affinity() -> None:
    assert 1 <= devices.usable_cores() <= len(os.sched_getaffinity(0))


def test_per_device_auto_and_counts_parse_and_zero_is_refused() -> None:
    from app.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["worker"]).per_device is None
    assert parser.parse_args(["worker", "--per-device", "auto"]).per_device is None
    assert parser.parse_args(["worker", "--per-device", "3"]).per_device == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--per-device", "0"])


# ---- --devices auto on a machine whose torch cannot see its GPUs ------------------------------------------


def test_a_cpu_only_torch_on_a_gpu_machine_is_named_with_the_fix() -> None:
    text = missing_gpus_warning(CudaProbe(count=0, torch_cuda=None), 2, "NVML")
    assert text is not None
    assert "this machine has 2 NVIDIA GPU(s) (NVML)" in text and "CPU-only build" in text
    assert "torch.version.cuda is None" in text and "download.pytorch.org/whl/cu" in text
    assert "--devices cpu" in text


def test_a_cuda_torch_that_sees_no_device_is_a_different_cause() -> None:
    text = missing_gpus_warning(CudaProbe(count=0, torch_cuda="12.4"), 1, "nvidia-smi")
    assert text is not None and "built for CUDA 12.4" in text and "CUDA_VISIBLE_DEVICES" in text


def test_no_warning_where_torch_sees_the_gpus_or_the_machine_has_none() -> None:
    assert missing_gpus_warning(CudaProbe(count=1, torch_cuda="12.4", free_bytes=[GiB]), 1, "NVML") is None
    assert missing_gpus_warning(CudaProbe(count=0, torch_cuda=None), 0, "") is None


def test_devices_auto_warns_loudly_when_a_gpu_is_there_but_torch_is_cpu_only(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(devices, "probe_cuda", lambda: CudaProbe(count=0, torch_cuda=None))
    monkeypatch.setattr(devices, "driver_gpus", lambda: (1, "/proc/driver/nvidia/gpus"))
    with caplog.at_level(logging.WARNING, logger="hpsearch.worker"):
        assert resolve_devices("auto") == ["cpu"]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "CPU-only build" in record.getMessage() and "/proc/driver/nvidia/gpus" in record.getMessage()


def test_the_device_order_is_pinned_to_the_pci_bus_as_nvml_numbers_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    resolve_devices("auto")
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


# ---- a runner keeps to its own GPU ------------------------------------------------------------------------

ONE_GPU_RUNNER = """
import sys
from collections import Counter
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from app.ml.artifacts import ModelSpec, build_module
from workers.devices import use_device
from workers.runner import _inference_ms
from workers.trainer import TrainData, train

class Devices(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in [*args, *(kwargs or {}).values()]:
            if isinstance(a, torch.Tensor):
                self.seen[str(a.device)] += 1
        return func(*args, **(kwargs or {}))

device = sys.argv[1]
use_device(device)
rng = np.random.default_rng(0)
x = torch.as_tensor(rng.normal(size=(200, 6)), dtype=torch.float32, device=device)
y = (x[:, 0] > 0).long()
spec = ModelSpec("mlp", {"n_layers": 1, "units": 16}, "classification", (6,), 2, None, ["0", "1"], [0.0] * 6,
                 [1.0] * 6)
module = build_module(spec).to(device)
with Devices() as mode:
    train(module, TrainData(x[:150], y[:150], x[150:], y[150:], task="classification"), {"batch_size": 32},
          epochs=2, objective="val_loss", direction="minimize")
    _inference_ms(module, x)
print("current", torch.cuda.current_device(), "seen", sorted(mode.seen))
"""


def test_use_device_leaves_a_cpu_runner_alone() -> None:
    before = devices.cuda_initialized()
    use_device("cpu")  # no CUDA call at all: a CUDA-free process stays so
    assert devices.cuda_initialized() == before


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0, reason="no CUDA device: torch.cuda.is_available() is False")
def test_a_runner_on_the_last_gpu_names_only_that_gpu(gpu_count: int) -> None:
    """Every tensor a trial's ops touch is on its device (or the host), and its current device is that one."""
    last = gpu_count - 1
    done = subprocess.run([sys.executable, "-c", ONE_GPU_RUNNER, f"cuda:{last}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    current, seen = done.stdout.split("seen")
    assert current.split()[-1] == str(last)
    assert set(eval(seen)) <= {"cpu", f"cuda:{last}"}  # noqa: S307 - our own script's printed list
