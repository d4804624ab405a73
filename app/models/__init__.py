"""SQLAlchemy tables of the service. Optuna's own tables live beside them in the same database."""

from app.models.base import Base
from app.models.tables import (
    ApiKey,
    DatasetRecord,
    FailureKind,
    Study,
    StudyStatus,
    Trial,
    TrialEpoch,
    TrialState,
    Worker,
    current_curve,
)

__all__ = [
    "ApiKey",
    "Base",
    "DatasetRecord",
    "FailureKind",
    "Study",
    "StudyStatus",
    "Trial",
    "TrialEpoch",
    "TrialState",
    "Worker",
    "current_curve",
]
