"""Checkpoints: a trial stopped at an epoch boundary and resumed from disk ends as if never stopped; writes
are atomic; unusable files are refused with a typed reason."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from app.ml.networks import build_model
from tests.conftest import ROOT
from workers import trainer
from workers.checkpoints import (
    CheckpointUnusable,
    EpochCheckpointer,
    Unusable,
    checkpoint_name,
    directory_bytes,
    latest_usable,
    list_checkpoints,
    read_checkpoint,
    remove_temporaries,
    write_checkpoint,
)
from workers.checkpoints.encoding import EncodingError, flatten, unflatten
from workers.loop_state import LoopState, capture_rng, restore_rng
from workers.trainer import EpochReport, TrainData, TrainResult, make_optimizer, train

EPOCHS, STOP_AT = 8, 3
TOL = 1e-6


def blobs(seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(200) % 3
    x = torch.randn(3, 6, generator=g)[y] * 2 + torch.randn(200, 6, generator=g)
    return TrainData(x[:150], y[:150], x[150:], y[150:], task="classification")


def images(seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(96, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean(dim=(1, 2)) > x[:, 0, 4:].mean(dim=(1, 2))).long()
    return TrainData(x[:64], y[:64], x[64:], y[64:], task="classification", image=True)


def model_for(data: TrainData, params: dict[str, Any], model: str = "mlp", seed: int = 0) -> nn.Module:
    x = data.x_train.numpy()
    torch.manual_seed(seed)
    return build_model(params, model=model, input_shape=tuple(x.shape[1:]), n_outputs=int(data.y_train.max()) + 1,
                       mean=x.mean(0), std=x.std(0))


class WriteEveryEpoch:
    """Keeps every epoch's checkpoint (the production hook keeps only the newest)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
        write_checkpoint(self.directory, state(), identity={"model": "mlp"})


