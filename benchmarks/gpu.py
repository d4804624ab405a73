"""GPU: several trials sharing one GPU (`--per-device N`) against one trial at a time, through the service.

Both runs are the same study on one GPU: the documented MLP space on builtin:mnist, random search with seed 0
(the n-th trial gets the same configuration in both runs, so both do the same work), no pruning, no early
stopping, a fixed number of trials. `hpsearch serve --workers N` gives its embedded worker N slots on each
GPU it sees; CUDA_VISIBLE_DEVICES keeps it to one. Trials per hour run from the submit to the last trial's
end (the study's test evaluation afterwards is not counted); GPU utilization and memory are sampled through
NVML (pynvml, from nvidia-ml-py) or else `nvidia-smi` over the same interval. The target is at least 8x the
trials per hour of the sequential run.

Without a CUDA device it prints why it skipped and exits 0. `--cpu` runs the same comparison on the CPU,
which checks the benchmark itself (no utilization is sampled).

    python -m benchmarks.gpu --per-device 8 --trials 48 --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks.common import EPOCHS, SEED, write_json
from benchmarks.harness import running_service

TARGET_RATIO = 8.0
SAMPLE_EVERY_S = 0.5


def gpu_spec(n_trials: int, max_parallel: int, epochs: int, batch_size: int | None = None) -> dict[str, Any]:
    spec = {"name": f"bench-gpu-{max_parallel}", "dataset": "builtin:mnist", "model": "mlp",
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "sampler": {"name": "random", "seed": SEED}, "pruner": {"name": "none"},
            "budget": {"n_trials": n_trials, "max_parallel": max_parallel, "epochs": epochs, "patience": None,
                       "max_attempts": 1}}
    if batch_size is not None:
        spec["search_space"] = {"batch_size": batch_size}
    return spec


def cuda_skip_reason() -> str | None:
    """Why the GPU benchmark cannot run here, or None when a CUDA device is available."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


