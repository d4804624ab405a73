"""Precision is the study's choice: fp32 for regression and bf16 for classification on a GPU by default,
fp32 on a CPU whatever the choice; the spec refuses anything else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError

from app.schemas.study import StudySpec
from tests.factories import study_spec
from workers.devices import cuda_device_count
from workers.precision import Precision, apply_precision, resolve_precision


@pytest.mark.parametrize(("chosen", "task", "device", "expected"), [
    (None, "classification", "cuda:0", Precision.BF16),  # as before the choice existed
    (None, "regression", "cuda:1", Precision.FP32),  # unscaled targets need float32's mantissa
    ("fp32", "classification", "cuda:0", Precision.FP32),
    ("tf32", "regression", "cuda:0", Precision.TF32),
    ("bf16", "regression", "cuda:0", Precision.BF16),
    ("bf16", "classification", "cpu", Precision.FP32),  # bf16 autocast is slower on a CPU
    ("tf32", "regression", "cpu", Precision.FP32),
    (None, "classification", "cpu", Precision.FP32),
])
def test_the_precision_a_trial_trains_in(chosen: str | None, task: str, device: str, expected: Precision) -> None:
    assert resolve_precision(chosen, task, device) is expected


def test_a_cpu_runner_gets_no_autocast_and_keeps_torchs_switches() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for p in Precision:
        assert apply_precision(p, "cpu") is None
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_the_spec_takes_the_three_precisions_and_defaults_to_none() -> None:
    assert StudySpec.model_validate(study_spec()).precision is None
    for p in ("fp32", "tf32", "bf16"):
        assert StudySpec.model_validate({**study_spec(), "precision": p}).precision == p
    with pytest.raises(ValidationError, match="precision"):
        StudySpec.model_validate({**study_spec(), "precision": "fp16"})


@pytest.fixture
def tf32_switches() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0, reason="no CUDA device: torch.cuda.is_available() is False")
def test_on_a_gpu_each_precision_sets_tf32_and_autocast(tf32_switches: None) -> None:
    assert apply_precision("tf32", "cuda:0") is None
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert apply_precision("bf16", "cuda:0") is torch.bfloat16
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert apply_precision("fp32", "cuda:0") is None
    assert not torch.backends.cudnn.allow_tf32  # torch's default is on: fp32 means float32 convolutions too