class StopAt:
    """Ends training after `epoch`, as a killed runner would have."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, report: EpochReport) -> bool:
        return report.epoch >= self.epoch


def scramble_global_rngs() -> None:
    """What a fresh process would have: different global random states."""
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def assert_same_run(a: TrainResult, b: TrainResult, module_a: nn.Module, module_b: nn.Module) -> None:
    assert (a.epochs_run, a.best_epoch, a.stop_reason) == (b.epochs_run, b.best_epoch, b.stop_reason)
    assert [r.epoch for r in a.history] == [r.epoch for r in b.history]
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra.train_loss == pytest.approx(rb.train_loss, abs=TOL)
        assert ra.val_loss == pytest.approx(rb.val_loss, abs=TOL)
        assert ra.learning_rate == pytest.approx(rb.learning_rate, abs=TOL)
        assert ra.metrics == pytest.approx(rb.metrics, abs=TOL)
    assert a.best_metrics == pytest.approx(b.best_metrics, abs=TOL)
    for (ka, va), (kb, vb) in zip(module_a.state_dict().items(), module_b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, atol=TOL, rtol=0)


# ---- deterministic resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("data_fn,model,params", [
    (blobs, "mlp", {"optimizer": "adam", "lr_schedule": "cosine", "learning_rate": 0.01}),
    (blobs, "mlp", {"optimizer": "momentum", "lr_schedule": "step", "learning_rate": 0.05}),
    (blobs, "mlp", {"optimizer": "rmsprop", "lr_schedule": "plateau", "learning_rate": 0.01}),
    (images, "cnn", {"optimizer": "adamw", "lr_schedule": "cosine", "augmentation": "light",
                     "learning_rate": 0.01, "filters": 4}),
], ids=["adam-cosine", "momentum-step", "rmsprop-plateau", "cnn-augmented"])
def test_resumed_run_equals_uninterrupted(tmp_path: Path, data_fn: Callable[[], TrainData], model: str,
                                          params: dict[str, Any]) -> None:
    params = {"n_layers": 2, "units": 16, "dropout": 0.3, "batch_size": 16, **params}
    data = data_fn()
    run: dict[str, Any] = {"epochs": EPOCHS, "objective": "val_loss", "direction": "minimize", "patience": None,
                           "seed": 7}

    whole_model = model_for(data, params, model)
    whole = train(whole_model, data, params, **run)

    killed_model = model_for(data, params, model)
    hook = EpochCheckpointer(tmp_path, identity={"model": model})
    killed = train(killed_model, data, params, **run, callbacks=[StopAt(STOP_AT)], checkpoint=hook)
    assert killed.epochs_run == STOP_AT and hook.wait() is not None
    assert [c.epoch for c in list_checkpoints(tmp_path)] == [STOP_AT]

    scramble_global_rngs()
    fresh = model_for(data, params, model, seed=99)  # other initial weights: the checkpoint's must win
    state = read_checkpoint(tmp_path / checkpoint_name(STOP_AT), module=fresh, identity={"model": model})
    resumed = train(fresh, data, params, **run, resume_from=state)

    assert_same_run(whole, resumed, whole_model, fresh)


@pytest.mark.parametrize("optimizer,schedule", [("momentum", "cosine"), ("adamw", "step")])
def test_a_resume_with_explored_values_trains_on_with_them(tmp_path: Path, optimizer: str, schedule: str) -> None:
    """PBT's explore: the checkpoint's weights and optimizer state, with the learning rate (scaled along its
    schedule), weight decay and momentum in force from the next epoch on."""
    params = {"n_layers": 1, "units": 16, "dropout": 0.2, "batch_size": 16, "optimizer": optimizer,
              "lr_schedule": schedule, "learning_rate": 0.01, "weight_decay": 1e-4, "momentum": 0.9}
    data = blobs()
    run: dict[str, Any] = {"epochs": EPOCHS, "objective": "val_loss", "direction": "minimize", "patience": None,
                           "seed": 7}
    whole = train(model_for(data, params), data, params, **run)
    train(model_for(data, params), data, params, **run, callbacks=[StopAt(STOP_AT)],
          checkpoint=WriteEveryEpoch(tmp_path))
    explored = {**params, "learning_rate": 0.03, "weight_decay": 1e-3, "momentum": 0.5, "dropout": 0.1}
    fresh = model_for(data, explored)
    state = read_checkpoint(tmp_path / checkpoint_name(STOP_AT), module=fresh)
    made: list[torch.optim.Optimizer] = []

    def keep(*args: Any) -> torch.optim.Optimizer:
        made.append(make_optimizer(*args))
        return made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "make_optimizer", keep)
        resumed = train(fresh, data, explored, **run, resume_from=state)

    later = [r for r in resumed.history if r.epoch > STOP_AT]
    assert [r.epoch for r in later] == list(range(STOP_AT + 1, EPOCHS + 1))
    for mine, theirs in zip(later, whole.history[STOP_AT:], strict=True):  # 3x the uninterrupted schedule
        assert mine.learning_rate == pytest.approx(3 * theirs.learning_rate, rel=1e-6)
    expected_momentum = 0.5 if optimizer == "momentum" else 0.0
    group = made[0].param_groups[0]
    assert (group["weight_decay"], group.get("momentum", 0.0)) == (1e-3, expected_momentum)
    assert [m.p for m in fresh.modules() if isinstance(m, nn.Dropout)] == [0.1]


def test_resume_keeps_best_so_far_and_early_stopping_counter(tmp_path: Path) -> None:
    """Random labels: validation loss gets worse, so the best epoch is early and patience runs out."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(120, 10, generator=g), torch.randint(0, 2, (120,), generator=g)
    data = TrainData(x[:80], y[:80], x[80:], y[80:], task="classification")
    params = {"n_layers": 2, "units": 64, "optimizer": "adam", "learning_rate": 0.02, "dropout": 0.1}
    run: dict[str, Any] = {"epochs": 30, "objective": "val_loss", "direction": "minimize", "patience": 3, "seed": 0}

    whole_model = model_for(data, params)
    whole = train(whole_model, data, params, **run, checkpoint=WriteEveryEpoch(tmp_path))
    assert whole.stop_reason == "early_stopping" and whole.best_epoch < whole.epochs_run

    # From an epoch after the best one (the counter is running) and from the very epoch it stopped at.
    for epoch in (whole.best_epoch + 1, whole.epochs_run):
        scramble_global_rngs()
        fresh = model_for(data, params, seed=5)
        state = read_checkpoint(tmp_path / checkpoint_name(epoch), module=fresh)
        assert state.epochs_since_best == epoch - whole.best_epoch
        resumed = train(fresh, data, params, **run, resume_from=state)
        assert_same_run(whole, resumed, whole_model, fresh)


