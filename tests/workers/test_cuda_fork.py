"""No CUDA before fork: a supervisor in which CUDA got initialized refuses to fork CUDA runners, naming the
cause (for a plugin, which one); and the production fork path trains on a GPU where one exists.

On the CPU, CUDA cannot be initialized: these tests make `torch.cuda.is_initialized` report what it would
after the step under test ran on a GPU. The `gpu` tests do it for real, in worker processes of their own.
"""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app import plugins
from app.core.config import Settings
from app.core.db import Database
from tests.factories import (
    API,
    client_for,
    create_study_via_api,
    process_env,
    start_worker,
    study_spec,
    wait_for_status,
)
from workers import attempt, devices
from workers.devices import CudaBeforeFork, check_fork_safe, cuda_device_count
from workers.supervisor import Supervisor

SITE = Path(__file__).resolve().parents[1] / "plugin_site"
CUDA_PLUGIN_MODULE = "hpsearch_cudaplugin"  # its import initializes CUDA where there is CUDA
needs_cuda = pytest.mark.skipif(cuda_device_count() == 0, reason="no CUDA device: torch.cuda.is_available() is False")


@pytest.fixture
def cuda_once(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], bool]], None]:
    """Make torch.cuda.is_initialized() answer `when()`, with no culprit remembered from earlier tests."""
    monkeypatch.setattr(devices, "_initialized_by", None)

    def install(when: Callable[[], bool]) -> None:
        monkeypatch.setattr(torch.cuda, "is_initialized", when)

    return install


def test_a_cuda_runner_is_not_forked_once_cuda_is_initialized(cuda_once: Any) -> None:
    slot = SimpleNamespace(mp_context=mp.get_context("fork"))
    cuda_once(lambda: True)
    with pytest.raises(CudaBeforeFork) as refused:
        attempt._spawn(slot, SimpleNamespace(device="cuda:0"))  # type: ignore[arg-type]
    text = str(refused.value)
    assert "CUDA is already initialized in the worker supervisor" in text and "cuda:0" in text
    assert "Cannot re-initialize CUDA in forked subprocess" in text and "must be touched only in runners" in text


def test_cpu_runners_fork_whatever_the_supervisor_did_with_cuda(cuda_once: Any) -> None:
    cuda_once(lambda: True)
    check_fork_safe("cpu")  # a CPU runner never calls CUDA: nothing to refuse
    cuda_once(lambda: False)
    check_fork_safe("cuda:1")


def test_a_plugin_that_initializes_cuda_at_import_is_named_and_the_worker_refuses_to_start(
        settings: Settings, db: Database, cuda_once: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SITE))
    monkeypatch.delitem(sys.modules, CUDA_PLUGIN_MODULE, raising=False)
    monkeypatch.setattr(plugins, "_current", None)
    cuda_once(lambda: CUDA_PLUGIN_MODULE in sys.modules)  # what a GPU would say once the plugin imported
    enabled = settings.model_copy(update={"plugins": ["ownloop", "cudaatimport"]})
    with pytest.raises(CudaBeforeFork) as refused:
        Supervisor(db, enabled, devices=["cuda:0"])
    assert "by model plugin 'cudaatimport' at import" in str(refused.value)
    assert "ownloop" not in str(refused.value)  # imported first, innocent
    # The same plugins on a CPU worker: its runners never call CUDA, so it serves.
    assert Supervisor(db, enabled, devices=["cpu"]).plugins.has(plugins.PluginKind.MODEL, "cudaatimport")


def test_a_worker_whose_cuda_got_initialized_after_it_started_stops_and_the_trial_says_why(
        settings: Settings, db: Database, cuda_once: Any) -> None:
    """The fork itself refuses (a dataset plugin's loader touching CUDA at the claim, say): the attempt ends
    with the reason, and the worker stops serving, since none of its CUDA runners could train."""
    client = client_for(settings, db)
    sid = create_study_via_api(client, study_spec(budget={"n_trials": 1, "epochs": 1, "max_attempts": 2}))
    cuda_once(lambda: False)
    supervisor = Supervisor(db, settings, devices=["cuda:0"])
    cuda_once(lambda: True)  # after the start's check: only the fork can catch it now
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the worker went on serving"
    (trial,) = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert "CudaBeforeFork" in trial["error"] and "refusing to fork a trial runner for cuda:0" in trial["error"]
    assert trial["state"] == "waiting" and trial["attempt"] == 2  # the next worker retries it


def test_without_a_watched_culprit_the_refusal_still_says_where_to_look(cuda_once: Any) -> None:
    cuda_once(lambda: True)
    with pytest.raises(CudaBeforeFork, match="a dataset plugin loading its data"):
        check_fork_safe("cuda:0")


# ---- on CUDA: the production path, in worker processes of their own ---------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_a_worker_forks_cuda_runners_that_train(settings: Settings, db: Database, tmp_path: Path) -> None:
    """`hpsearch worker --devices 0`: the supervisor forks (not spawns) each runner, which trains on the GPU."""
    client = client_for(settings, db)
    sid = create_study_via_api(client, study_spec(budget={"n_trials": 2, "epochs": 2, "max_parallel": 2}))
    worker = start_worker(settings, tmp_path / "worker.log", per_device=2, args=("--devices", "0"))
    try:
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=240)
    finally:
        worker.terminate()
        worker.wait(60)
    trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
    assert study["status"] == "completed", (tmp_path / "worker.log").read_text()[-3000:]
    assert {t["state"] for t in trials} == {"complete"}
    assert {client.get(f"{API}/studies/{sid}/trials/{t['number']}").json()["device"] for t in trials} == {"cuda:0"}


@pytest.mark.gpu
@needs_cuda
def test_a_worker_whose_plugin_initializes_cuda_refuses_to_start_and_names_it(settings: Settings) -> None:
    env = process_env(settings, {"HPSEARCH_PLUGINS": "cudaatimport",
                                 "PYTHONPATH": f"{SITE}:{process_env(settings).get('PYTHONPATH', '')}"})
    done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--devices", "0"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "CudaBeforeFork" in done.stderr and "model plugin 'cudaatimport' at import" in done.stderr
