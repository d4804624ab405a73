"""`python -m benchmarks.gpu_acceptance`: `--cpu` runs the whole command on the CPU at tiny sizes (a check of
the command, not of a GPU); without a GPU and without `--cpu` it says so and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from workers.devices import cuda_device_count

ROWS = ["gpu tests", "fork path", "1 at a time", "precision fp32", "precision bf16", "--per-device 2",
        "--fuse auto", "OOM provoked"]


def acceptance(*args: str, timeout_s: float = 280) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_the_acceptance_command_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "acceptance.json"
    done = acceptance("--cpu", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("GPU acceptance on the CPU (--cpu: a check of the command)")
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ROWS
    assert rows["gpu tests"]["result"] == "not run"
    assert all(rows[name]["result"] == "ok" for name in ROWS[1:]), rows
    for name in ("1 at a time", "--per-device 2", "--fuse auto", "precision fp32", "precision bf16"):
        assert rows[name]["data"]["complete"] == 2 and rows[name]["trials_per_hour"] > 0
    assert rows["fork path"]["data"]["devices"] == ["cpu"]
    assert rows["OOM provoked"]["data"] == {"failure": "out_of_memory", "exit": 0}
    assert all(any(line.startswith(name) for line in lines) for name in ROWS)  # one table, a line per check


@pytest.mark.skipif(cuda_device_count() > 0, reason="a CUDA device is present: the command would run on it")
def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    done = acceptance(timeout_s=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("skipped: no CUDA device") and "--cpu" in done.stdout
