"""Ensembles: greedy selection, the trees member, the finalization job, and a real study's ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import Database
from app.ml import ensemble
from app.ml.artifacts import ModelSpec, build_module, describe_layers, prune_study_dir, save_trial
from app.ml.trees import Trees, fit_trees
from tests.factories import API, client_for, create_study_via_api, running_supervisor, study_spec, wait_for_status
from workers import final_evaluation


def _random_probs(rng: np.random.Generator, n: int, classes: int, sharpness: float) -> np.ndarray:
    logits = rng.normal(size=(n, classes)) * sharpness
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


# ---- the math ---------------------------------------------------------------------------------------------


def test_metrics_match_their_definitions() -> None:
    from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, mean_squared_error

    rng = np.random.default_rng(0)
    probs, y = _random_probs(rng, 50, 4, 2.0), rng.integers(0, 4, 50)
    got = ensemble.classification_metrics(probs, y)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert got["loss"] == pytest.approx(log_loss(y, probs, labels=range(4)))
    pred, target = rng.normal(size=(30, 1)), rng.normal(size=30)
    reg = ensemble.regression_metrics(pred, target)
    assert reg["mse"] == pytest.approx(mean_squared_error(target, pred[:, 0])) and reg["loss"] == reg["mse"]
    assert reg["mae"] == pytest.approx(mean_absolute_error(target, pred[:, 0]))


@pytest.mark.parametrize(("task", "objective", "direction"), [
    ("classification", "val_accuracy", "maximize"), ("classification", "val_loss", "minimize"),
    ("regression", "val_mse", "minimize"), ("regression", "val_mae", "minimize")])
def test_selection_is_never_worse_than_the_best_single_member_on_validation(task: str, objective: str,
                                                                            direction: str) -> None:
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n, k = 60, int(rng.integers(1, 7))
        if task == "classification":
            y = rng.integers(0, 3, n)
            preds = [_random_probs(rng, n, 3, float(rng.uniform(0.5, 4))) for _ in range(k)]
        else:
            y = rng.normal(size=n)
            preds = [(y + rng.normal(scale=rng.uniform(0.2, 2), size=n) + rng.normal())[:, None]
                     for _ in range(k)]
        chosen = ensemble.greedy_selection(preds, y, task=task, objective=objective, direction=direction,
                                           rounds=15)
        keys = [ensemble.score_key(m, objective, direction) for m in chosen.member_metrics]
        assert keys[chosen.start] == min(keys)
        assert ensemble.score_key(chosen.metrics, objective, direction) <= min(keys)
        assert sum(chosen.weights) == pytest.approx(1.0) and min(chosen.weights) >= 0
        # The reported metrics are those of the weights it returns.
        again = ensemble.metrics(ensemble.weighted_average(preds, chosen.weights), y, task)
        assert again == pytest.approx(chosen.metrics)


def test_selection_combines_members_that_err_on_different_samples() -> None:
    y = np.repeat([0, 1, 2], 10)
    members = []
    for wrong_class in range(3):  # each member is confidently wrong on one class, right elsewhere
        probs = np.full((30, 3), 0.05)
        probs[np.arange(30), y] = 0.9
        wrong = y == wrong_class
        probs[wrong] = 0.05
        probs[wrong, (wrong_class + 1) % 3] = 0.9
        members.append(probs)
    chosen = ensemble.greedy_selection(members, y, task="classification", objective="val_accuracy",
                                       direction="maximize")
    assert [m["accuracy"] for m in chosen.member_metrics] == pytest.approx([2 / 3] * 3)
    assert chosen.metrics["accuracy"] == 1.0
    assert all(w > 0 for w in chosen.weights) and chosen.best_round >= 3


def test_one_member_is_its_own_ensemble() -> None:
    probs = _random_probs(np.random.default_rng(1), 20, 2, 1.0)
    y = probs.argmax(1)
    chosen = ensemble.greedy_selection([probs], y, task="classification", objective="val_accuracy",
                                       direction="maximize")
    assert chosen.weights == [1.0] and chosen.metrics == chosen.member_metrics[0] and chosen.rounds == 1


# ---- the trees member -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["multiclass", "binary", "regression"])
def test_trees_as_arrays_predict_what_scikit_learn_predicts(kind: str, tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 6))
    if kind == "regression":
        y: np.ndarray = x[:, 0] * 2 + np.sin(x[:, 1])
        with threadpool_limits(1):  # one thread: OpenMP on shared cores is slower, not faster
            reference = HistGradientBoostingRegressor(early_stopping=True, random_state=0).fit(x, y)
        expected = reference.predict(x)[:, None]
    else:
        classes = 3 if kind == "multiclass" else 2
        y = np.digitize(x[:, 0] + 0.5 * x[:, 1], np.quantile(x[:, 0], np.linspace(0, 1, classes + 1)[1:-1]))
        with threadpool_limits(1):
            reference = HistGradientBoostingClassifier(early_stopping=True, random_state=0).fit(x, y)
        expected = reference.predict_proba(x)
    task = "regression" if kind == "regression" else "classification"
    trees = fit_trees(x.reshape(300, 2, 3), y, task=task, seed=0)  # inputs are flattened, as images are
    path = tmp_path / "trees.npz"
    trees.save(path)
    with np.load(path, allow_pickle=False) as stored:  # plain arrays: readable without unpickling anything
        assert stored["feature"].dtype == np.int64
    np.testing.assert_allclose(Trees.load(path).predict(x), expected, rtol=0, atol=1e-9)


# ---- finalization ----------------------------------------------------------------------------------------


def _finalize_job(tmp_path: Path, *, trees: bool = False, targets: int = 0) -> final_evaluation.EnsembleJob:
    """Three small networks (different seeds) saved as trial artifacts, with synthetic splits.

    Classification into three classes, or regression onto `targets` values per sample.
    """
    import torch

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5)) * 2
    task = "regression" if targets else "classification"

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = (centers[y] + rng.normal(size=(n, 5))).astype(np.float32)
        if targets:
            values = x[:, :targets] * 2 + 1
            return x, (values[:, 0] if targets == 1 else values).astype(np.float32)
        return x, y

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = split(120), split(60), split(60)
    members = []
    for number in range(3):
        torch.manual_seed(number)
        spec = ModelSpec(model="mlp", params={"n_layers": 1, "units": 8}, task=task, input_shape=(5,),
                         n_outputs=targets or 3, feature_groups=None,
                         classes=None if targets else ["a", "b", "c"],
                         mean=x_train.mean(0).tolist(), std=x_train.std(0).tolist())
        module = build_module(spec)
        stem = tmp_path / f"trial-{number}"
        save_trial(stem, module.state_dict(), spec, metrics={}, layers=describe_layers(module))
        members.append(final_evaluation.Member(number=number, spec=spec, artifact=str(stem)))
    return final_evaluation.EnsembleJob(members=members, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                                x_test=x_test, y_test=y_test, task=task,
                                objective="val_mse" if targets else "val_accuracy",
                                direction="minimize" if targets else "maximize", study_dir=str(tmp_path),
                                trees=trees)


def test_finalization_reads_the_test_split_once_per_model_and_never_to_choose(tmp_path: Path) -> None:
    job = _finalize_job(tmp_path)
    calls: list[str] = []
    final_evaluation.test_evaluation_hooks.append(lambda name, _m: calls.append(name))
    try:
        first = final_evaluation.run(job)
        assert calls == ["best_single", "ensemble"]
        job.y_test = (job.y_test + 1) % 3  # other test labels: other test scores, the same choice
        second = final_evaluation.run(job)
    finally:
        final_evaluation.test_evaluation_hooks.clear()
    weights = [[m["weight"] for m in r["ensemble"]["members"]] for r in (first, second)]
    assert weights[0] == weights[1]
    assert first["ensemble"]["ensemble"]["val"] == second["ensemble"]["ensemble"]["val"]
    assert first["ensemble"]["best_single"]["test"] != second["ensemble"]["best_single"]["test"]
    record = first["ensemble"]
    assert record["best_single"]["trial_number"] == 0 == first["test_metrics"]["trial_number"]
    assert first["test_metrics"]["test_accuracy"] == record["best_single"]["test"]["accuracy"]


def test_finalization_with_trees_keeps_them_only_as_arrays(tmp_path: Path) -> None:
    job = _finalize_job(tmp_path, trees=True)  # untrained networks: the trees are clearly better
    record = final_evaluation.run(job)["ensemble"]
    by_name = {m["name"]: m for m in record["members"]}
    assert by_name["trees"]["kind"] == "trees" and by_name["trees"]["weight"] > 0
    assert (tmp_path / "trees.npz").is_file() and not list(tmp_path.glob("*.pkl"))
    assert record["ensemble"]["val"]["accuracy"] >= max(m["val"]["accuracy"] for m in record["members"])


def test_regression_ensembles_average_outputs_and_leave_trees_out_for_several_targets(tmp_path: Path) -> None:
    one = final_evaluation.run(_finalize_job(tmp_path / "one", trees=True, targets=1))["ensemble"]
    assert one["members"][-1]["kind"] == "trees" and one["note"] is None
    assert one["ensemble"]["val"]["mse"] <= min(m["val"]["mse"] for m in one["members"])
    assert set(one["ensemble"]["test"]) == {"mse", "mae", "loss"}
    two = final_evaluation.run(_finalize_job(tmp_path / "two", trees=True, targets=2))["ensemble"]
    assert [m["kind"] for m in two["members"]] == ["trial"] * 3 and "several" in two["note"]


def test_prune_study_dir_keeps_only_the_given_trials(tmp_path: Path) -> None:
    names = ["trial-0.safetensors", "trial-0.json", "trial-1.safetensors", "trial-1.json",
             "trial-2.safetensors.tmp", "trial-3.safetensors", "trees.npz", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = prune_study_dir(tmp_path, keep={0, 3})
    assert sorted(p.name for p in removed) == ["trees.npz", "trial-1.json", "trial-1.safetensors",
                                               "trial-2.safetensors.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "trial-0.json", "trial-0.safetensors",
                                                         "trial-3.safetensors"]


# ---- a real study ----------------------------------------------------------------------------------------


def _run_study(settings: Settings, db: Database, client: TestClient, **overrides: Any) -> dict[str, Any]:
    sid = create_study_via_api(client, **overrides)
    with running_supervisor(settings, db, slots=overrides.get("budget", {}).get("max_parallel", 2)):
        return wait_for_status(client, sid, {"completed", "failed"})


def test_a_completed_study_has_an_ensemble_scored_once_on_test(settings: Settings, db: Database,
                                                               tmp_path: Path) -> None:
    """The finalization path on SQLite and PostgreSQL: hook counts come from the forked finalization child."""
    log = tmp_path / "test-evaluations.log"

    def record(name: str, _metrics: dict[str, float]) -> None:
        with log.open("a") as fh:
            fh.write(name + "\n")

    client = client_for(settings, db)
    final_evaluation.test_evaluation_hooks.append(record)
    try:
        study = _run_study(settings, db, client, budget={"n_trials": 4, "epochs": 2},
                           ensemble={"top_k": 3, "trees": True})
    finally:
        final_evaluation.test_evaluation_hooks.remove(record)
    assert study["status"] == "completed", study["error"]
    assert log.read_text().split() == ["best_single", "ensemble"]
    got = client.get(f"{API}/studies/{study['id']}/ensemble")
    assert got.status_code == 200, got.text
    body = got.json()
    trial_members = [m for m in body["candidates"] if m["kind"] == "trial"]
    assert len(trial_members) == 3 and [m["kind"] for m in body["candidates"]][-1] == "trees"
    assert body["members"] == [m for m in body["candidates"] if m["weight"] > 0]  # as the export holds them
    best_number = body["best_single"]["trial_number"]
    assert trial_members[0]["trial_number"] == study["best_trial"]["number"] == best_number
    assert sum(m["weight"] for m in body["members"]) == pytest.approx(1.0)
    assert body["ensemble"]["val"]["accuracy"] >= body["best_single"]["val"]["accuracy"]
    assert study["test_metrics"] == {"trial_number": body["best_single"]["trial_number"],
                                     **{f"test_{k}": v for k, v in body["best_single"]["test"].items()}}
    assert set(body["ensemble"]["test"]) == {"accuracy", "loss"}
    # Deleting the study deletes its artifacts.
    assert settings.artifact_dir is not None
    folder = settings.artifact_dir / study["id"]
    assert (folder / "trial-0.safetensors").is_file()
    assert client.delete(f"{API}/studies/{study['id']}").status_code == 204
    assert not folder.exists()


def test_pruned_and_half_written_trials_keep_no_artifacts(sqlite_url: str, tmp_path: Path) -> None:
    from tests.conftest import make_settings
    from workers.publishing import checkpoint_folders

    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    try:
        # Keeping only the top 1% after one trial prunes the others (deterministic with these seeds).
        pruner = {"name": "percentile", "percentile": 1.0, "n_startup_trials": 1, "n_warmup_steps": 0}
        spec = study_spec(budget={"n_trials": 4, "epochs": 2, "max_parallel": 1}, pruner=pruner)
        sid = create_study_via_api(client, spec)
        assert settings.artifact_dir is not None
        folder = settings.artifact_dir / sid
        folder.mkdir(parents=True)
        for leftover in ("trial-7.safetensors", "trial-8.json.tmp"):  # as if a killed runner had left them
            (folder / leftover).write_bytes(b"partial")
        with running_supervisor(settings, db, slots=1):
            study = wait_for_status(client, sid, {"completed", "failed"})
        trials = client.get(f"{API}/studies/{sid}/trials").json()["data"]
        complete = {t["number"] for t in trials if t["state"] == "complete"}
        assert study["progress"]["pruned"] >= 1 and complete
        kept = {p.name for p in folder.iterdir() if p.is_file()}
        assert kept == {f"trial-{n}.{ext}" for n in complete for ext in ("safetensors", "json")}
        # Checkpoints too: only completed trials keep theirs (keep_checkpoints: best_k).
        assert set(checkpoint_folders(settings.artifact_dir, sid)) <= complete
        pruned = next(t["number"] for t in trials if t["state"] == "pruned")
        assert client.get(f"{API}/studies/{sid}/trials/{pruned}/model").status_code == 404
    finally:
        db.dispose()
