"""The GPU paths of a trial, checked on the CPU: bf16 autocast, device-resident data, no per-batch host reads.

The same checks run on CUDA where a device exists (`-m gpu`); elsewhere those tests skip and say why.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from app.ml.artifacts import ModelSpec, has_model
from tests.workers.test_trainer import blobs, images, model_for
from workers.devices import cuda_device_count
from workers.protocol import Decision, Done, Epoch, Verdict
from workers.runner import RunnerJob, RunnerTrial, _tensors, runner_main
from workers.trainer import TrainData, _train_epoch, make_optimizer, train

# Probed in a forked child, as the worker does: this process stays CUDA-free until a CUDA test runs.
CUDA = cuda_device_count() > 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False")
# Ops that make the host wait for the device: reading a scalar, sizing a mask, copying to the host.
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select"}


class HostReads(TorchDispatchMode):
    """Counts the tensor ops that read device results on the host while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        kwargs = kwargs or {}
        to_host = name == "aten._to_copy" and isinstance(args[0], Tensor) and args[0].device.type != "cpu" \
            and str(kwargs.get("device", args[0].device)) == "cpu"
        if name in HOST_READS or to_host:
            self.reads[name] += 1
        return func(*args, **kwargs)


def on(data: TrainData, device: str) -> TrainData:
    return TrainData(data.x_train.to(device), data.y_train.to(device), data.x_val.to(device), data.y_val.to(device),
                     task=data.task, image=data.image)


def hard_blobs() -> TrainData:
    """Overlapping blobs: accuracy well below 1, so a precision loss would show."""
    return blobs(n=400, n_features=8, n_classes=4, seed=1, sep=0.9)


def fit(data: TrainData, amp: torch.dtype | None) -> Any:
    params = {"n_layers": 2, "units": 32, "optimizer": "adam", "learning_rate": 0.01, "batch_size": 32}
    module = model_for(data, params)
    return module, train(module, data, params, epochs=6, objective="val_accuracy", direction="maximize",
                         patience=None, seed=3, amp_dtype=amp)


# ---- bf16 autocast --------------------------------------------------------------------------------------


def check_bf16_keeps_accuracy(device: str) -> None:
    data = on(hard_blobs(), device)
    _, full = fit(data, None)
    module, mixed = fit(data, torch.bfloat16)
    assert 0.5 < full.best_metrics["val_accuracy"] < 0.99  # a problem where precision could matter
    assert mixed.best_metrics["val_accuracy"] == pytest.approx(full.best_metrics["val_accuracy"], abs=0.04)
    assert mixed.best_metrics["val_loss"] == pytest.approx(full.best_metrics["val_loss"], rel=0.1)
    # Autocast computes in bf16 but keeps float32 weights, on the device, and float32 CPU copies of the best.
    assert all(p.dtype == torch.float32 and p.device.type == device.split(":")[0] for p in module.parameters())
    assert all(v.device.type == "cpu" and (not v.is_floating_point() or v.dtype == torch.float32)
               for v in mixed.best_state.values())


def test_bf16_autocast_on_cpu_keeps_accuracy_and_float32_weights() -> None:
    check_bf16_keeps_accuracy("cpu")


def test_bf16_autocast_trains_in_bf16_and_validates_in_float32() -> None:
    """Validation runs in float32, as the final test evaluation and the served model do."""
    data = hard_blobs()
    module = model_for(data, {"n_layers": 1, "units": 16})
    seen: list[tuple[bool, torch.dtype]] = []
    first = next(m for m in module.modules() if isinstance(m, nn.Linear))
    first.register_forward_hook(lambda m, _i, out: seen.append((m.training, out.dtype)))
    train(module, data, {"batch_size": 100}, epochs=1, objective="val_loss", direction="minimize",
          amp_dtype=torch.bfloat16)
    assert set(seen) == {(True, torch.bfloat16), (False, torch.float32)}
    seen.clear()
    train(module, data, {"batch_size": 100}, epochs=1, objective="val_loss", direction="minimize")
    assert {dtype for _, dtype in seen} == {torch.float32}


# ---- no host reads between batches ----------------------------------------------------------------------


def host_reads_per_epoch(data: TrainData, params: dict[str, Any], batch_size: int,
                         amp: torch.dtype | None) -> Counter[str]:
    module = model_for(data, params).to(data.x_train.device)
    optimizer = make_optimizer(params, module)
    generator = torch.Generator(device=data.x_train.device).manual_seed(0)
    noise = 0.05 if data.image else None
    with HostReads() as mode:
        loss = _train_epoch(module, data, optimizer, batch_size, generator, noise, amp, stop_signal=lambda: False)
    assert np.isfinite(loss)
    return mode.reads


CASES = {
    "mlp": (blobs, {"n_layers": 2, "units": 16, "batch_norm": "before_activation", "dropout": 0.2}),
    "mlp-sgd": (blobs, {"n_layers": 1, "units": 16, "optimizer": "momentum"}),
    "cnn-augmented": (images, {"n_layers": 1, "filters": 4, "units": 8}),
}


