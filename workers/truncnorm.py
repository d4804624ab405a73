"""TPE's truncated-normal mass computed by scipy's ufunc instead of a Python call per element.

Optuna 5's TPE scores every candidate against every kernel of its Parzen estimators; for integer and
discrete parameters that needs log Φ at each bin edge, which `optuna.samplers._tpe._truncnorm._log_ndtr`
computes with `np.frompyfunc` over a Python function: a Python call per kernel and bin edge, a large share
of an ask over a full window (docs/benchmarks/scale.md). `scipy.special.log_ndtr` is the same function,
vectorized (and exact where Optuna's switches formulas, near 6). The proposals do not change
(`tests/workers/test_truncnorm.py`).
"""

from __future__ import annotations

from optuna.samplers._tpe import _truncnorm
from scipy import special

OPTUNA_LOG_NDTR = getattr(_truncnorm, "_log_ndtr", None)  # kept for the tests' side-by-side


def install() -> bool:
    """Swap in the vectorized log Φ; False (and nothing changed) where this Optuna has no such helper."""
    if not callable(getattr(_truncnorm, "_log_ndtr", None)):
        return False
    _truncnorm._log_ndtr = special.log_ndtr
    return True
