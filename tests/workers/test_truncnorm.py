"""The vectorized log Φ under TPE: the same function, and the same proposals, as Optuna's own."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import pytest
from optuna.samplers._tpe import _truncnorm
from scipy import special

from app.ml.space import Context, resolve_space, sample_params
from workers import truncnorm


def test_it_computes_what_optunas_helper_computes() -> None:
    assert truncnorm.OPTUNA_LOG_NDTR is not None  # this Optuna has the helper the sampler's cost is in
    x = np.concatenate([np.linspace(-60, 12, 5001), [-1e3, -20.0001, -19.9999, 5.9999, 6.0001, 1e3]])
    np.testing.assert_allclose(special.log_ndtr(x), truncnorm.OPTUNA_LOG_NDTR(x), rtol=1e-7, atol=1e-300)


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
    with_optunas = _proposals(truncnorm.OPTUNA_LOG_NDTR, monkeypatch)
    assert truncnorm.install()
    assert _truncnorm._log_ndtr is special.log_ndtr
    with_scipys = _proposals(special.log_ndtr, monkeypatch)
    for ours, theirs in zip(with_scipys, with_optunas, strict=True):  # the same choices, floats to rounding
        assert ours.keys() == theirs.keys()
        for name, value in ours.items():
            assert value == pytest.approx(theirs[name], rel=1e-9) if isinstance(value, float) else value == theirs[name]
