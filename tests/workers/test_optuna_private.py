"""Optuna's internals stay in workers/optuna_private.py, verified against the installed Optuna.

The vectorized log Φ under TPE: the same function, and the same proposals, as Optuna's own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.samplers._tpe import _truncnorm
from scipy import special

from app.ml.space import Context, resolve_space, sample_params
from workers import optuna_private
from workers.optuna_private import VERIFIED_OPTUNA_VERSIONS

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ROOT / "workers" / "optuna_private.py"
# Optuna's private names the service once reached into, and any import from a private Optuna module.
PRIVATE_ATTRIBUTES = re.compile(
    r"(?<!self)\._(storage|study_id|trial_id|get_trials|pop_waiting_trial_id|thread_local|backend|get_bracket_id|"
    r"get_latest_trial|constraints_func|param_names|all_grids|search_space|get_unvisited_grid_ids|rng|"
    r"log_ndtr|contains|cached_frozen_trial|create_new_trial|set_trial_param)\b")


def test_the_installed_optuna_is_one_the_private_module_was_verified_against() -> None:
    assert optuna_private.verified(), (
        f"Optuna {optuna.__version__} is installed; workers/optuna_private.py was verified against "
        f"{', '.join(VERIFIED_OPTUNA_VERSIONS)}. Check each use of Optuna's internals it lists (its tables, "
        f"RDBStorage._get_trials, FrozenTrial._trial_id, TPE's _truncnorm._log_ndtr) against this release, "
        f"then add the version to VERIFIED_OPTUNA_VERSIONS.")


def test_every_private_optuna_name_the_module_uses_exists() -> None:
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

    assert callable(RDBStorage._get_trials) and callable(optuna_private.OPTUNA_LOG_NDTR)
    assert {"trial_id", "number", "state", "study_id"} <= set(optuna_private.trials_table.c.keys())
    assert {"trial_id", "param_name", "param_value", "distribution_json"} <= set(optuna_private.params_table.c.keys())
    assert {"trial_id", "objective", "value", "value_type"} <= set(optuna_private.values_table.c.keys())
    trial = optuna.trial.create_trial(value=1.0)
    assert optuna_private.trial_id(FrozenTrial(**{**{k: getattr(trial, k) for k in (
        "number", "state", "value", "datetime_start", "datetime_complete", "params", "distributions",
        "user_attrs", "system_attrs", "intermediate_values")}, "trial_id": 42})) == 42


def _service_sources() -> list[Path]:
    return sorted(p for d in ("workers", "app") for p in (ROOT / d).rglob("*.py") if p != ALLOWED)


def test_no_module_but_the_private_one_reaches_into_optuna() -> None:
    found = []
    for path in _service_sources():
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optuna") and (
                    any(part.startswith("_") for part in node.module.split("."))
                    or any(alias.name.startswith("_") for alias in node.names)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Import) and any(a.name.startswith("optuna") and "._" in a.name
                                                      for a in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import of a private Optuna module")
        for number, line in enumerate(text.splitlines(), 1):
            if PRIVATE_ATTRIBUTES.search(line.split("#")[0]):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "Optuna's internals outside workers/optuna_private.py:\n" + "\n".join(found)


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The pattern catches each kind of private access that once was in the service."""
    for line in ("study._storage.get_trial(1)", "x = study._study_id", "t._trial_id", "s._rng.rng",
                 "storage._get_trials(1, None, set(), -1)", "d._contains(1)", "trial._get_latest_trial()"):
        assert PRIVATE_ATTRIBUTES.search(line), line
    assert not PRIVATE_ATTRIBUTES.search("self._trials = {}")  # our own attributes are ours


def test_it_computes_what_optunas_helper_computes() -> None:
    assert optuna_private.OPTUNA_LOG_NDTR is not None  # this Optuna has the helper the sampler's cost is in
    x = np.concatenate([np.linspace(-60, 12, 5001), [-1e3, -20.0001, -19.9999, 5.9999, 6.0001, 1e3]])
    np.testing.assert_allclose(special.log_ndtr(x), optuna_private.OPTUNA_LOG_NDTR(x), rtol=1e-7, atol=1e-300)


def _proposals(log_ndtr: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Ten TPE proposals over the documented MLP space after 40 scored trials, with log_ndtr in place."""
    monkeypatch.setattr(_truncnorm, "_log_ndtr", log_ndtr)
    space = resolve_space({}, Context("mlp", image=True))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=3, multivariate=True, group=True, constant_liar=True, n_startup_trials=10))
    proposals = []
    for n in range(50):
        trial = study.ask()
        params = sample_params(trial, space)
        study.tell(trial, float(np.log1p(params["units"]) - params["dropout"] * (n % 3)))
        proposals.append(params)
    return proposals[40:]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_tpe_proposes_the_same_configurations_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with_optunas = _proposals(optuna_private.OPTUNA_LOG_NDTR, monkeypatch)
    assert optuna_private.use_vectorized_log_ndtr()
    assert _truncnorm._log_ndtr is special.log_ndtr
    with_scipys = _proposals(special.log_ndtr, monkeypatch)
    for ours, theirs in zip(with_scipys, with_optunas, strict=True):  # the same choices, floats to rounding
        assert ours.keys() == theirs.keys()
        for name, value in ours.items():
            assert value == pytest.approx(theirs[name], rel=1e-9) if isinstance(value, float) else value == theirs[name]
