"""Every use of Optuna's internals, in one place, checked against the Optuna versions it was verified on.

The rest of the service reaches Optuna only through its public API (`Study`, `Trial`, `BaseSampler`,
`BaseStorage`). Three things have no public form, and they are here:

- Optuna's tables (`trials`, `trial_params`, `trial_values`, `trial_system_attributes`, `studies`): the
  trial window reads a bounded part of a study by SQL, and a new trial is written in short transactions
  (`optuna_rows`). Optuna migrates this schema with Alembic; its Python models are private.
- A frozen trial's storage id, and the read of a study's trials by id (`RDBStorage._get_trials`, what
  Optuna's own cached storage syncs with): the window keeps its trials by id and reads only new or open ones.
- TPE's log Φ (`optuna.samplers._tpe._truncnorm._log_ndtr`), computed with a Python call per element;
  `scipy.special.log_ndtr` is the same function vectorized (`tests/workers/test_optuna_private.py`).

`tests/workers/test_optuna_private.py` fails, naming this module, on an Optuna outside
VERIFIED_OPTUNA_VERSIONS: check each item above against the new release, then add it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.samplers._tpe import _truncnorm
from optuna.storages import RDBStorage
from optuna.storages._rdb import models as _models
from optuna.trial import FrozenTrial
from scipy import special
from sqlalchemy import Engine, Table

VERIFIED_OPTUNA_VERSIONS = ("5.1.0",)

trials_table: Table = _models.TrialModel.__table__
params_table: Table = _models.TrialParamModel.__table__
values_table: Table = _models.TrialValueModel.__table__
studies_table: Table = _models.StudyModel.__table__
system_attrs_table: Table = _models.TrialSystemAttributeModel.__table__
FINITE_VALUE: Any = _models.TrialValueModel.TrialValueType.FINITE  # a trial value's type that is a number

OPTUNA_LOG_NDTR: Callable[[Any], Any] | None = getattr(_truncnorm, "_log_ndtr", None)  # for the side-by-side test


def verified() -> bool:
    """Whether the installed Optuna is one this module was checked against."""
    return optuna.__version__ in VERIFIED_OPTUNA_VERSIONS


def engine(storage: RDBStorage) -> Engine:
    """The SQLAlchemy engine of Optuna's RDB storage (an attribute Optuna does not document)."""
    return storage.engine


def trial_id(trial: FrozenTrial) -> int:
    """A frozen trial's storage id: Optuna passes it to the constructor but keeps no public attribute."""
    return trial._trial_id


def read_trials(storage: RDBStorage, study_id: int, ids: set[int], after_id: int) -> list[FrozenTrial]:
    """The study's trials whose id is in `ids` or greater than `after_id` (all of them for -1), by id."""
    return storage._get_trials(study_id, None, ids, after_id)


def use_vectorized_log_ndtr() -> bool:
    """Swap in scipy's log Φ for TPE's; False (nothing changed) where this Optuna has no such helper."""
    if not callable(getattr(_truncnorm, "_log_ndtr", None)):
        return False
    _truncnorm._log_ndtr = special.log_ndtr
    return True