def test_random_states_round_trip_through_a_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    data = blobs()
    module = model_for(data, {"n_layers": 1, "units": 4})
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    state = LoopState(epoch=1, params={}, model=module.state_dict(), optimizer=optimizer.state_dict(),
                      scheduler=None, best_epoch=0, best_value=None, best_metrics={},
                      best_model=module.state_dict(), rng=capture_rng(generator))

    def draws() -> list[float]:
        return [float(torch.rand(1)), float(np.random.rand()), random.random(), np.random.randn(),
                random.gauss(0, 1), float(torch.rand(1, generator=generator))]

    expected = draws()
    scramble_global_rngs()
    generator.manual_seed(999)
    path = write_checkpoint(tmp_path, state).path
    restore_rng(read_checkpoint(path).rng, generator)
    assert draws() == expected


# ---- the file: atomic, strict JSON, validated ---------------------------------------------------------


def small_state(tmp_path: Path, epoch: int = 1, units: int = 8) -> tuple[LoopState, nn.Module]:
    """A real LoopState captured by the trainer after `epoch` epochs."""
    data = blobs()
    params = {"n_layers": 1, "units": units, "optimizer": "adam", "lr_schedule": "plateau"}
    module = model_for(data, params)
    states: list[LoopState] = []

    class Keep:
        def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
            states.append(state())

    train(module, data, params, epochs=epoch, objective="val_accuracy", direction="maximize", checkpoint=Keep())
    return states[-1], module


def test_checkpoint_is_safetensors_with_a_strict_json_header(tmp_path: Path) -> None:
    state, module = small_state(tmp_path)
    written = write_checkpoint(tmp_path, state, identity={"plugin": "acme", "plugin_version": "1.0"})
    assert written.bytes == written.path.stat().st_size == directory_bytes(tmp_path)

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    with safe_open(str(written.path), framework="pt") as f:
        doc = json.loads(f.metadata()["hpsearch.checkpoint"], parse_constant=no_constants)
        n_tensors = len(list(f.keys()))
    # ReduceLROnPlateau keeps an infinite mode_worse: stored tagged, read back as a float.
    assert doc["scheduler"]["mode_worse"] == {"__float__": "inf"}
    assert doc["identity"] == {"plugin": "acme", "plugin_version": "1.0"}
    assert n_tensors >= 2 * len(module.state_dict())
    back = read_checkpoint(written.path, module=module, identity={"plugin": "acme", "plugin_version": "1.0"})
    assert back.optimizer["param_groups"][0]["betas"] == state.optimizer["param_groups"][0]["betas"]
    assert isinstance(back.optimizer["param_groups"][0]["betas"], tuple)
    assert back.scheduler == state.scheduler and back.scheduler is not None
    assert back.scheduler["mode_worse"] == float("inf")


def test_best_weights_equal_to_the_current_ones_are_stored_once(tmp_path: Path) -> None:
    state, module = small_state(tmp_path, epoch=1)  # the first epoch always improves
    assert state.best_epoch == state.epoch
    once = write_checkpoint(tmp_path / "same", state)
    older_best = {k: v + 1 if v.is_floating_point() else v for k, v in state.best_model.items()}
    twice = write_checkpoint(tmp_path / "apart", dataclasses.replace(state, best_model=older_best))
    weight_bytes = sum(v.numel() * v.element_size() for v in state.model.values())
    assert twice.bytes - once.bytes >= weight_bytes

    back = read_checkpoint(once.path, module=module)
    for k, v in state.model.items():
        assert torch.equal(back.best_model[k], v) and torch.equal(back.model[k], v)
    apart = read_checkpoint(twice.path, module=module)
    assert all(torch.equal(apart.best_model[k], v) for k, v in older_best.items())


