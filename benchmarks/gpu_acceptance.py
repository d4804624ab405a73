"""The acceptance run of a GPU machine, in one command and one table (within 8 minutes on one GPU):

    python -m benchmarks.gpu_acceptance [--gpu 0] [--out /tmp/acceptance.json]

- gpu tests: the `gpu`-marked tests of the fork path, the devices and the precisions (pytest -m gpu);
- fork path: a worker forks its runners on the GPU, and they train (the first study's trials, on cuda:N);
- trials per hour of the same study one at a time, with the worker's default `--per-device` (the slot rule of
  workers/devices.py) and with `--fuse auto`, each with its GPU utilization through NVML (or nvidia-smi);
  a shortened version of benchmarks/gpu.py and benchmarks/fused.py's comparisons;
- OOM: a runner given less GPU memory than its trial needs, and what it reported;
- fp32, tf32, bf16: the first half of the same trials in each precision (the study's `precision`): seconds
  and best accuracy.

Every study is the documented MLP space on builtin:mnist (builtin:digits where the MNIST files are absent), random
search with one seed (the n-th trial has the same configuration in every run), one batch size (so fused groups
form), no pruning, no early stopping. Studies run through the real service: `hpsearch serve --workers 0` and one
`hpsearch worker` per configuration.

Without a CUDA device it says so and exits 0. `--cpu` runs it end to end on the CPU at tiny sizes, as a check of
the command itself (its numbers say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import MNIST_DIR, ROOT, SEED, seconds_since, write_json
from benchmarks.gpu import UtilizationSampler, trials_per_runner
from benchmarks.harness import Service, running_service

BUDGET_S = 8 * 60
OOM_LIMIT_MB = 300  # what the out-of-memory trial's runner may use, of the host's memory or of its GPU's
GPU_TESTS = ["tests/workers/test_cuda_fork.py", "tests/workers/test_devices.py", "tests/workers/test_precision.py",
             "tests/workers/test_device_paths.py"]


@dataclass
class Sizes:
    dataset: str
    trials: int
    epochs: int
    batch_size: int
    study_timeout_s: float


def sizes(cpu: bool) -> Sizes:
    if cpu:
        return Sizes("builtin:digits", trials=2, epochs=1, batch_size=64, study_timeout_s=120)
    mnist = (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() or (MNIST_DIR / "t10k-images-idx3-ubyte").exists()
    return Sizes("builtin:mnist" if mnist else "builtin:digits", trials=16, epochs=4, batch_size=128,
                 study_timeout_s=100)


@dataclass
class Row:
    check: str
    result: str
    seconds: float | None = None
    trials_per_hour: float | None = None
    best: float | None = None
    gpu: str = ""
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def spec(s: Sizes, name: str, max_parallel: int, precision: str | None = None,
         n_trials: int | None = None) -> dict[str, Any]:
    n = n_trials or s.trials
    out: dict[str, Any] = {
        "name": name, "dataset": s.dataset, "model": "mlp",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "search_space": {"batch_size": s.batch_size}, "sampler": {"name": "random", "seed": SEED},
        "pruner": {"name": "none"},
        "budget": {"n_trials": n, "max_parallel": min(max_parallel, n), "epochs": s.epochs, "patience": None,
                   "max_attempts": 1}}
    if precision is not None:
        out["precision"] = precision
    return out


# ---- the service's workers ---------------------------------------------------------------------------------


def _workers(svc: Service) -> list[dict[str, Any]]:
    return list(svc.http.get("/workers").json()["data"])


@contextmanager
def worker(svc: Service, device: str, *args: str, timeout_s: float = 120.0) -> Iterator[dict[str, Any]]:
    """One `hpsearch worker --devices device *args` while the block runs; yields its registration."""
    known = {w["id"] for w in _workers(svc)}
    with svc.log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--devices", device, *args],
                                env=svc.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not (new := [w for w in _workers(svc) if w["id"] not in known]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not register; see {svc.log}:\n{svc.log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield new[0]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_study(svc: Service, study: dict[str, Any], timeout_s: float,
              sampler: UtilizationSampler | None) -> dict[str, Any]:
    """Submit, wait for every trial and then the study's end; the trials' figures from submit to the last one."""
    submitted = datetime.now(UTC)
    response = svc.http.post("/studies", json=study)
    response.raise_for_status()
    sid = str(response.json()["id"])
    n = study["budget"]["n_trials"]
    deadline = time.monotonic() + timeout_s
    with sampler or nullcontext():
        while svc.study(sid)["progress"]["finished"] < n and time.monotonic() < deadline:
            time.sleep(0.25)
    final = svc.wait(sid, timeout_s=max(30.0, deadline - time.monotonic()), poll_s=0.25)
    trials = [t for t in svc.trials(sid) if t["finished_at"] is not None]
    last = max((seconds_since(submitted, t["finished_at"]) for t in trials), default=float("nan"))
    values = [t["value"] for t in trials if t["state"] == "complete" and t["value"] is not None]
    return {"study": sid, "status": final["status"], "finished": len(trials),
            "failed": sum(t["state"] == "fail" for t in trials),
            "complete": sum(t["state"] == "complete" for t in trials),
            "devices": sorted({str(t["device"]) for t in trials}), "seconds": round(last, 1),
            "trials_per_hour": round(3600 * len(trials) / last, 1) if trials and last > 0 else 0.0,
            "best": max(values) if values else None, "timed_out": len(trials) < n,
            "gpu": sampler.summary() if sampler is not None else None,
            "per_runner": trials_per_runner(svc.log, sid)}


def gpu_text(r: dict[str, Any]) -> str:
    g = r.get("gpu") or {}
    if not g.get("samples"):
        return "-"
    return f"{g['util_mean_pct']}%/{g['util_max_pct']}% {g['memory_max_mib']}MiB"


def study_row(check: str, r: dict[str, Any], note: str = "") -> Row:
    ok = r["status"] == "completed" and not r["failed"] and not r["timed_out"]
    result = "ok" if ok else f"{r['status']}, {r['failed']} failed" + (", timed out" if r["timed_out"] else "")
    return Row(check, result, r["seconds"], r["trials_per_hour"], r["best"], gpu_text(r), note, r)


def throughput_rows(svc: Service, s: Sizes, device: str, gpu: int | None) -> list[Row]:
    """The fork path, then one at a time against the default slots against --fuse auto; then the precisions."""
    rows: list[Row] = []

    def sampler() -> UtilizationSampler | None:
        return UtilizationSampler(gpu) if gpu is not None else None

    with worker(svc, device, "--per-device", "1"):
        one = run_study(svc, spec(s, "one-at-a-time", 1), s.study_timeout_s, sampler())
        fork_ok = one["complete"] > 0 and one["devices"] == [device if gpu is None else f"cuda:{gpu}"]
        rows.append(Row("fork path", "ok" if fork_ok else "FAILED", note=f"forked runners trained on "
                        f"{','.join(one['devices']) or 'nothing'}", data=one))
        rows.append(study_row("1 at a time", one, "fp32 (a CPU)" if gpu is None else
                              "bf16, the default for classification"))
        # After that first study, so that none of them pays the worker's warm-up (the study's data, its split).
        half = max(2, s.trials // 2)  # the first half of the same trials: three runs fit the time
        precisions = {p: run_study(svc, spec(s, f"precision-{p}", 1, p, half), s.study_timeout_s, None)
                      for p in (("fp32", "bf16") if gpu is None else ("fp32", "tf32", "bf16"))}
        base = precisions["fp32"]["seconds"]
        for precision, r in precisions.items():
            speed = f"{base / r['seconds']:.2f}x fp32's speed" if r["seconds"] else ""
            note = speed + ("; a CPU trains in fp32 whatever the choice" if gpu is None else "")
            rows.append(study_row(f"precision {precision}", r, note))
    with worker(svc, device) as registered:  # no --per-device: the slot rule
        per_device = int(registered["slots"])
        shared = run_study(svc, spec(s, "per-device", per_device), s.study_timeout_s, sampler())
        rows.append(study_row(f"--per-device {per_device}", shared, f"the default rule; "
                              f"{_ratio(shared, one)} the trials/h of 1 at a time"))
    with worker(svc, device, "--per-device", "1", "--fuse", "auto"):
        fused = run_study(svc, spec(s, "fuse-auto", s.trials), s.study_timeout_s, sampler())
        rows.append(study_row("--fuse auto", fused, f"{fused['per_runner'] or '-'} trials per runner; "
                              f"{_ratio(fused, one)} the trials/h of 1 at a time"))
    return rows


def _ratio(r: dict[str, Any], base: dict[str, Any]) -> str:
    return f"{r['trials_per_hour'] / base['trials_per_hour']:.2f}x" if base["trials_per_hour"] else "-"


# ---- an out-of-memory trial --------------------------------------------------------------------------------


def _starved_runner(conn: Any, job: Any, gpu_bytes: int) -> None:
    """A runner allowed `gpu_bytes` of its GPU (the CPU's limit is the job's own memory_limit_mb)."""
    if job.device.startswith("cuda"):
        import torch

        torch.cuda.set_per_process_memory_fraction(gpu_bytes / torch.cuda.get_device_properties(job.device)
                                                   .total_memory, torch.device(job.device))
    from workers.runner import runner_main

    runner_main(conn, job)


def oom_row(device: str, cpu: bool, tmp: Path) -> Row:
    """A trial too big for what its runner may use: the same runner code as every trial, forked the same way."""
    import numpy as np

    from app.ml.artifacts import ModelSpec
    from workers.protocol import Failed

    rng = np.random.default_rng(0)
    n, width = 512, 64
    x = rng.normal(size=(n, width)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    # 8 layers of 4096 units: 0.5 GB of weights, twice that with Adam's state; the runner may use 300 MiB.
    params = {"n_layers": 8, "units": 4096, "layer_shape": "constant", "optimizer": "adam", "learning_rate": 1e-3,
              "batch_size": 256}
    model = ModelSpec("mlp", params, "classification", (width,), 10, None, [str(i) for i in range(10)],
                      [0.0] * width, [1.0] * width)
    from workers.runner import RunnerJob, RunnerTrial, warm_imports

    warm_imports()  # as a supervisor does before it forks: the runner imports nothing under its limit
    trial = RunnerTrial(trial=1, spec=model, seed=0, artifact_path=str(tmp / "oom"))
    job = RunnerJob(trials=[trial], x_train=x, y_train=y, x_val=x[:64], y_val=y[:64], epochs=1, patience=None,
                    objective="val_accuracy", direction="maximize", device=device, threads=1,
                    memory_limit_mb=OOM_LIMIT_MB if cpu else 0)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    started = time.perf_counter()
    proc = ctx.Process(target=_starved_runner, args=(child, job, OOM_LIMIT_MB * 2**20), daemon=True)
    proc.start()
    child.close()
    message = parent.recv() if parent.poll(120) else None
    proc.join(30)
    seconds = round(time.perf_counter() - started, 1)
    if isinstance(message, Failed) and message.failure.value == "out_of_memory":
        return Row("OOM provoked", "ok", seconds, note=f"the runner reported Failed({message.failure.value}) "
                   f"and exited with {proc.exitcode}; {message.reason}",
                   data={"failure": message.failure.value, "exit": proc.exitcode})
    return Row("OOM provoked", "FAILED", seconds, note=f"runner answered {message!r}, exit {proc.exitcode}")


# ---- the gpu-marked tests ----------------------------------------------------------------------------------


def gpu_tests_row(cpu: bool) -> Row:
    if cpu:
        return Row("gpu tests", "not run", note="--cpu: they need a CUDA device")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu and not postgres", "-q", "-p",
                           "no:cacheprovider", *GPU_TESTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary))
    ok = done.returncode == 0 and counts.get("passed", 0) > 0
    return Row("gpu tests", "ok" if ok else "FAILED", round(time.perf_counter() - started, 1),
               note=summary.strip("= "), data={"counts": counts, "tail": done.stdout[-3000:]})


# ---- the table ---------------------------------------------------------------------------------------------


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print(f"{'check':<18} {'result':<10} {'seconds':>8} {'trials/h':>9} {'best acc':>9} "
          f"{'gpu util mean/max, memory':<26} note")
    for r in rows:
        best = f"{r.best:.4f}" if r.best is not None else "-"
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        tph = f"{r.trials_per_hour:.0f}" if r.trials_per_hour is not None else "-"
        print(f"{r.check:<18} {r.result:<10} {seconds:>8} {tph:>9} {best:>9} {r.gpu or '-':<26} {r.note}")


def cuda_skip_reason() -> str | None:
    from workers.devices import cuda_device_count

    return None if cuda_device_count() else "no CUDA device (torch.cuda.is_available() is False in a probe)"


def run(cpu: bool, gpu: int) -> tuple[list[Row], str]:
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # NVML's numbering, as the worker's
    s = sizes(cpu)
    device = "cpu" if cpu else str(gpu)
    started = time.monotonic()
    rows = [gpu_tests_row(cpu)]
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"} if cpu else {}
    with running_service(slots=0, **env) as svc:
        rows += throughput_rows(svc, s, "cpu" if cpu else device, None if cpu else gpu)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows.append(oom_row("cpu" if cpu else f"cuda:{gpu}", cpu, Path(tmp)))
    took = time.monotonic() - started
    header = (f"GPU acceptance on {'the CPU (--cpu: a check of the command)' if cpu else f'cuda:{gpu}'}: "
              f"{s.dataset}, {s.trials} trials of {s.epochs} epoch(s), batch {s.batch_size}; "
              f"{took:.0f} s in all (budget {BUDGET_S} s)")
    return rows, header


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="index of the GPU to use (NVML's and nvidia-smi's)")
    parser.add_argument("--cpu", action="store_true", help="run everything on the CPU at tiny sizes")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not args.cpu and (reason := cuda_skip_reason()):
        print(f"skipped: {reason}; `--cpu` checks the command on the CPU")
        write_json(args.out, {"skipped": reason})
        return 0
    rows, header = run(args.cpu, args.gpu)
    print_table(rows, header)
    write_json(args.out, {"header": header, "rows": rows})
    return 0 if all(r.result in ("ok", "not run") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
