"""Models users take home: `hpsearch export` from a served API, loaded back with the README's code."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.core.db import Database
from app.ml.artifacts import ModelSpec, build_module, describe_layers, load_ensemble_dir, save_trial
from app.services import keys
from tests.conftest import ROOT, make_settings
from tests.factories import API, client_for, running_supervisor, study_spec, wait_for_status
from tests.integration.processes import free_port, start_api, stop_all

DOC = ROOT / "README.md"
PLAIN_IMPORTS = {"json", "torch", "safetensors.torch"}


def _doc_blocks() -> list[str]:
    """The python blocks of the README's "Models you take home" section: the loader first, then its uses."""
    text = DOC.read_text()
    start = text.index("## Models you take home")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def _plain_loader() -> dict[str, Any]:
    """The loader block of the README, executed; it may import only torch, safetensors and json."""
    block = _doc_blocks()[0]
    imported = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported == PLAIN_IMPORTS
    namespace: dict[str, Any] = {}
    exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the documented snippet is what we test
    return namespace


@pytest.mark.parametrize(("model", "params", "shape", "groups"), [
    ("mlp", {"n_layers": 3, "units": 16, "layer_shape": "funnel", "batch_norm": "before_activation",
             "dropout": 0.2, "activation": "silu"}, (6,), None),
    ("mlp", {"n_layers": 2, "units": 8, "branch_merge": "concat", "activation": "tanh"}, (4,),
     [[0, 1], [2, 3]]),
    ("mlp", {"n_layers": 1, "units": 8, "branch_merge": "add", "batch_norm": "after_activation"}, (4,),
     [[0, 1], [2, 3]]),
    ("cnn", {"n_layers": 2, "filters": 4, "kernel_size": 5, "separable": True,
             "batch_norm": "after_activation", "units": 8, "dropout": 0.1}, (1, 8, 8), None),
    ("cnn", {"n_layers": 1, "filters": 4, "kernel_size": 3, "activation": "sigmoid"}, (3, 5, 5), None),
])
def test_the_documented_loader_rebuilds_every_architecture(model: str, params: dict[str, Any],
                                                           shape: tuple[int, ...], groups: Any,
                                                           tmp_path: Path) -> None:
    torch.manual_seed(0)
    channels = shape[0] if len(shape) == 3 else int(np.prod(shape))
    spec = ModelSpec(model=model, params=params, task="classification", input_shape=shape, n_outputs=3,
                     feature_groups=groups, classes=["a", "b", "c"], mean=[0.5] * channels,
                     std=[2.0] * channels)
    trained = build_module(spec)
    for name, buffer in trained.state_dict().items():  # batch-norm statistics as if trained
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    save_trial(tmp_path / "trial-0", trained.state_dict(), spec, metrics={}, layers=describe_layers(trained))
    folder = tmp_path / "export"  # as a download unpacks
    folder.mkdir()
    (tmp_path / "trial-0.safetensors").rename(folder / "model.safetensors")
    (tmp_path / "trial-0.json").rename(folder / "config.json")
    plain, config = _plain_loader()["load"](str(folder))
    x = torch.rand(7, *shape) * 4
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained.eval()(x), rtol=0, atol=0)
    assert config["classes"] == ["a", "b", "c"]


def test_export_round_trip_gives_the_services_predictions(sqlite_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished study exported by `hpsearch export`, then loaded with the README's code exactly as written:
    its `load()` gives what POST /predict serves, its `load_ensemble_dir` what POST /predict?use=ensemble does."""
    settings = make_settings(sqlite_url, tmp_path / "home")
    db = Database(sqlite_url)
    client = client_for(settings, db)
    sid = client.post(f"{API}/studies", json=study_spec(budget={"n_trials": 3, "epochs": 2},
                                                         ensemble={"top_k": 2, "trees": True})).json()["id"]
    with running_supervisor(settings, db):
        study = wait_for_status(client, sid, {"completed", "failed"})
    assert study["status"] == "completed", study["error"]
    port, key, procs = free_port(), keys.create_key(db, owner="alice"), []
    db.dispose()
    try:
        procs.append(start_api(settings, tmp_path / "api.log", port=port))
        api_url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "HPSEARCH_API_URL": api_url, "HPSEARCH_API_KEY": key}
        command = [sys.executable, "-m", "app.cli", "export", sid, str(tmp_path / "digits-export")]
        out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        exported = tmp_path / "digits-export"
        assert {p.name for p in exported.iterdir()} == {"model.safetensors", "config.json", "ensemble"}
        assert (exported / "ensemble" / "ensemble.json").is_file()

        monkeypatch.chdir(tmp_path)  # the documented code reads "digits-export" from the working directory
        namespace: dict[str, Any] = {}
        for block in _doc_blocks():
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102
        assert namespace["load_ensemble_dir"] is load_ensemble_dir  # the README's ensemble block ran
        x = namespace["x"].numpy().tolist()
        api = httpx.Client(base_url=f"{api_url}{API}/studies/{sid}",
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
        served = api.post("/predict", json={"inputs": x}).json()
        # the README's softmax is float32, the service's float64: they agree to float32 precision
        np.testing.assert_allclose(namespace["probabilities"].numpy(), served["probabilities"], rtol=1e-5,
                                   atol=1e-6)
        assert namespace["labels"] == served["predictions"]
        served_ensemble = api.post("/predict", params={"use": "ensemble"}, json={"inputs": x}).json()
        np.testing.assert_allclose(namespace["ensemble_probabilities"], served_ensemble["probabilities"],
                                   rtol=0, atol=1e-6)
    finally:
        stop_all(procs)