class UtilizationSampler:
    """GPU utilization (%) and memory used (MiB) of one GPU, read every SAMPLE_EVERY_S in a thread."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.util: list[float] = []
        self.memory_mib: list[float] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="gpu-sampler")
        self._read = self._reader()

    def _reader(self) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "nvml"

            def nvml() -> tuple[float, float]:
                return (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)

            return nvml
        except Exception:  # noqa: BLE001 - no NVML bindings or library: fall back to nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        self.source = "nvidia-smi"

        def smi() -> tuple[float, float]:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits", "-i", str(self.index)],
                                 capture_output=True, text=True, check=True, timeout=10).stdout
            util, mem = out.strip().splitlines()[0].split(",")
            return float(util), float(mem)

        return smi

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                util, mem = self._read()
            except Exception:  # noqa: BLE001 - a missed sample is no reason to stop the benchmark
                continue
            self.util.append(util)
            self.memory_mib.append(mem)

    def __enter__(self) -> UtilizationSampler:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def summary(self) -> dict[str, Any]:
        if not self.util:
            return {"source": self.source, "samples": 0}
        return {"source": self.source, "samples": len(self.util),
                "util_mean_pct": round(sum(self.util) / len(self.util), 1), "util_max_pct": max(self.util),
                "memory_max_mib": round(max(self.memory_mib))}


def trials_per_runner(log: Path, study_id: str) -> float | None:
    """Mean trials a runner process trained in this study, from the service's log (the harness logs text:
    each 'trial started' line names its runner): 1 without fusion, the mean group size with it."""
    started = re.compile(rf"trial started.*study_id={study_id} .*runner=(\d+)")
    runners = Counter(m.group(1) for line in log.read_text().splitlines() if (m := started.search(line)))
    return round(sum(runners.values()) / len(runners), 2) if runners else None


def run_one(slots: int, n_trials: int, epochs: int, gpu: int, cpu: bool, timeout_s: float = 3600.0,
            fuse: str = "1", batch_size: int | None = None) -> dict[str, Any]:
    """One study with `slots` runners on one device (each fusing up to `fuse` trials: `hpsearch serve --fuse`);
    trials per hour until its last trial ended."""
    # One GPU only; on the CPU sleeping OpenMP threads, or a one-slot trial's two threads spin against
    # whatever else runs and the sequential run looks many times slower than it is.
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"} if cpu else {"CUDA_VISIBLE_DEVICES": str(gpu)}
    with running_service(slots=slots, fuse=fuse, **env) as svc:
        sampler = UtilizationSampler(gpu) if not cpu else None
        # A fusing slot claims as many trials at once as max_parallel allows.
        study_id, submitted = svc.submit(gpu_spec(n_trials, slots if fuse == "1" else n_trials, epochs, batch_size))
        deadline = time.monotonic() + timeout_s
        with sampler or nullcontext():
            while svc.study(study_id)["progress"]["finished"] < n_trials and time.monotonic() < deadline:
                time.sleep(0.5)
        study = svc.wait(study_id, timeout_s=max(60.0, deadline - time.monotonic()))
        result = svc.result(f"{slots} per device", study_id, submitted, float("inf"), 0.0)
        devices = sorted({str(t["device"]) for t in svc.trials(study_id)})
        per_runner = trials_per_runner(svc.log, study_id)
    finished = [t for t in result.trials if t.state in ("complete", "pruned", "fail")]
    values = [t.value for t in finished if t.state == "complete" and t.value is not None]
    last = max((t.finished_s for t in finished), default=float("nan"))
    out = {"slots": slots, "fuse": fuse, "n_trials": n_trials, "finished": len(finished),
           "failed": sum(t.state == "fail" for t in finished), "devices": devices, "seconds": round(last, 1),
           "trials_per_hour": round(3600 * len(finished) / last, 1) if finished else 0.0,
           "best_val_accuracy": max(values) if values else None, "status": study["status"],
           "trials_per_runner": per_runner}
    if sampler is not None:
        out["gpu"] = sampler.summary()
    return out


def run(per_device: int, n_trials: int, epochs: int, gpu: int, cpu: bool) -> dict[str, Any]:
    sequential = run_one(1, n_trials, epochs, gpu, cpu)
    shared = run_one(per_device, n_trials, epochs, gpu, cpu)
    ratio = shared["trials_per_hour"] / sequential["trials_per_hour"] if sequential["trials_per_hour"] else None
    return {"device": "cpu" if cpu else f"cuda:{gpu}", "sequential": sequential, "shared": shared,
            "ratio": round(ratio, 2) if ratio is not None else None, "target_ratio": TARGET_RATIO}


def print_runs(runs: dict[str, dict[str, Any]]) -> None:
    """One line per run of `run_one`: trials, trials per hour, best accuracy, trials per runner, the GPU's use."""
    print(f"{'run':<16} {'trials':>7} {'seconds':>8} {'trials/h':>9} {'best acc':>9} {'per runner':>10}  "
          "gpu util (mean/max), memory")
    for name, r in runs.items():
        g = r.get("gpu") or {}
        util = f"{g['util_mean_pct']}% / {g['util_max_pct']}%, {g['memory_max_mib']} MiB" if g.get("samples") \
            else "not sampled"
        best = f"{r['best_val_accuracy']:.4f}" if r["best_val_accuracy"] is not None else "-"
        print(f"{name:<16} {r['finished']:>7} {r['seconds']:>8} {r['trials_per_hour']:>9} {best:>9} "
              f"{r['trials_per_runner'] or '-':>10}  {util}")


def print_table(result: dict[str, Any]) -> None:
    print_runs({f"{result[key]['slots']} per device": result[key] for key in ("sequential", "shared")})
    print(f"ratio {result['ratio']} (target {TARGET_RATIO}) on {result['device']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-device", type=int, default=8, help="trials sharing the GPU in the second run")
    parser.add_argument("--trials", type=int, default=48, help="trials of each run")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--gpu", type=int, default=0, help="index of the GPU to use")
    parser.add_argument("--cpu", action="store_true", help="run the comparison on the CPU (checks the benchmark)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.per_device < 1 or args.trials < 1 or args.epochs < 1:
        parser.error("--per-device, --trials and --epochs must be at least 1")
    if not args.cpu and (reason := cuda_skip_reason()):
        print(f"skipped: {reason}")
        write_json(args.out, {"skipped": reason})
        return 0
    result = run(args.per_device, args.trials, args.epochs, args.gpu, args.cpu)
    print_table(result)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
