from __future__ import annotations

import difflib

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Client input: unknown fields, NaN and Infinity are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=2000)


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def did_you_mean(name: str, candidates: list[str]) -> str:
    """' (did you mean learning_rate?)' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
