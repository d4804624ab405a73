"""The CLI's client commands through the real parser against the real app (FastAPI's TestClient as the
transport): short ids, pause, resume, extend, delete, upload and the trial table's columns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import cli
from app.client import Client
from app.core.db import Database
from app.main import create_app
from app.models import Trial, TrialEpoch
from app.services import keys
from tests.conftest import make_settings
from tests.factories import flower_csv, npz_bytes, small_idx, study_spec


@pytest.fixture
def hps(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """A client of the real app; every CLI command gets one on the same app."""
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    app = create_app(settings, db)
    key = keys.create_key(db, owner="alice")
    monkeypatch.setattr(cli, "_client", lambda args: Client("http://testserver", key, http=TestClient(app)))
    yield Client("http://testserver", key, http=TestClient(app))
    db.dispose()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_a_study_is_named_by_any_unique_prefix_of_its_id(hps: Client, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [hps.studies.create(study_spec(name=f"s{i}")).id for i in range(17)]
    target = ids[0]
    unique = next(n for n in range(1, 33) if sum(i.startswith(target[:n]) for i in ids) == 1)
    short = target[:max(unique, 8)]  # the 8 characters shown, or more in the rare case they are shared
    status, out, _ = run(capsys, "status", short)
    assert status == 0 and f"study {target} queued" in out

    first = {i[0] for i in ids}  # 17 ids over 16 hex digits: some first digit starts two of them
    shared = next(d for d in sorted(first) if sum(i.startswith(d) for i in ids) > 1)
    status, out, err = run(capsys, "status", shared)
    assert status == 1 and out == ""
    assert err.startswith(f"error: '{shared}' starts ") and "give more of the id" in err
    assert all(i in err for i in ids if i.startswith(shared))

    missing = next(p for p in (f"{a}{b}" for a in "0123456789abcdef" for b in "0123456789abcdef")
                   if not any(i.startswith(p) for i in ids))
    status, _, err = run(capsys, "status", missing)
    assert status == 1 and f"no study of yours has an id starting '{missing}'" in err
    assert hps.studies.get(short).id == target  # the Python client too


def test_pause_resume_and_delete(hps: Client, capsys: pytest.CaptureFixture[str]) -> None:
    study = hps.studies.create(study_spec())
    assert run(capsys, "pause", study.id[:8])[0] == 0
    assert hps.studies.get(study.id).status == "paused"
    status, out, _ = run(capsys, "resume", study.id[:8])
    assert status == 0 and hps.studies.get(study.id).status in ("queued", "running")
    status, out, _ = run(capsys, "delete", study.id[:8])
    assert status == 0 and out == f"deleted study {study.id}, its trials and their files\n"
    assert [s.id for s in hps.studies.list().data] == []


def _trial_row(hps: Client, db_url: str, state: str, **columns: Any) -> tuple[str, int]:
    """A study with one numbered trial in `state`, as a worker would have left it."""
    study = hps.studies.create(study_spec())
    db = Database(db_url)
    with db.session() as session:
        session.add(Trial(study_id=study.id, number=0, state=state, attempt=1, params={"lr": 0.01}, **columns))
    db.dispose()
    return study.id, 0


def test_pause_and_resume_one_trial(hps: Client, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    sid, number = _trial_row(hps, sqlite_url, "running")
    status, out, err = run(capsys, "pause", sid[:8], str(number))
    assert status == 0, err
    assert out == f"trial 0 pauses at its next epoch boundary (`hpsearch resume {sid[:8]} 0` goes on)\n"
    trial = hps.trials.get(sid, number)
    assert trial.state == "running" and trial.pause_requested_at is not None
    status, out, _ = run(capsys, "resume", sid[:8], "0")  # before its worker carried it out: called off
    assert status == 0 and out == "trial 0 running\n"
    assert hps.trials.get(sid, number).pause_requested_at is None
    status, _, err = run(capsys, "resume", sid[:8], "0")
    assert status == 1 and "cannot resume a running trial: it is not paused" in err

    waiting, _ = _trial_row(hps, sqlite_url, "waiting")
    assert hps.trials.pause(waiting, 0).state == "paused"  # not running: paused at once
    status, out, _ = run(capsys, "resume", waiting[:8], "0")
    assert status == 0 and out == "trial 0 back in line\n"

    done, _ = _trial_row(hps, sqlite_url, "complete")
    status, _, err = run(capsys, "pause", done[:8], "0")
    assert status == 1 and "trial 0: cannot pause a complete trial: it has ended" in err
    status, _, err = run(capsys, "pause", done[:8], "7")
    assert status == 1 and "trial not found" in err


def test_extend_one_trial(hps: Client, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    sid, _ = _trial_row(hps, sqlite_url, "complete", value=0.9, epochs_run=3, checkpoint_epoch=3,
                        checkpoint_path="x/checkpoints/trial-0-1/epoch-000003.safetensors")
    status, out, err = run(capsys, "extend", sid[:8], "0", "--epochs", "4")
    assert status == 0, err
    assert out == f"trial 0 continues from epoch 3 to 7 (`hpsearch follow {sid[:8]}` watches it)\n"
    trial = hps.trials.get(sid, 0)
    assert (trial.state, trial.epochs_target, trial.value) == ("waiting", 7, 0.9)
    status, _, err = run(capsys, "extend", sid[:8], "0", "--epochs", "1")
    assert status == 1 and "cannot extend a waiting trial: only a complete trial continues" in err
    with pytest.raises(SystemExit):
        run(capsys, "extend", sid[:8], "0", "--epochs", "0")
    assert "must be at least 1" in capsys.readouterr().err

    bare, _ = _trial_row(hps, sqlite_url, "complete", value=0.9, epochs_run=3)
    status, _, err = run(capsys, "extend", bare[:8], "0", "--epochs", "2")
    assert status == 1 and "keeps no checkpoint" in err


def test_the_trial_table_shows_the_rung_a_scheduler_paused_a_trial_at(hps: Client, sqlite_url: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    sid, _ = _trial_row(hps, sqlite_url, "paused", rung=3, epochs_run=3)
    status, out, err = run(capsys, "trials", sid[:8], "--columns", "lr")
    assert status == 0, err
    assert out.splitlines()[1].split()[:4] == ["0", "paused", "(rung", "3)"]
    assert hps.trials.get(sid, 0).rung == 3


def test_rungs_show_where_a_scheduler_pauses_trials(hps: Client, sqlite_url: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    asha = {"name": "asha", "min_epochs": 1, "reduction_factor": 2, "max_epochs": 3}  # rungs at 1 and 2
    sid = hps.studies.create(study_spec(scheduler=asha)).id
    db = Database(sqlite_url)
    with db.session() as session:
        for number, state, rung, epochs in ((0, "paused", 1, 1), (1, "complete", None, 3), (2, "pruned", None, 1)):
            trial = Trial(study_id=sid, number=number, state=state, attempt=1, rung=rung, params={"lr": 0.01})
            session.add(trial)
            session.flush()
            session.add_all(TrialEpoch(trial_id=trial.id, attempt=1, epoch=e) for e in range(1, epochs + 1))
    db.dispose()
    status, out, err = run(capsys, "rungs", sid[:8])
    assert status == 0, err
    assert [line.split() for line in out.splitlines()] == [
        ["asha:", "epoch", "reached", "paused", "promoted"], ["1", "3", "1", "1"], ["2", "1", "0", "1"]]
    status, out, _ = run(capsys, "rungs", hps.studies.create(study_spec()).id[:8])
    assert status == 0 and out == "this study has no scheduler: its trials never pause at rungs\n"


def test_upload_csv_npz_and_idx(hps: Client, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    csv = tmp_path / "flowers.csv"
    csv.write_bytes(flower_csv(30))
    status, out, err = run(capsys, "upload", str(csv), "--label-column", "species")
    assert status == 0, err
    dataset = hps.datasets.get(out.strip())
    assert dataset["name"] == "flowers" and dataset["kind"] == "csv" and dataset["size_bytes"] == csv.stat().st_size

    npz = tmp_path / "points.npz"
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    npz.write_bytes(npz_bytes(X=x, y=np.arange(20) % 2))
    status, out, err = run(capsys, "upload", str(npz), "--name", "points")
    assert status == 0, err
    assert hps.datasets.get(out.strip())["samples"] == 20

    images, labels = tmp_path / "images.idx", tmp_path / "labels.idx"
    images.write_bytes(small_idx()[0])
    labels.write_bytes(small_idx()[1])
    status, out, err = run(capsys, "upload", str(images), "--labels", str(labels), "--name", "tiny")
    assert status == 0, err
    assert hps.datasets.get(out.strip())["image_shape"] is not None

    status, out, err = run(capsys, "upload", str(csv))
    assert status == 1 and "--label-column" in err
    status, out, err = run(capsys, "upload", str(csv), "--label-column", "species", "--name", "again")
    assert status == 1 and "error 409" in err and "'flowers'" in err


SEARCHED = ("dropout", "weight_decay", "batch_size", "learning_rate", "units", "n_layers")


def _enqueue_with_searched_last(hps: Client) -> str:
    """A study searching six parameters; a trial whose params list the fixed ones first."""
    spec = study_spec(search_space={"dropout": {"type": "float", "low": 0.0, "high": 0.3},
                                    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
                                    "batch_size": {"type": "categorical", "choices": [16, 32]},
                                    "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                                    "units": {"type": "int", "low": 32, "high": 64},
                                    "n_layers": {"type": "int", "low": 1, "high": 2}, "optimizer": "adam"})
    study = hps.studies.create(spec)
    fixed: dict[str, Any] = {"optimizer": "adam", "activation": "relu", "batch_norm": "none",
                             "weight_init": "he_normal", "lr_schedule": "constant", "layer_shape": "constant"}
    chosen = {"dropout": 0.1, "weight_decay": 1e-4, "batch_size": 16, "learning_rate": 0.01, "units": 40,
              "n_layers": 1}
    hps.trials.enqueue(study.id, {**fixed, **chosen})
    return study.id


def test_the_trial_table_shows_the_searched_parameters_first(hps: Client,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    study_id = _enqueue_with_searched_last(hps)
    status, out, err = run(capsys, "trials", study_id[:8], "--state", "waiting")  # enqueued, not yet run
    assert status == 0, err
    header = out.splitlines()[0].split()
    assert sorted(header[4:]) == sorted(SEARCHED), header  # every searched one, though more than five

    status, out, err = run(capsys, "trials", study_id, "--state", "waiting", "--columns", "optimizer,learning_rate")
    assert status == 0, err
    assert out.splitlines()[0].split()[4:] == ["optimizer", "learning_rate"]
    assert out.splitlines()[1].split()[4:] == ["adam", "0.0100"]

    status, out, err = run(capsys, "trials", study_id, "--state", "waiting", "--columns", "learnig_rate")
    assert status == 1 and "learnig_rate" in err and "learning_rate" in err
