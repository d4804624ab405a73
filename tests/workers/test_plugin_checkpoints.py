"""A model plugin's own loop that takes `resume`, in a forked runner: its checkpoints name the plugin version
that wrote them, and one written by another version is passed over with the reason, never loaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from app import plugins
from app.ml.artifacts import ModelSpec
from tests.workers.test_runner import MEAN, STD, curve, job, run
from workers.checkpoints import read_checkpoint, write_checkpoint
from workers.protocol import Checkpointed, Done, Resumed
from workers.runner import RunnerTrial

SITE = Path(__file__).resolve().parents[1] / "plugin_site"


@pytest.fixture
def resumable(monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    monkeypatch.syspath_prepend(str(SITE))
    monkeypatch.setattr(plugins, "_current", None)  # configured here for this test only, as a worker would
    plugins.configure(["resumableloop"])
    return ModelSpec("resumableloop", {"hidden": 8, "lr": 0.02}, "classification", (64,), 10, None,
                     [str(i) for i in range(10)], MEAN.tolist(), STD.tolist())


def test_a_checkpoint_of_another_plugin_version_is_passed_over_for_the_one_before(
        resumable: ModelSpec, tmp_path: Path) -> None:
    def trial(name: str, **resume: object) -> RunnerTrial:
        return RunnerTrial(1, resumable, 7, str(tmp_path / name), checkpoint_dir=str(tmp_path / name), **resume)

    two = run(replace(job([trial("two")]), epochs=2))[1]
    assert [m.epoch for m in two if isinstance(m, Checkpointed)] == [1, 2] and isinstance(two[-1], Done)
    three = run(job([trial("three", resume_from=str(tmp_path / "two" / "epoch-000002.safetensors"),
                           resume_epoch=2)]))[1]
    assert [(m.epoch, m.skipped) for m in three if isinstance(m, Resumed)] == [(2, [])]
    # Epoch 2 as this version of the plugin wrote it, epoch 3 as if an older release had.
    mixed = tmp_path / "mixed"
    for name, epoch, version in (("two", 2, "0.1"), ("three", 3, "0.0")):
        state = read_checkpoint(tmp_path / name / f"epoch-{epoch:06d}.safetensors",
                                identity={"plugin": "resumableloop==0.1"})  # what this version writes
        write_checkpoint(mixed, state, identity={"plugin": f"resumableloop=={version}"})

    again = run(job([trial("again", resume_from=str(mixed / "epoch-000003.safetensors"), resume_epoch=3)]))[1]
    (said,) = [m for m in again if isinstance(m, Resumed)]
    assert said.epoch == 2 and len(said.skipped) == 1, said
    assert "checkpoint of epoch 3 unusable (identity_changed" in said.skipped[0]
    assert "'resumableloop==0.0' in the checkpoint, 'resumableloop==0.1' now" in said.skipped[0]
    (got,), (want,) = curve(again), curve(three)  # epoch 3, trained again from epoch 2
    assert got == pytest.approx(want, abs=1e-6)
