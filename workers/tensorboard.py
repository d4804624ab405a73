"""Optional TensorBoard logs: each trial's per-epoch scalars under <artifact dir>/tensorboard/<study>/<trial>.

Written by the supervisor from the epoch reports it already relays, so the trial process stays unchanged.
Needs the `tensorboard` package (extra `hpsearch[tensorboard]`); without it the spec flag is logged once and
ignored, never a reason to fail a trial.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("hpsearch.worker")
_warned = False


def board_dir(artifact_dir: Path, study_id: str, number: int, attempt: int) -> Path:
    """One run per attempt, so a retried trial's curve does not overwrite the first one's steps."""
    name = f"trial-{number}" if attempt == 1 else f"trial-{number}-attempt-{attempt}"
    return artifact_dir / "tensorboard" / study_id / name


class TrialBoard:
    """A SummaryWriter for one trial attempt, or nothing when TensorBoard is not installed."""

    def __init__(self, path: Path) -> None:
        global _warned
        self.writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises this when the tensorboard package is missing
            if not _warned:
                log.warning("tensorboard logs requested but the tensorboard package is not installed")
                _warned = True
            return
        self.writer = SummaryWriter(log_dir=str(path))

    def epoch(self, report: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(report["epoch"])
        scalars = {"train/loss": report.get("train_loss"), "val/loss": report.get("val_loss"),
                   "learning_rate": report.get("learning_rate"), "epoch_seconds": report.get("seconds")}
        scalars.update({f"val/{k}": v for k, v in (report.get("metrics") or {}).items()})
        for tag, value in scalars.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