def test_nested_structure_round_trips_exactly() -> None:
    value = {"state": {0: {"step": torch.tensor(3.0), "buf": torch.ones(2)}}, "t": (1, 2.5, None),
             "inf": float("-inf"), "nested": [{"__tensor__": "not a tag"}], "flag": True}
    tensors: dict[str, Tensor] = {}
    back = unflatten(json.loads(json.dumps(flatten(value, "x", tensors), allow_nan=False)), tensors)
    assert list(back["state"]) == [0] and back["t"] == (1, 2.5, None) and back["inf"] == float("-inf")
    assert back["nested"] == [{"__tensor__": "not a tag"}] and back["flag"] is True
    torch.testing.assert_close(back["state"][0]["buf"], torch.ones(2))
    with pytest.raises(EncodingError, match="without pickle"):
        flatten({"f": object()}, "x", {})


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    first, module = small_state(tmp_path, epoch=1)
    second, _ = small_state(tmp_path, epoch=2)
    write_checkpoint(tmp_path, first)
    # A crash after part of the next checkpoint reached its temporary name, before the rename.
    whole = write_checkpoint(tmp_path / "elsewhere", second).path.read_bytes()
    partial = tmp_path / f".{checkpoint_name(2)}.4242.deadbeef.tmp"
    partial.write_bytes(whole[:len(whole) // 2])

    assert [c.epoch for c in list_checkpoints(tmp_path)] == [1]
    state, skipped = latest_usable(tmp_path, module=module)
    assert state is not None and state.epoch == 1 and skipped == []
    assert directory_bytes(tmp_path) == (tmp_path / checkpoint_name(1)).stat().st_size + len(whole) // 2
    assert remove_temporaries(tmp_path) == [partial]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [checkpoint_name(1)]


def test_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state, module = small_state(tmp_path, epoch=1)
    write_checkpoint(tmp_path, state)
    before = (tmp_path / checkpoint_name(1)).read_bytes()

    def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("workers.checkpoints.files.os.replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(1)]
    assert (tmp_path / checkpoint_name(1)).read_bytes() == before


def test_truncated_checkpoint_is_unusable_and_the_previous_one_is_used(tmp_path: Path) -> None:
    first, module = small_state(tmp_path, epoch=1)
    second, _ = small_state(tmp_path, epoch=2)
    write_checkpoint(tmp_path, first)
    newest = write_checkpoint(tmp_path, second).path
    newest.write_bytes(newest.read_bytes()[:-100])

    with pytest.raises(CheckpointUnusable) as caught:
        read_checkpoint(newest, module=module)
    assert caught.value.reason is Unusable.CORRUPT
    state, skipped = latest_usable(tmp_path, module=module)
    assert state is not None and state.epoch == 1
    assert [(c.epoch, e.reason) for c, e in skipped] == [(2, Unusable.CORRUPT)]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x08" + b"\x00" * 7 + b"{}"])
def test_garbage_is_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / checkpoint_name(1)
    path.write_bytes(content)
    with pytest.raises(CheckpointUnusable) as caught:
        read_checkpoint(path)
    assert caught.value.reason is Unusable.CORRUPT


def test_a_random_state_that_is_not_bytes_is_corrupt(tmp_path: Path) -> None:
    state, _ = small_state(tmp_path)
    path = write_checkpoint(tmp_path, dataclasses.replace(
        state, rng=dataclasses.replace(state.rng, torch_cpu=torch.zeros(5)))).path
    with pytest.raises(CheckpointUnusable, match="byte tensors") as caught:
        read_checkpoint(path)
    assert caught.value.reason is Unusable.CORRUPT


def test_missing_checkpoint_is_unusable(tmp_path: Path) -> None:
    with pytest.raises(CheckpointUnusable) as caught:
        read_checkpoint(tmp_path / checkpoint_name(4))
    assert caught.value.reason is Unusable.MISSING
    assert latest_usable(tmp_path / "nowhere") == (None, [])


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    state, _ = small_state(tmp_path, units=8)
    path = write_checkpoint(tmp_path, state).path
    _, wider = small_state(tmp_path / "other", units=12)
    with pytest.raises(CheckpointUnusable) as caught:
        read_checkpoint(path, module=wider)
    assert caught.value.reason is Unusable.SHAPES
    assert "(8," in str(caught.value) and "(12," in str(caught.value)

    deeper = model_for(blobs(), {"n_layers": 2, "units": 8})
    with pytest.raises(CheckpointUnusable, match="shape_mismatch: weights: missing"):
        read_checkpoint(path, module=deeper)


def test_optimizer_state_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    state, module = small_state(tmp_path)
    first_id = state.optimizer["param_groups"][0]["params"][0]
    buffers = dict(state.optimizer["state"][first_id], exp_avg=torch.zeros(3, 3))
    broken = LoopState(**{**vars(state), "optimizer": {**state.optimizer,
                                                       "state": {**state.optimizer["state"], first_id: buffers}}})
    path = write_checkpoint(tmp_path, broken).path
    with pytest.raises(CheckpointUnusable, match="optimizer buffer 'exp_avg'") as caught:
        read_checkpoint(path, module=module)
    assert caught.value.reason is Unusable.SHAPES


def test_a_changed_plugin_version_is_refused(tmp_path: Path) -> None:
    state, module = small_state(tmp_path)
    path = write_checkpoint(tmp_path, state, identity={"plugin": "acme", "plugin_version": "1.0"}).path
    with pytest.raises(CheckpointUnusable, match="plugin_version '1.0' in the checkpoint, '1.1' now") as caught:
        read_checkpoint(path, module=module, identity={"plugin": "acme", "plugin_version": "1.1"})
    assert caught.value.reason is Unusable.IDENTITY


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / checkpoint_name(1)
    save_file({"x": torch.zeros(1)}, path, metadata={"hpsearch.checkpoint": json.dumps({"format": 99})})
    with pytest.raises(CheckpointUnusable, match="format 99") as caught:
        read_checkpoint(path)
    assert caught.value.reason is Unusable.FORMAT


# ---- the hook ----------------------------------------------------------------------------------------


def test_hook_writes_every_n_epochs_records_then_drops_older(tmp_path: Path) -> None:
    data = blobs()
    params = {"n_layers": 1, "units": 8}
    seen: list[tuple[int, list[int]]] = []

    def record(written: Any) -> None:  # the database record: the previous checkpoint still exists
        seen.append((written.epoch, [c.epoch for c in list_checkpoints(tmp_path)]))

    hook = EpochCheckpointer(tmp_path, every=2, on_written=record)
    train(model_for(data, params), data, params, epochs=7, objective="val_loss", direction="minimize",
          patience=None, checkpoint=hook)
    assert seen[:2] == [(2, [2]), (4, [2, 4])]  # the write of epoch 6 may still be under way
    assert hook.wait() == hook.written[-1] and hook.wait() == hook.written[-1]
    assert seen == [(2, [2]), (4, [2, 4]), (6, [4, 6])]
    assert [c.epoch for c in list_checkpoints(tmp_path)] == [6]
    assert [c.epoch for c in hook.written] == [2, 4, 6]


def test_a_finished_write_is_recorded_at_the_next_epoch_boundary_not_the_next_checkpoint(tmp_path: Path) -> None:
    """With checkpoint_every 2, epoch 2's checkpoint is recorded at epoch 3 once it is on disk: a death at
    epoch 4 then trains 2 epochs again, not 3."""
    data = blobs()
    params = {"n_layers": 1, "units": 8}
    seen: list[int] = []

    class WrittenByNextEpoch(EpochCheckpointer):
        def on_epoch_state(self, report: EpochReport, state: Callable[[], LoopState]) -> None:
            if self._writer is not None:
                self._writer.result()  # the write of epoch 2 is on disk by the end of epoch 3
            super().on_epoch_state(report, state)

    hook = WrittenByNextEpoch(tmp_path, every=2, on_written=lambda written: seen.append(written.epoch))
    train(model_for(data, params), data, params, epochs=3, objective="val_loss", direction="minimize",
          patience=None, checkpoint=hook)
    assert seen == [2]  # before `wait`: recorded during training


def test_hook_deletes_a_checkpoint_only_once_a_newer_one_is_known_recorded(tmp_path: Path) -> None:
    """In a runner, `Checkpointed` is only sent: until the supervisor's answer to a later epoch says a newer
    one was recorded, the database may still name the older file, which must stay. Here the supervisor's
    answers run one checkpoint behind."""
    data = blobs()
    params = {"n_layers": 1, "units": 8}
    sent: list[int] = []

    def acknowledged() -> int | None:
        return sent[-2] if len(sent) > 1 else None

    def send(written: Any) -> None:
        known = acknowledged()
        assert known is None or known in [c.epoch for c in list_checkpoints(tmp_path)]
        sent.append(written.epoch)

    hook = EpochCheckpointer(tmp_path, on_written=send, recorded=acknowledged)
    train(model_for(data, params), data, params, epochs=4, objective="val_loss", direction="minimize",
          patience=None, checkpoint=hook)
    hook.wait()
    assert sent == [1, 2, 3, 4]
    assert [c.epoch for c in list_checkpoints(tmp_path)] == [3, 4]  # 3 is the one known recorded


def test_hook_keeps_the_old_checkpoint_when_recording_fails(tmp_path: Path) -> None:
    data = blobs()
    params = {"n_layers": 1, "units": 8}

    def record(written: Any) -> None:
        if written.epoch == 2:
            raise RuntimeError("database unavailable")

    with pytest.raises(RuntimeError, match="database unavailable"):  # raised at the next epoch boundary
        train(model_for(data, params), data, params, epochs=3, objective="val_loss", direction="minimize",
              checkpoint=EpochCheckpointer(tmp_path, on_written=record))
    assert [c.epoch for c in list_checkpoints(tmp_path)] == [1, 2]


def test_a_failed_background_write_surfaces_on_the_training_thread(tmp_path: Path) -> None:
    data = blobs()
    params = {"n_layers": 1, "units": 8}
    (tmp_path / "file").write_text("")
    hook = EpochCheckpointer(tmp_path / "file" / "checkpoints")  # a directory that cannot be made
    with pytest.raises(OSError):
        train(model_for(data, params), data, params, epochs=1, objective="val_loss", direction="minimize",
              checkpoint=hook)
        hook.wait()


# ---- across processes: SIGKILL mid-epoch and mid-write ------------------------------------------------

PROCESS_PARAMS = {"n_layers": 2, "units": 16, "dropout": 0.2, "batch_size": 16, "optimizer": "adam",
                  "lr_schedule": "cosine", "learning_rate": 0.01}
PROCESS_RUN: dict[str, Any] = {"epochs": 6, "objective": "val_accuracy", "direction": "maximize", "patience": None,
                               "seed": 3}
KILL_IN_EPOCH = 4

KILLED_MID_EPOCH = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.workers.test_checkpoints import KILL_IN_EPOCH, PROCESS_PARAMS, PROCESS_RUN, blobs, model_for
from workers.checkpoints import EpochCheckpointer
from workers.trainer import train

finished, polls = [], []

class Count:
    def on_epoch_end(self, report):
        finished.append(report.epoch)
        return False

def stop_signal():  # polled between batches: the third batch of epoch KILL_IN_EPOCH never runs
    if len(finished) == KILL_IN_EPOCH - 1:
        polls.append(1)
        if len(polls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return False

data = blobs()
train(model_for(data, PROCESS_PARAMS), data, PROCESS_PARAMS, **PROCESS_RUN, callbacks=[Count()],
      stop_signal=stop_signal, checkpoint=EpochCheckpointer(Path(sys.argv[1])))
"""


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigkilled_mid_epoch_then_resumed_in_another_process_equals_uninterrupted(tmp_path: Path) -> None:
    done = run_child(KILLED_MID_EPOCH, str(tmp_path))
    assert done.returncode == -signal.SIGKILL, done.stderr

    data = blobs()
    fresh = model_for(data, PROCESS_PARAMS, seed=42)
    state, skipped = latest_usable(tmp_path, module=fresh)
    # The last boundary's write may have been under way when the kill came: then the one before is used.
    assert state is not None and state.epoch in (KILL_IN_EPOCH - 2, KILL_IN_EPOCH - 1) and skipped == []
    resumed = train(fresh, data, PROCESS_PARAMS, **PROCESS_RUN, resume_from=state)

    whole_model = model_for(data, PROCESS_PARAMS)
    whole = train(whole_model, data, PROCESS_PARAMS, **PROCESS_RUN)
    assert_same_run(whole, resumed, whole_model, fresh)


TORN_WRITE = """
import dataclasses, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import safetensors.torch
import workers.checkpoints.files as files
from tests.workers.test_checkpoints import blobs, model_for
from workers.trainer import train

directory, epoch_of_second = Path(sys.argv[1]), int(sys.argv[2])
params, data, states = {"n_layers": 1, "units": 8}, blobs(), []

class Keep:
    def on_epoch_state(self, report, state):
        states.append(state())

train(model_for(data, params), data, params, epochs=2, objective="val_loss", direction="minimize",
      checkpoint=Keep())
files.write_checkpoint(directory, states[0])

def torn_save(tensors, filename, metadata=None):  # the process dies with half the file written
    whole = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(whole[:len(whole) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

files.save_file = torn_save
files.write_checkpoint(directory, dataclasses.replace(states[1], epoch=epoch_of_second))
"""


@pytest.mark.parametrize("epoch_of_second", [2, 1], ids=["next-epoch", "same-epoch-rewritten"])
def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path: Path, epoch_of_second: int) -> None:
    done = run_child(TORN_WRITE, str(tmp_path), str(epoch_of_second))
    assert done.returncode == -signal.SIGKILL, done.stderr

    assert [c.epoch for c in list_checkpoints(tmp_path)] == [1]
    state, skipped = latest_usable(tmp_path)
    assert state is not None and state.epoch == 1 and skipped == []
    assert [r.epoch for r in state.history] == [1]  # the first epoch's state, not the second's
    leftovers = remove_temporaries(tmp_path)
    assert len(leftovers) == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(1)]
