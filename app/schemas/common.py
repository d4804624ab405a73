from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Client input: unknown fields, NaN and Infinity are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=2000)


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)
