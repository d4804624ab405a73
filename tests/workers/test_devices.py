"""`hpsearch worker --devices`: devices that do not exist stop the worker before it touches the database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.devices import cuda_device_count, resolve_devices

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
