from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, UTCDateTime, utcnow
from app.schemas.study import StudySpec


class StudyStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    def is_finished(self) -> bool:
        return self in (StudyStatus.COMPLETED, StudyStatus.CANCELLED, StudyStatus.FAILED)

    def accepts_trials(self) -> bool:
        """Workers may start trials of a study in this state."""
        return self in (StudyStatus.QUEUED, StudyStatus.RUNNING)


class TrialState(enum.StrEnum):
    WAITING = "waiting"  # enqueued or handed back for another attempt
    RUNNING = "running"
    PAUSED = "paused"  # stopped at an epoch boundary by a client, its checkpoint kept; waits for a resume
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAIL = "fail"

    def is_finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


FINISHED_TRIAL_STATES = tuple(s.value for s in TrialState if s.is_finished())


class FailureKind(enum.StrEnum):
    """Why an attempt failed; the trial's `error` holds the message for people."""

    LOST = "lost"  # its worker stopped beating (killed, frozen, cut off)
    DEADLINE = "deadline"  # ran past its wall-clock limit
    NON_FINITE = "non_finite"  # loss or objective became NaN or infinite
    OUT_OF_MEMORY = "out_of_memory"
    PROCESS_DIED = "process_died"  # the runner process ended without a word (a signal, a segfault)
    ERROR = "error"  # the training code raised
    WORKER_ERROR = "worker_error"  # the supervisor failed around the trial (a fork, the data)
    CANCELLED = "cancelled"  # the study was cancelled or a stop criterion ended it
    CHECKPOINT_QUOTA = "checkpoint_quota"  # its checkpoint would take its owner past HPSEARCH_CHECKPOINT_QUOTA_MB


class ApiKey(Base):
    __tablename__ = "hp_api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex; the key itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Study(Base):
    __tablename__ = "hp_studies"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_hp_studies_owner_idempotency"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True, default=StudyStatus.QUEUED.value)
    optuna_name: Mapped[str] = mapped_column(String(64), unique=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    n_trials: Mapped[int] = mapped_column(Integer)
    max_parallel: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    test_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ensemble: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # chosen at finalization
    # One worker at a time evaluates the finished study on the test split.
    finalize_worker: Mapped[str | None] = mapped_column(String(128))
    finalize_until: Mapped[datetime | None] = mapped_column(UTCDateTime)

    trials: Mapped[list[Trial]] = relationship(back_populates="study", cascade="all, delete-orphan",
                                               passive_deletes=True)

    @property
    def config(self) -> StudySpec:
        """The stored spec, parsed once per loaded row into the typed spec every reader uses."""
        cached = self.__dict__.get("_config")
        if cached is None or cached[0] is not self.spec:
            cached = (self.spec, StudySpec.from_stored(self.spec))
            self.__dict__["_config"] = cached
        return cached[1]

    def best_first(self) -> tuple[Any, ...]:
        """ORDER BY terms for trials, best value of the first objective first; the earlier trial wins a tie."""
        return (Trial.value.desc() if self.config.maximize else Trial.value.asc()), Trial.number.asc()


class Trial(Base):
    """One trial of a study and its lease: who runs it, on which device, until when."""

    __tablename__ = "hp_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_hp_trials_study_number"),
        # One index range per page order, with and without a state filter (migration 0004); the finish
        # time ones also serve what finished since a moment.
        Index("ix_hp_trials_study_state_number", "study_id", "state", "number"),
        Index("ix_hp_trials_study_value_number", "study_id", "value", "number"),
        Index("ix_hp_trials_study_duration_number", "study_id", "duration_s", "number"),
        Index("ix_hp_trials_study_finished_number", "study_id", "finished_at", "number"),
        Index("ix_hp_trials_study_state_value_number", "study_id", "state", "value", "number"),
        Index("ix_hp_trials_study_state_duration_number", "study_id", "state", "duration_s", "number"),
        Index("ix_hp_trials_study_state_finished_number", "study_id", "state", "finished_at", "number"),
        Index("ix_hp_trials_state_heartbeat", "state", "heartbeat_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("hp_studies.id", ondelete="CASCADE"))
    number: Mapped[int | None] = mapped_column(Integer)  # Optuna's trial number; None while reserved
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16), default="sampler")  # sampler | enqueued | warm_start
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    value: Mapped[float | None] = mapped_column(Float)
    values: Mapped[list[float] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, float] | None] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    epochs_run: Mapped[int | None] = mapped_column(Integer)
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    failure: Mapped[str | None] = mapped_column(String(16))  # a FailureKind, set with error
    artifact: Mapped[str | None] = mapped_column(String(500))
    # The latest checkpoint on disk (relative to the artifact dir), recorded by its runner while the lease
    # held: a death resumes from it. Cleared when an attempt starts over and when the trial ends, except for
    # a completed trial that the study's keep_checkpoints keeps (workers.leasing.finish_trial).
    checkpoint_path: Mapped[str | None] = mapped_column(String(500))
    checkpoint_epoch: Mapped[int | None] = mapped_column(Integer)
    checkpoint_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # A client asked to pause the running trial: its worker checkpoints it at the next epoch boundary.
    pause_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A client extended the completed trial: it continues from its checkpoint up to this epoch, its complete
    # result standing until the extension completes (or ends otherwise and leaves it as it was).
    epochs_target: Mapped[int | None] = mapped_column(Integer)
    # Paused by the study's scheduler at this rung (an epoch): a free slot may promote it (workers.scheduling).
    rung: Mapped[int | None] = mapped_column(Integer)
    # Checkpoints a resuming attempt could not use and passed over (the reason is in `error`): /metrics sums them.
    unusable_checkpoints: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A PBT member's hyperparameter schedule, inherited steps first: [{"epoch", "params", "source",
    # "source_epoch"}]; the last step's params are in force (None: its own `params` since epoch 0).
    schedule: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="trials")


class TrialEpoch(Base):
    """One epoch's curve point of one attempt of a trial."""

    __tablename__ = "hp_trial_epochs"

    trial_id: Mapped[int] = mapped_column(ForeignKey("hp_trials.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_metric: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def current_curve() -> Any:
    """The join of a trial to its current attempt's epochs (a re-run's earlier curves are not its curve)."""
    return (TrialEpoch.trial_id == Trial.id) & (TrialEpoch.attempt == Trial.attempt)


class Worker(Base):
    __tablename__ = "hp_workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    devices: Mapped[list[str]] = mapped_column(JSON)
    slots: Mapped[int] = mapped_column(Integer)
    # [{"name", "kind", "version", "error"}]: the enabled plugins this worker has; it claims only their studies
    plugins: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DatasetRecord(Base):
    """An uploaded dataset, stored once per owner and content hash."""

    __tablename__ = "hp_datasets"
    __table_args__ = (UniqueConstraint("owner", "content_hash", name="uq_hp_datasets_owner_hash"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    description: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