def check_one_host_read_per_epoch(device: str, case: str, amp: torch.dtype | None) -> None:
    make, params = CASES[case]
    data = on(make(), device)
    few = host_reads_per_epoch(data, params, batch_size=data.x_train.shape[0] // 2, amp=amp)
    many = host_reads_per_epoch(data, params, batch_size=4, amp=amp)
    # Only the epoch's mean loss is read back, once, however many batches there were.
    assert sum(few.values()) == sum(many.values()) == 1, (few, many)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_epoch_loop_reads_the_host_once_per_epoch_on_cpu(case: str, amp: torch.dtype | None) -> None:
    check_one_host_read_per_epoch("cpu", case, amp)


# ---- the runner: data on the job's device, amp only where it is bf16 on a GPU ---------------------------


def job_for(tmp_path: Path, device: str, precision: str, task: str = "classification") -> RunnerJob:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) if task == "classification" else x[:, :2].sum(1)
    params = {"n_layers": 1, "units": 16, "optimizer": "adam", "learning_rate": 0.01, "batch_size": 16}
    spec = ModelSpec("mlp", params, task, (6,), 2 if task == "classification" else 1, None,
                     ["0", "1"] if task == "classification" else None, x[:90].mean(0).tolist(),
                     x[:90].std(0).tolist())
    trial = RunnerTrial(trial=1, spec=spec, seed=5,
                        artifact_path=str(tmp_path / f"trial-{device.replace(':', '')}-{precision}"))
    return RunnerJob(trials=[trial], x_train=x[:90], y_train=y[:90], x_val=x[90:], y_val=y[90:], epochs=3,
                     patience=None, objective="val_loss", direction="minimize", device=device, threads=1,
                     precision=precision)


def check_tensors_on_device(tmp_path: Path, device: str) -> None:
    for task, y_dtype in (("classification", torch.long), ("regression", torch.float32)):
        data = _tensors(job_for(tmp_path, device, "bf16", task=task))
        want = torch.device(device)
        assert {t.device for t in (data.x_train, data.y_train, data.x_val, data.y_val)} == {want}
        assert data.x_train.dtype == data.x_val.dtype == torch.float32
        assert data.y_train.dtype == data.y_val.dtype == y_dtype
        assert data.task == task and not data.image


def test_the_runner_puts_the_data_on_the_jobs_device(tmp_path: Path) -> None:
    check_tensors_on_device(tmp_path, "cpu")


def run_child(job: RunnerJob, start: str = "fork",
              timeout_s: float = 120.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a trial in a runner process as the supervisor does; its epoch reports and its final result.

    The supervisor forks; a test process that has already used CUDA must spawn instead (CUDA does not
    survive a fork).
    """
    ctx = mp.get_context(start)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=runner_main, args=(child, job), daemon=True)
    proc.start()
    child.close()
    epochs: list[dict[str, Any]] = []
    try:
        while True:
            assert parent.poll(timeout_s), "the runner went silent"
            message = parent.recv()
            assert message.trial == job.trials[0].trial  # every message names its trial
            if isinstance(message, Epoch):
                epochs.append(message.report)
                parent.send(Decision(job.trials[0].trial, Verdict.GO))
                continue
            assert isinstance(message, Done), message
            return epochs, message.result
    finally:
        with contextlib.suppress(OSError):
            parent.send(None)  # the runner waits for its next job: none comes
        parent.close()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()


def test_a_cpu_trial_ignores_amp_and_trains_in_float32(tmp_path: Path) -> None:
    """bf16 autocast is the GPU path: on the CPU it is slower, so a CPU runner trains in float32 either way."""
    with_amp = run_child(job_for(tmp_path, "cpu", "bf16"))
    without = run_child(job_for(tmp_path, "cpu", "fp32"))
    assert [e["train_loss"] for e in with_amp[0]] == [e["train_loss"] for e in without[0]]
    assert len(with_amp[0]) == 3 and with_amp[1]["epochs_run"] == 3
    assert with_amp[1]["metrics"]["val_loss"] == without[1]["metrics"]["val_loss"]
    assert has_model(tmp_path / "trial-cpu-bf16")


# ---- the same on CUDA -----------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_on_cuda_keeps_accuracy() -> None:
    check_bf16_keeps_accuracy("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_the_epoch_loop_never_waits_on_the_host_between_batches_on_cuda(case: str) -> None:
    check_one_host_read_per_epoch("cuda", case, torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_trial_keeps_its_data_on_the_gpu_and_matches_the_cpu(tmp_path: Path) -> None:
    check_tensors_on_device(tmp_path, "cuda:0")
    gpu_epochs, gpu = run_child(job_for(tmp_path, "cuda:0", "bf16"), start="spawn")
    _, cpu = run_child(job_for(tmp_path, "cpu", "fp32"))
    assert len(gpu_epochs) == 3 and has_model(tmp_path / "trial-cuda0-bf16")
    assert gpu["metrics"]["val_accuracy"] == pytest.approx(cpu["metrics"]["val_accuracy"], abs=0.1)
