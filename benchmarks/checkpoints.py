"""The cost of checkpointing every epoch: epoch time with and without, and the bytes a checkpoint takes.

Epoch time: the MNIST-10k MLP workload of the other benchmarks (6,400 training rows, a documented mid-size MLP,
Adam, batch 128, one thread) trained for a few epochs, alternately without and with `EpochCheckpointer`
every epoch into a temporary directory; the median epoch of each arm (the hook's time on the training
thread added to its epoch; its write and fsyncs overlap the next epoch) and the median time of one whole
write. Bytes: one checkpoint of the largest documented MLP and CNN on MNIST's shape (weights, best weights,
Adam's two buffers per weight, random states), and the time of writing it.

    python -m benchmarks.checkpoints --rounds 5 --out /tmp/checkpoints.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.ml.networks import build_model
from benchmarks.common import SEED, machine, mnist_rows, write_json
from workers.checkpoints import EpochCheckpointer, list_checkpoints, write_checkpoint
from workers.loop_state import LoopState
from workers.trainer import EpochReport, TrainData, train

WORKLOAD = {"n_layers": 2, "units": 128, "optimizer": "adam", "learning_rate": 1e-3, "batch_size": 128,
            "lr_schedule": "cosine", "dropout": 0.1}
LARGEST = {
    "mlp": {"n_layers": 4, "units": 512, "layer_shape": "constant", "batch_norm": "before_activation",
            "optimizer": "adam"},
    "cnn": {"n_layers": 3, "filters": 128, "kernel_size": 5, "units": 512, "batch_norm": "before_activation",
            "optimizer": "adam"},
}
EPOCHS_PER_ROUND = 3


class TimedCheckpointer(EpochCheckpointer):
    """The production hook, timed on the training thread (the wait for the previous write, the snapshot)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.seconds: list[float] = []

    def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
        started = time.perf_counter()
        super().on_epoch_state(report, state)
        self.seconds.append(time.perf_counter() - started)


def write_seconds(state: LoopState, directory: Path) -> float:
    started = time.perf_counter()
    write_checkpoint(directory, state)
    return time.perf_counter() - started


def _module(params: dict[str, Any], model: str, x: np.ndarray, n_outputs: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_model(params, model=model, input_shape=tuple(x.shape[1:]), n_outputs=n_outputs,
                       mean=x.mean(0), std=x.std(0))


def epoch_cost(rounds: int) -> dict[str, Any]:
    rows = mnist_rows()
    data = TrainData(*(torch.from_numpy(a) for a in (rows.x_train, rows.y_train, rows.x_val, rows.y_val)),
                     task="classification")
    plain: list[float] = []
    with_ckpt: list[float] = []
    hook_s: list[float] = []
    size = 0
    for _ in range(rounds):  # alternate the arms so that other load on the machine hits both alike
        for checkpointing in (False, True):
            module = _module(WORKLOAD, "mlp", rows.x_train, 10)
            with tempfile.TemporaryDirectory() as tmp:
                hook = TimedCheckpointer(Path(tmp)) if checkpointing else None
                result = train(module, data, WORKLOAD, epochs=EPOCHS_PER_ROUND, objective="val_accuracy",
                               direction="maximize", patience=None, seed=SEED, checkpoint=hook)
                if hook is not None:
                    hook.wait()
                    hook_s += hook.seconds
                    size = hook.written[-1].bytes
            # EpochReport.seconds ends before the hook runs: add the hook's time to the epoch it followed.
            seconds = [r.seconds for r in result.history]
            if checkpointing:
                seconds = [s + h for s, h in zip(seconds, hook_s[-len(seconds):], strict=True)]
            (with_ckpt if checkpointing else plain).extend(seconds)
    module = _module(WORKLOAD, "mlp", rows.x_train, 10)
    states: list[LoopState] = []
    train(module, data, WORKLOAD, epochs=1, objective="val_accuracy", direction="maximize", seed=SEED,
          checkpoint=_Keep(states))
    with tempfile.TemporaryDirectory() as tmp:
        writes = [write_seconds(states[0], Path(tmp)) for _ in range(rounds * EPOCHS_PER_ROUND)]
    base, with_ = statistics.median(plain), statistics.median(with_ckpt)
    return {"workload": WORKLOAD, "epochs": len(plain), "median_epoch_s": base,
            "median_epoch_with_checkpoint_s": with_, "overhead_fraction": with_ / base - 1,
            "median_on_training_thread_s": statistics.median(hook_s),
            "median_whole_write_s": statistics.median(writes), "checkpoint_bytes": size}


class _Keep:
    def __init__(self, states: list[LoopState]) -> None:
        self.states = states

    def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
        self.states.append(state())


def checkpoint_bytes() -> dict[str, Any]:
    """One checkpoint of each largest documented model after one Adam step (so its buffers exist)."""
    out = {}
    for model, params in LARGEST.items():
        x = np.random.default_rng(SEED).random((256, 1, 28, 28), dtype=np.float32)
        data = TrainData(torch.from_numpy(x[:128]), torch.arange(128) % 10, torch.from_numpy(x[128:]),
                         torch.arange(128) % 10, task="classification", image=True)
        states: list[LoopState] = []
        module = _module(params, model, x, 10)
        train(module, data, params, epochs=1, objective="val_loss", direction="minimize", checkpoint=_Keep(states))
        with tempfile.TemporaryDirectory() as tmp:
            seconds = write_seconds(states[0], Path(tmp))
            written = list_checkpoints(Path(tmp))[0]
        weights = sum(p.numel() for p in module.parameters())
        out[model] = {"params": params, "weights": weights, "bytes": written.bytes, "write_s": seconds}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"machine": machine(), "epoch_cost": epoch_cost(args.rounds), "largest": checkpoint_bytes()}
    write_json(args.out, result)
    cost = result["epoch_cost"]
    print(f"MNIST-10k MLP epoch {cost['median_epoch_s']:.3f} s, with a checkpoint each epoch "
          f"{cost['median_epoch_with_checkpoint_s']:.3f} s ({cost['overhead_fraction']:+.1%}); on the training "
          f"thread {cost['median_on_training_thread_s'] * 1e3:.1f} ms, a whole write "
          f"{cost['median_whole_write_s'] * 1e3:.1f} ms, {cost['checkpoint_bytes'] / 1e6:.2f} MB")
    for model, r in result["largest"].items():
        print(f"largest {model}: {r['weights']:,} weights, {r['bytes'] / 1e6:.1f} MB per checkpoint, "
              f"written in {r['write_s'] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
