"""The arithmetic a trial trains in, chosen by the study's `precision` (fp32, tf32 or bf16) or by default.

- fp32: float32 throughout, TF32 off: the reference, and the slowest on a tensor-core GPU.
- tf32: float32 tensors, but matmuls and convolutions on tensor cores with a 10-bit mantissa (Ampere and
  later): several times faster matmuls, results within about 1e-3 relative of fp32 for most networks.
- bf16: autocast to bfloat16 for each training step's forward and backward (weights, optimizer state and
  the loss stay float32): the fastest, half the activation memory, but an 8-bit mantissa: fine for
  classification, risky for regression on unscaled targets, which is why regression defaults to fp32.

Default: bf16 for classification on a GPU, fp32 for regression. A CPU trains in fp32 whatever the choice
(bf16 autocast is slower there, and TF32 a GPU's). Validation and the final test evaluation run without
autocast, under the same TF32 setting: the metric that selects and prunes trials is measured as the test
metric is, and as the served model predicts (float32).
"""

from __future__ import annotations

import enum
from typing import Any


class Precision(enum.StrEnum):
    FP32 = "fp32"
    TF32 = "tf32"
    BF16 = "bf16"


def resolve_precision(chosen: str | None, task: str, device: str) -> Precision:
    """The precision a trial of this task trains in on this device: the study's choice, else the default."""
    if not device.startswith("cuda"):
        return Precision.FP32
    if chosen is not None:
        return Precision(chosen)
    return Precision.BF16 if task == "classification" else Precision.FP32


def apply_precision(precision: str, device: str) -> Any:
    """Set this process's TF32 switches for `precision` on `device`; the autocast dtype of its training steps
    (torch.bfloat16 for bf16 on a GPU, else None). Called once in a runner or a final evaluation's child."""
    import torch

    p = Precision(precision)
    if not device.startswith("cuda"):
        return None
    tf32 = p is Precision.TF32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # torch's default is off
    torch.backends.cudnn.allow_tf32 = tf32  # torch's default is on: fp32 and bf16 turn it off
    return torch.bfloat16 if p is Precision.BF16 else None
