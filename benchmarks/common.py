"""What every benchmark shares: the MNIST-10k rows, the target, result records and JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("HPSEARCH_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))
SEED = 0
EPOCHS = 8
TARGET_ACCURACY = 0.95
VALIDATION_SPLIT = 0.2


@dataclass
class MnistRows:
    """The same 6,400 train / 1,600 validation rows the service uses (its split function, seed 0)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def mnist_rows(seed: int = SEED) -> MnistRows:
    from app.ml import data

    ds = data.load_builtin("builtin:mnist", mnist_dir=MNIST_DIR)
    s = data.split_dataset(ds, validation_split=VALIDATION_SPLIT, seed=seed)
    return MnistRows(s.x_train, s.y_train, s.x_val, s.y_val)


@dataclass
class TrialRecord:
    """One evaluated trial; times are seconds since the search began (submit or optimize())."""

    number: int
    state: str  # complete | pruned | fail
    value: float | None
    started_s: float
    finished_s: float
    epochs: int | None = None


@dataclass
class SearchResult:
    """A search run: its trials and the summary figures the targets compare."""

    name: str
    budget_s: float
    trials: list[TrialRecord]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def in_budget(self) -> list[TrialRecord]:
        """Trials started inside the budget: the ones optimize(timeout=...) would have run too."""
        return [t for t in self.trials if t.started_s < self.budget_s and t.state in ("complete", "pruned")]

    def summary(self) -> dict[str, Any]:
        trials = self.in_budget()
        values = [t.value for t in trials if t.state == "complete" and t.value is not None]
        return {"name": self.name, "budget_s": self.budget_s, "trials": len(trials),
                "complete": sum(t.state == "complete" for t in trials),
                "pruned": sum(t.state == "pruned" for t in trials),
                "best": max(values) if values else None,
                "time_to_target_s": time_to(trials, TARGET_ACCURACY), "wall_s": round(self.wall_s, 1),
                **self.extra}


def time_to(trials: list[TrialRecord], target: float) -> float | None:
    """Seconds until the first trial that reached `target` had finished; None if none did."""
    hits = [t.finished_s for t in trials if t.state == "complete" and t.value is not None and t.value >= target]
    return round(min(hits), 1) if hits else None


def seconds_since(start: datetime, moment: datetime | str | None) -> float:
    if moment is None:
        return float("nan")
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None and start.tzinfo is not None:
        moment = moment.replace(tzinfo=start.tzinfo)
    return (moment - start).total_seconds()


def write_json(path: str | Path | None, payload: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=_jsonable))


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def machine() -> dict[str, str]:
    """nproc, memory and CPU model, as the report prints them."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout.splitlines()[1]
        mem = " ".join(mem.split()[:2])
    except (OSError, IndexError):
        mem = "unknown"
    import torch

    return {"nproc": str(os.cpu_count()), "memory": mem, "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
