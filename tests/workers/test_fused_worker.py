"""Fused trials inside a real supervisor (`--fuse K`): several trials share one runner process, and each is
still an ordinary trial: its own Optuna trial, curve, pruning decision, outcome, attempts and weights."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database
from app.models import FailureKind, TrialEpoch, TrialState
from tests.conftest import ROOT, make_settings
from tests.factories import client_for, running_supervisor, study_spec, wait_for_status
from tests.integration.processes import assert_study_settled, optuna_trials, trials_of, wait_until

API = "/api/v1"
GOOD_LR, MEDIOCRE_LR, BAD_LR = 0.02, 5e-4, 1e-5


def _readme_loader() -> Any:
    """`load(folder)` of the README's plain-PyTorch loader block, executed as written."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    block = next(b for b in blocks if "def load(folder)" in b)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the documented snippet is what we test
    return namespace["load"]


class _Runners(logging.Handler):
    """The runner pid that each trial's "trial started" line names, by (trial number, attempt), and the epoch
    each trial said it resumed after."""

    def __init__(self) -> None:
        super().__init__()
        self.by_trial: dict[tuple[int, int], int] = {}
        self.resumed: dict[int, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        runner = getattr(record, "runner", None)
        if runner is not None and record.getMessage().startswith("trial started"):
            self.by_trial[(record.trial, record.attempt)] = runner  # type: ignore[attr-defined]
        if record.msg == "resumed after epoch %d":
            self.resumed[record.trial] = int(record.args[0])  # type: ignore[attr-defined,index]


@contextmanager
def fused_supervisor(settings: Settings, db: Database, *, fuse: int, grace_s: float = 5.0) -> Iterator[_Runners]:
    """A real supervisor with one CPU slot that fuses up to `fuse` trials per runner."""
    runners = _Runners()
    logger = logging.getLogger("hpsearch.worker")
    logger.addHandler(runners)
    logger.setLevel(logging.INFO)
    try:
        with running_supervisor(settings, db, slots=1, shutdown_grace_s=grace_s, fuse=fuse):
            yield runners
    finally:
        logger.removeHandler(runners)


def _spec(n_trials: int, epochs: int, max_attempts: int = 2, **extra: Any) -> dict[str, Any]:
    spec = study_spec(budget={"n_trials": n_trials, "epochs": epochs, "patience": None, "max_parallel": 4,
                              "max_attempts": max_attempts}, **extra)
    # Only the learning rate decides how fast a member learns: the rest is fixed, or a sampled N(0, 1)
    # initialization or sigmoid could make a good learning rate fall below the median at epoch 1.
    spec["search_space"] = {**spec["search_space"], "n_layers": 1, "batch_size": 16, "activation": "relu",
                            "weight_init": "he_normal", "batch_norm": "none", "dropout": 0.0,
                            "weight_decay": 1e-6, "lr_schedule": "constant", "layer_shape": "constant",
                            "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True}}
    return spec


def _curves(db: Database, trial_id: int) -> dict[int, list[int]]:
    with db.read_session() as session:
        rows = session.execute(select(TrialEpoch.attempt, TrialEpoch.epoch).where(TrialEpoch.trial_id == trial_id)
                               .order_by(TrialEpoch.attempt, TrialEpoch.epoch)).all()
    out: dict[int, list[int]] = {}
    for attempt, epoch in rows:
        out.setdefault(attempt, []).append(epoch)
    return out


def test_a_fused_group_runs_its_trials_as_ordinary_trials_and_pruning_one_leaves_the_others(
        settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    spec = _spec(8, 3, pruner={"name": "median", "n_startup_trials": 4, "n_warmup_steps": 0})
    sid = client.post(f"{API}/studies", json=spec).json()["id"]
    # Claimed in this order: four mediocre members fuse first and complete; in the second group, the
    # members that learn nothing fall below their median at epoch 1 and are pruned, the good ones complete.
    rates = [MEDIOCRE_LR] * 4 + [BAD_LR, GOOD_LR, BAD_LR, GOOD_LR]
    for i, lr in enumerate(rates):
        reply = client.post(f"{API}/studies/{sid}/trials", json={"params": {"learning_rate": lr, "units": 32 + i}})
        assert reply.status_code == 201, reply.text
    with fused_supervisor(settings, db, fuse=4) as runners:
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study["error"]
    rows = assert_study_settled(db, sid, 8)  # our rows and Optuna's agree, one per number
    by_lr = {r.id: r.params["learning_rate"] for r in rows}

    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(runners.by_trial[(r.number, 1)], []).append(r.id)
    assert sorted(map(len, groups.values())) == [4, 4], groups  # two runners, four trials each
    first, second = sorted(groups.values())
    assert [by_lr[t] for t in first] == [MEDIOCRE_LR] * 4

    state = {r.id: TrialState(r.state) for r in rows}
    pruned = [t for t in second if state[t] is TrialState.PRUNED]
    assert sorted(by_lr[t] for t in pruned) == [BAD_LR, BAD_LR]
    for r in rows:  # every other member ran its whole budget, its curve counted from 1
        expected = [1] if r.id in pruned else [1, 2, 3]
        assert _curves(db, r.id) == {1: expected}, (r.number, r.params)
        if r.id not in pruned:
            assert state[r.id] is TrialState.COMPLETE and r.epochs_run == 3 and r.artifact

    theirs = {t.number: t for t in optuna_trials(db, sid)}
    assert len({t._trial_id for t in theirs.values()}) == 8  # each trial its own Optuna trial
    for r in rows:
        assert r.optuna_trial_id == theirs[r.number]._trial_id
        assert theirs[r.number].params["learning_rate"] == by_lr[r.id]
        assert sorted(theirs[r.number].intermediate_values) == _curves(db, r.id)[1]
        if state[r.id] is TrialState.COMPLETE:
            assert theirs[r.number].state is optuna.trial.TrialState.COMPLETE
            assert theirs[r.number].value == r.value

    # The best trial (a fused member) downloads as an ordinary model that predicts what the API predicts.
    best = max((r for r in rows if r.value is not None), key=lambda r: r.value)
    archive = client.get(f"{API}/studies/{sid}/trials/{best.number}/model")
    assert archive.status_code == 200
    folder = settings.home / "download"
    zipfile.ZipFile(io.BytesIO(archive.content)).extractall(folder)
    model, config = _readme_loader()(str(folder))
    x = np.random.default_rng(0).uniform(0, 16, size=(5, *config["input_shape"])).astype(np.float32)
    reply = client.post(f"{API}/studies/{sid}/predict", json={"inputs": x.tolist()})
    assert reply.status_code == 200, reply.text
    served = reply.json()
    assert served["trial_number"] == best.number
    with torch.no_grad():
        probabilities = model(torch.as_tensor(x)).double().softmax(dim=1)  # as the service does: a float32
    # softmax of logits near 15 is off by 1e-6 (the ulp of its max subtraction), more than the models differ
    np.testing.assert_allclose(probabilities.numpy(), served["probabilities"], rtol=1e-6, atol=1e-7)
    assert [config["classes"][i] for i in probabilities.argmax(dim=1)] == served["predictions"]


# Budget of the killed group: the kill comes once every member has an epoch, far from the last of these.
KILLED_EPOCHS = 4


def test_a_killed_fused_runner_fails_each_members_attempt_and_each_is_retried_to_completion(
        sqlite_url: str, tmp_path: Path) -> None:
    # Only the runner is killed, never the worker: a long grace keeps a loaded machine's late beats from
    # costing attempts, so every attempt the test counts is the crash's.
    settings = make_settings(sqlite_url, tmp_path / "home").model_copy(update={"lease_grace_s": 60.0})
    db = Database(sqlite_url)
    client = client_for(settings, db)
    spec = _spec(4, KILLED_EPOCHS, max_attempts=2)
    sid = client.post(f"{API}/studies", json=spec).json()["id"]
    with fused_supervisor(settings, db, fuse=4) as runners:
        def training() -> list[Any]:
            rows = trials_of(db, sid)
            return rows if len(rows) == 4 and all(_curves(db, r.id) for r in rows) else []

        rows = wait_until(training, 60, "four fused members with an epoch each")
        pids = {runners.by_trial[(r.number, 1)] for r in rows}
        assert len(pids) == 1  # one runner holds the four
        os.kill(pids.pop(), signal.SIGKILL)
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=300)
    assert study["status"] == "completed", study["error"]
    rows = assert_study_settled(db, sid, 4)
    for r in rows:
        assert r.state == TrialState.COMPLETE.value and r.attempt == 2, (r.number, r.state, r.error)
        curves = _curves(db, r.id)
        assert curves[2] == list(range(1, KILLED_EPOCHS + 1))  # the retry trained its whole budget again
        assert 1 <= len(curves[1]) < KILLED_EPOCHS  # the killed attempt's epochs stay on record
    db.dispose()


def test_a_killed_fused_runner_sends_each_checkpointed_member_on_alone_from_its_checkpoint(
        sqlite_url: str, tmp_path: Path) -> None:
    """Killed once every member has a checkpoint recorded, each member goes on alone under its next attempt
    from its own checkpoint: the epochs up to it are kept, none trained again, and it completes its budget."""
    settings = make_settings(sqlite_url, tmp_path / "home").model_copy(update={"lease_grace_s": 60.0})
    db = Database(sqlite_url)
    client = client_for(settings, db)
    epochs = 12  # the kill comes at epoch 3 or so
    sid = client.post(f"{API}/studies", json=_spec(4, epochs, max_attempts=1)).json()["id"]
    with fused_supervisor(settings, db, fuse=4) as runners:
        def checkpointed() -> list[Any]:
            rows = trials_of(db, sid)
            return rows if len(rows) == 4 and all(r.checkpoint_epoch for r in rows) else []

        rows = wait_until(checkpointed, 120, "four fused members with a checkpoint each")
        (pid,) = {runners.by_trial[(r.number, 1)] for r in rows}
        os.kill(pid, signal.SIGKILL)
        study = wait_for_status(client, sid, {"completed", "failed"}, timeout_s=300)
    assert study["status"] == "completed", study["error"]
    for r in assert_study_settled(db, sid, 4):
        # max_attempts 1: a member's second attempt is the group's failure, not its own
        assert r.state == TrialState.COMPLETE.value and r.attempt == 2, (r.number, r.state, r.error)
        assert _curves(db, r.id) == {2: list(range(1, epochs + 1))}  # its kept epochs carried into attempt 2
        assert runners.resumed[r.number] >= 1  # continued after a checkpointed epoch, not from scratch
    db.dispose()


def test_claim_trials_takes_waiting_first_within_max_parallel_and_n_trials(settings: Settings,
                                                                            db: Database) -> None:
    from app.schemas.study import StudySpec
    from app.services import studies
    from workers import leasing, retries

    spec = StudySpec.model_validate(study_spec(budget={"n_trials": 5, "max_parallel": 3, "max_attempts": 2}))
    sid = studies.create_study(db, settings, owner="alice", spec=spec)[0].id
    first = leasing.claim_trial(db, worker_id="w1", device="cpu", trial_deadline_s=600)
    assert first is not None
    more = leasing.claim_trials(db, worker_id="w1", device="cpu", trial_deadline_s=600, study_id=sid, limit=8)
    assert len(more) == 2  # max_parallel 3 in all
    assert leasing.claim_trials(db, worker_id="w1", device="cpu", trial_deadline_s=600, study_id=sid, limit=1) == []
    bound = leasing.bind_trial(db, more[0], number=0, optuna_trial_id=1000, params={"units": 40})
    assert bound is not None
    reaped = retries.retry_attempt(db, bound, reason="runner died", failure=FailureKind.PROCESS_DIED)
    assert reaped is not None and reaped.requeued
    again = leasing.claim_trials(db, worker_id="w2", device="cpu", trial_deadline_s=600, study_id=sid, limit=3)
    assert [(x.trial_id, x.attempt, x.params) for x in again] == [(bound.trial_id, 2, {"units": 40})]
    for lease in [first, more[1], again[0]]:
        assert leasing.finish_trial(db, lease, state=TrialState.FAIL, error="x")
    # Five reserved in all (three finished, two to go): a claim of eight gets two.
    assert len(leasing.claim_trials(db, worker_id="w1", device="cpu", trial_deadline_s=600, study_id=sid,
                                    limit=8)) == 2


def test_fuse_settings_and_the_auto_size() -> None:
    from app.ml.artifacts import ModelSpec
    from workers.fusing import CPU_AUTO_K, fuse_size, member_bytes, parse_fuse

    assert parse_fuse("auto") == "auto" and parse_fuse("4") == 4 and parse_fuse("1") == 1
    for bad in ("0", "-2", "many"):
        try:
            parse_fuse(bad)
        except ValueError:
            continue
        raise AssertionError(f"--fuse {bad} was accepted")
    small = ModelSpec(model="mlp", params={"n_layers": 1, "units": 32}, task="classification",
                      input_shape=(64,), n_outputs=10, feature_groups=None, classes=None)
    big = ModelSpec(model="mlp", params={"n_layers": 4, "units": 1024}, task="classification",
                    input_shape=(784,), n_outputs=10, feature_groups=None, classes=None)
    assert member_bytes(big, 128) > 100 * member_bytes(small, 128)
    assert fuse_size(3, "cpu", small, 64) == 3  # asked for, a CPU fuses
    assert fuse_size("auto", "cpu", small, 64) == CPU_AUTO_K == 1  # measured slower on a CPU: auto does not


def test_worker_refuses_a_bad_fuse_value(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "HPSEARCH_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--devices", "cpu", "--fuse", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--fuse takes auto or an integer" in done.stderr
    shown = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--help"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert "--fuse" in shown.stdout


def test_shutdown_past_its_grace_hands_every_member_of_a_group_back(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    sid = client.post(f"{API}/studies", json=_spec(4, 50)).json()["id"]
    with fused_supervisor(settings, db, fuse=4, grace_s=0.0) as runners:
        wait_until(lambda: len(trials_of(db, sid)) == 4 and all(_curves(db, r.id) for r in trials_of(db, sid)),
                   120, "four fused members with an epoch each")
    assert len(set(runners.by_trial.values())) == 1
    rows = trials_of(db, sid)
    assert [(r.state, r.attempt) for r in rows] == [(TrialState.WAITING.value, 1)] * 4  # no attempt spent
    for r in rows:  # what its checkpoint holds is kept, if one was recorded in time; nothing past it
        assert _curves(db, r.id) == ({1: list(range(1, r.checkpoint_epoch + 1))} if r.checkpoint_epoch else {})
    db.dispose()


def test_a_stopped_worker_hands_each_fused_member_back_at_its_next_checkpoint(sqlite_url: str,
                                                                              tmp_path: Path) -> None:
    """Within the shutdown grace every member of the group stops at its next epoch boundary with a
    checkpoint and goes back in line under the same attempt, its epochs up to that checkpoint kept."""
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    sid = client.post(f"{API}/studies", json=_spec(4, 50)).json()["id"]
    with fused_supervisor(settings, db, fuse=4, grace_s=60.0):
        wait_until(lambda: len(rows := trials_of(db, sid)) == 4 and all(r.checkpoint_epoch for r in rows), 120,
                   "four fused members with a checkpoint each")
    for r in trials_of(db, sid):
        assert (r.state, r.attempt) == (TrialState.WAITING.value, 1), (r.number, r.state, r.error)
        assert r.checkpoint_epoch is not None and 1 <= r.checkpoint_epoch < 50
        assert _curves(db, r.id) == {1: list(range(1, r.checkpoint_epoch + 1))}  # nothing past it, nothing lost
    db.dispose()
