"""Service settings: the only place that reads the environment (HPSEARCH_*)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Settings(BaseSettings):
    """Configuration of the API, the workers and the CLI."""

    model_config = SettingsConfigDict(env_prefix="HPSEARCH_", env_file=".env", extra="ignore")

    home: Path = Field(Path(".hpsearch"), description="Folder of the embedded database, data and artifacts.")
    database_url: str = Field("", description="SQLAlchemy URL; default: a SQLite file in HOME.")
    data_dir: Path | None = Field(None, description="Uploaded datasets; default HOME/data.")
    artifact_dir: Path | None = Field(None, description="Trial weights and logs; default HOME/artifacts.")
    mnist_dir: Path | None = Field(None, description="Folder with MNIST IDX files, offered as builtin:mnist.")
    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the API.")
    api_key: str = Field("", description="The CLI's API key.")
    auth_enabled: bool = Field(True, description="Require API keys; refused off a loopback address.")
    max_body_bytes: int = Field(1 * 2**20, ge=1024, description="Largest JSON request body.")
    max_predict_body_bytes: int = Field(
        32 * 2**20, ge=1024, description="Largest predict request body: fits 1,024 rows of 28x28 images "
        "written as full-precision floats (about 16 MB), so the row limit answers before the size limit.")
    max_upload_bytes: int = Field(200 * 2**20, ge=1024, description="Largest dataset upload.")
    rate_limit_per_s: float = Field(50.0, gt=0, description="Sustained requests per second per key.")
    rate_limit_burst: int = Field(200, ge=1, description="Requests a key may burst above the rate.")
    max_streams_per_key: int = Field(8, ge=1, description="Event streams one API key may hold open at once; "
                                     "one more is answered 429 with Retry-After.")
    metrics_cache_s: float = Field(5.0, ge=0, description="Seconds a /metrics scrape reuses the database "
                                   "aggregates of the previous one (0: every scrape reads them).")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="How often workers beat for their leases.")
    lease_grace_s: float = Field(30.0, gt=0, description="A lease without a beat for this long is reaped.")
    trial_deadline_s: float = Field(3600.0, gt=0, description="Wall-clock limit of one trial attempt.")
    trial_memory_mb: int = Field(0, ge=0, description="Address space (MiB) a CPU trial process may add to what "
                                 "it inherits from its worker; beyond it the trial fails out_of_memory (0: none).")
    runner_trials: int = Field(50, ge=1, description="Jobs (a trial, or a fused group) one runner process trains "
                               "before it is replaced; between them it keeps torch, its device context and the "
                               "study's split resident (1: a new runner for every trial, as under trial_memory_mb "
                               "on a CPU).")
    checkpoint_quota_mb: float = Field(0.0, ge=0, description="Checkpoint bytes (MB, 10^6 bytes) the trial rows "
                                       "of one owner's studies may hold together; a trial whose next checkpoint "
                                       "would go beyond it fails (checkpoint_quota) and its files go (0: no limit).")
    log_json: bool | None = Field(None, description="JSON logs; default when stderr is not a terminal.")
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Model and dataset plugins (entry points hpsearch.models, "
        "hpsearch.datasets) this process enables, comma-separated: `name` or `name==version`.")

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def checkpoint_quota_bytes(self) -> int:
        """`checkpoint_quota_mb` in bytes; 0: no limit."""
        return int(self.checkpoint_quota_mb * 1_000_000)

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.home / 'hpsearch.db').resolve()}"
        self.data_dir = self.data_dir or self.home / "data"
        self.artifact_dir = self.artifact_dir or self.home / "artifacts"
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
